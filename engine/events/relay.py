"""The relay: publishes the outbox to Redis Streams and the balance projection, commit by commit.

Redis layout (all keys under ``txengine:``):

* ``txengine:events:<shard>``: a stream per shard. One entry per commit that has events of the
  shard, with the explicit id ``<commit_timestamp>-0`` and the fields ``events`` (a serialized
  EventBatch: the commit's events of that shard, in order) and ``count``.
* ``txengine:events:published``: the commit_timestamp of the last commit published.
* ``txengine:events:ledger``: the ledger database these keys belong to (its
  ``ledger_instance``). The relay claims an empty Redis for its database and refuses one that
  another holds: its published mark would make the relay skip this database's commits.
* ``txengine:account:<id hex>``: a hash per account, the projection. Field ``state``: 40 bytes,
  big-endian: version (int64, the timestamp of the account's last change), debits_pending,
  debits_posted, credits_pending, credits_posted (uint64). Field ``account``: 20 + n bytes,
  big-endian: ledger, code, flags (uint32), timestamp (int64), then the user_data.

A commit is published by one Lua script call, which Redis runs atomically: the stream entries,
the projection and the published mark change together or not at all, and a commit at or before
the mark is skipped. So whatever crashes when (engine, relay or Redis), every commit appears once
in each stream, in commit order, and the projection is always exactly the state after the
published mark.
"""
from __future__ import annotations

import asyncio
import struct
import time

import redis.asyncio as aioredis
import structlog

from engine.config import Settings
from engine.events.codec import (
    ACCOUNT_HEAD, CONSUMER_GATHER_SECONDS, EncodedCommit, encode_commits,
)
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.posting.engine import PostingEngine
from engine.storage.outbox import EventStore

log = structlog.get_logger("engine.events")

STREAM_KEY = "txengine:events:{shard}"
PUBLISHED_KEY = "txengine:events:published"
LEDGER_KEY = "txengine:events:ledger"
ACCOUNT_KEY = "txengine:account:{hex}"
STATE = struct.Struct(">qQQQQ")
ID_HEX_CHARS = 32
RETRY_SECONDS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
COMMITS_PER_READ_MAX = 64
TRANSFERS_PER_READ_MAX = 32_768
IDLE_POLL_SECONDS = 1.0

# ARGV: commit_timestamp, maxlen, stream count, then per stream (shard, events, count), then
# the state records (32 hex chars of id + 40 bytes each, in order), then (id hex, account) pairs.
PUBLISH_SCRIPT = """
local commit = ARGV[1]
local published = redis.call('GET', KEYS[1])
if published and (#published > #commit or (#published == #commit and published >= commit)) then
  return 0
end
local streams = tonumber(ARGV[3])
local arg = 4
for _ = 1, streams do
  redis.call('XADD', 'txengine:events:' .. ARGV[arg], 'MAXLEN', '~', ARGV[2], commit .. '-0',
             'events', ARGV[arg + 1], 'count', ARGV[arg + 2])
  arg = arg + 3
end
local states = ARGV[arg]
for i = 1, #states, 72 do
  redis.call('HSET', 'txengine:account:' .. string.sub(states, i, i + 31),
             'state', string.sub(states, i + 32, i + 71))
end
arg = arg + 1
while arg < #ARGV do
  redis.call('HSET', 'txengine:account:' .. ARGV[arg], 'account', ARGV[arg + 1])
  arg = arg + 2
end
redis.call('SET', KEYS[1], commit)
return 1
"""


def redis_client(url: str, timeout_seconds: float) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, socket_connect_timeout=timeout_seconds,
                                   socket_timeout=timeout_seconds)


def publish_args(commit: EncodedCommit, maxlen: int) -> list:
    """The PUBLISH_SCRIPT arguments of one commit."""
    args: list = [commit.commit_timestamp, maxlen, len(commit.shard_events)]
    for shard, (events, count) in sorted(commit.shard_events.items()):
        args += [shard, events, count]
    return [*args, commit.states, *commit.accounts]


class ForeignRedis(Exception):
    """The Redis database holds the events of another ledger database."""


class RedisRelay:
    """Publishes every outbox commit to Redis in commit order; survives Redis being down."""

    def __init__(self, events: EventStore, redis: aioredis.Redis, settings: Settings,
                 engine: PostingEngine):
        self.events = events
        self.redis = redis
        self.settings = settings
        self.engine = engine
        self._script_sha = ""  # PUBLISH_SCRIPT as loaded by _claim
        self.published = 0  # the last commit known to be in Redis
        self.commits_published = 0
        self.oldest_unpublished = 0  # commit_timestamp of the next commit to publish; 0: none

    def lag_seconds(self, now_ns: int) -> float:
        """Age of the oldest commit not yet in Redis (0 when the relay has caught up)."""
        return max(0.0, (now_ns - self.oldest_unpublished) / 1e9) if self.oldest_unpublished else 0.0

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                await self._claim()
                self.published = int(await self.redis.get(PUBLISHED_KEY) or 0)
                while True:
                    seen = self.engine.committed_timestamp
                    read = await self._publish_some()
                    # Caught up (a commit that changed nothing has no outbox row, hence `read`):
                    # wait for new commits, and gather them.
                    if not read or self.published >= seen:
                        await self.engine.wait_for_commits(seen, IDLE_POLL_SECONDS,
                                                           CONSUMER_GATHER_SECONDS)
                    failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - Redis or Postgres down: retry later
                delay = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
                if failures == 0:
                    log.warning("event relay paused", error=repr(error), retry_in_s=delay)
                failures += 1
                await asyncio.sleep(delay)

    async def _claim(self) -> None:
        """Make sure the Redis database is this ledger database's (claiming it when empty)."""
        instance = await self.events.ledger_instance()
        await self.redis.set(LEDGER_KEY, instance, nx=True)
        holder = (await self.redis.get(LEDGER_KEY) or b"").decode()
        # Loaded here, not checked before each pipeline: a Redis that lost it (restarted
        # empty) fails the next publication with NOSCRIPT, and the retry comes back here.
        self._script_sha = await self.redis.script_load(PUBLISH_SCRIPT)
        if holder != instance:
            raise ForeignRedis(
                f"Redis holds the events of ledger database {holder}, not of this one "
                f"({instance}): give each ledger database its own Redis database, and FLUSHDB "
                f"it when the ledger's database is created anew")

    async def _publish_some(self) -> int:
        """Publish the next commits of the outbox; how many there were."""
        rows, columns = await self.events.commits_after(self.published, COMMITS_PER_READ_MAX,
                                                        TRANSFERS_PER_READ_MAX)
        if not rows:
            self.oldest_unpublished = 0
        commits = encode_commits(rows, columns)
        if commits:
            # One round trip for the commits of this read: Redis runs the scripts in order, and
            # each skips a commit at or before the mark, so a pipeline cut short by a failure is
            # simply published again from the mark in Redis.
            self.oldest_unpublished = commits[0].commit_timestamp
            async with self.redis.pipeline(transaction=False) as pipe:
                for commit in commits:
                    pipe.evalsha(self._script_sha, 1, PUBLISHED_KEY,
                                 *publish_args(commit, self.settings.events_stream_maxlen))
                await pipe.execute()
            self.published = commits[-1].commit_timestamp
            self.commits_published += len(commits)
        if rows:
            await self.events.set_progress("redis", self.published)
        return len(rows)


class OutboxTrimmer:
    """Deletes outbox rows that every consumer is done with, once older than the retention."""

    def __init__(self, events: EventStore, settings: Settings, clock=time.time_ns):
        self.events = events
        self.retention_ns = int(settings.events_retention_seconds * 1e9)
        self.clock = clock

    async def run(self, interval_seconds: float = 5.0) -> None:
        while True:
            try:
                while await self.events.trim(self.clock() - self.retention_ns, 1000) == 1000:
                    await asyncio.sleep(0)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - Postgres down: try again later
                log.warning("outbox trim failed", error=repr(error))
            await asyncio.sleep(interval_seconds)


async def read_projection(redis: aioredis.Redis, ids: list[bytes]) -> tuple[int, list]:
    """(published commit, per id an Account or None) read atomically from the projection."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.get(PUBLISHED_KEY)
        for account_id in ids:
            pipe.hmget(ACCOUNT_KEY.format(hex=account_id.hex()), "state", "account")
        replies = await pipe.execute()
    accounts = []
    for account_id, (state, head) in zip(ids, replies[1:]):
        if state is None or head is None:
            accounts.append(None)
            continue
        _, dp, dpo, cp, cpo = STATE.unpack(state)
        ledger, code, flags, timestamp = ACCOUNT_HEAD.unpack_from(head)
        accounts.append(pb.Account(
            id=account_id, ledger=ledger, code=code, flags=flags, debits_pending=dp,
            debits_posted=dpo, credits_pending=cp, credits_posted=cpo,
            user_data=head[ACCOUNT_HEAD.size:], timestamp=timestamp))
    return int(replies[0] or 0), accounts
