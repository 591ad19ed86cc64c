"""Postgres access of the event stream: the outbox, consumer progress, webhook tables.

Reads go through the store's pool, never the writer connection, so no consumer of events can
delay a commit.
"""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import asyncpg

from engine.storage.store import TRANSFER_FIELDS

OUTBOX_COLUMNS = ("commit_timestamp", "first_timestamp", "transfer_count", "transfer_balances",
                  "other_events")
EVENT_TRANSFER_COLUMNS = (*TRANSFER_FIELDS, "seq_shard", "seq")
DELIVERY_PENDING, DELIVERY_DELIVERED, DELIVERY_DEAD = 0, 1, 2


class CursorExpired(Exception):
    """The requested position is older than the oldest event still retained."""


class EventStore:
    """Outbox reads, consumer progress, trimming, and webhook subscriptions and deliveries."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    @contextlib.asynccontextmanager
    async def _background(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction of a background consumer, committed without waiting for its WAL
        flush: a crash can only lose progress, which is then made again (publication and
        delivery recording are idempotent), and the writer's own fsyncs are not contended."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = off")
            yield conn

    # -- the outbox ------------------------------------------------------------------------

    async def commits_after(self, commit_timestamp: int, commits_max: int,
                            transfers_max: int) -> tuple[list[asyncpg.Record], dict | None]:
        """The outbox rows after commit_timestamp, oldest first, and their transfers as
        columns (EVENT_TRANSFER_COLUMNS, in timestamp order; None when there are none): at
        most commits_max commits, and no more once transfers_max transfers are read (at least
        one commit whatever its size)."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                                 readonly=True):
            rows = await conn.fetch(
                f"""SELECT {', '.join(OUTBOX_COLUMNS)} FROM event_outbox
                    WHERE commit_timestamp > $1 ORDER BY commit_timestamp LIMIT $2""",
                commit_timestamp, commits_max)
            taken, transfers = [], 0
            for row in rows:
                if taken and transfers + row["transfer_count"] > transfers_max:
                    break
                taken.append(row)
                transfers += row["transfer_count"]
            if not transfers:
                return taken, None
            columns = await conn.fetchrow(
                f"""SELECT {', '.join(f'array_agg({c}) AS {c}' for c in EVENT_TRANSFER_COLUMNS)}
                    FROM (SELECT {', '.join(EVENT_TRANSFER_COLUMNS)} FROM transfers
                          WHERE "timestamp" BETWEEN $1 AND $2 ORDER BY "timestamp") AS t""",
                taken[0]["first_timestamp"], taken[-1]["commit_timestamp"])
        return taken, dict(columns)

    async def latest_commit(self) -> int:
        return await self.pool.fetchval("SELECT coalesce(max(commit_timestamp), 0) FROM event_outbox")

    async def check_cursor(self, commit_timestamp: int) -> None:
        """Raise CursorExpired when events after commit_timestamp were trimmed already."""
        trimmed = await self.progress("trimmed")
        if commit_timestamp < trimmed:
            raise CursorExpired(
                f"events up to commit {trimmed} were trimmed from the outbox; resume from a "
                f"cursor at or after it, or from the Redis streams")

    async def ledger_instance(self) -> str:
        """The identity of this ledger database (ledger_meta, migration 0004)."""
        return await self.pool.fetchval(
            "SELECT value FROM ledger_meta WHERE key = 'ledger_instance'")

    async def progress(self, consumer: str) -> int:
        return await self.pool.fetchval(
            "SELECT commit_timestamp FROM event_progress WHERE consumer = $1", consumer)

    async def set_progress(self, consumer: str, commit_timestamp: int) -> None:
        async with self._background() as conn:
            await conn.execute(
                """UPDATE event_progress SET commit_timestamp = greatest(commit_timestamp, $2)
                   WHERE consumer = $1""", consumer, commit_timestamp)

    async def trim(self, before_timestamp: int, rows_max: int) -> int:
        """Delete up to rows_max outbox rows published to every consumer and older than
        before_timestamp; returns how many were deleted."""
        async with self._background() as conn:
            done = await conn.fetchval(
                """SELECT min(commit_timestamp) FROM event_progress
                   WHERE consumer IN ('redis', 'webhooks')""")
            limit = min(done, before_timestamp)
            deleted, last = await conn.fetchrow(
                """WITH gone AS (
                       DELETE FROM event_outbox WHERE commit_timestamp IN (
                           SELECT commit_timestamp FROM event_outbox WHERE commit_timestamp <= $1
                           ORDER BY commit_timestamp LIMIT $2)
                       RETURNING commit_timestamp)
                   SELECT count(*), max(commit_timestamp) FROM gone""", limit, rows_max)
            if deleted:
                await conn.execute(
                    "UPDATE event_progress SET commit_timestamp = $1 WHERE consumer = 'trimmed'",
                    last)
            return deleted

    # -- webhooks --------------------------------------------------------------------------

    async def create_subscription(self, subscription_id: bytes, url: str, event_types: list[int],
                                  secret: bytes, created_at: int, start_after: int) -> None:
        await self.pool.execute(
            """INSERT INTO webhook_subscriptions (id, url, event_types, secret, created_at,
                                                  start_after)
               VALUES ($1, $2, $3, $4, $5, $6)""",
            subscription_id, url, event_types, secret, created_at, start_after)

    async def subscriptions(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT id, url, event_types, secret, created_at, start_after
               FROM webhook_subscriptions ORDER BY created_at, id""")

    async def delete_subscription(self, subscription_id: bytes) -> bool:
        return await self.pool.execute(
            "DELETE FROM webhook_subscriptions WHERE id = $1", subscription_id) == "DELETE 1"

    async def record_deliveries(self, deliveries: list[tuple], consumed_through: int) -> None:
        """Record (subscription_id, commit_timestamp, event_index, payload) deliveries and the
        webhooks progress in one transaction; a delivery recorded before is kept as it is."""
        async with self._background() as conn:
            if deliveries:
                await conn.executemany(
                    """INSERT INTO webhook_deliveries (subscription_id, commit_timestamp,
                                                       event_index, payload)
                       SELECT $1, $2, $3, $4 WHERE EXISTS (
                           SELECT 1 FROM webhook_subscriptions WHERE id = $1)
                       ON CONFLICT DO NOTHING""", deliveries)
            await conn.execute(
                """UPDATE event_progress SET commit_timestamp = greatest(commit_timestamp, $1)
                   WHERE consumer = 'webhooks'""", consumed_through)

    async def due_deliveries(self, limit: int) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT d.subscription_id, d.commit_timestamp, d.event_index, d.payload,
                      d.attempts, s.url, s.secret
               FROM webhook_deliveries d JOIN webhook_subscriptions s ON s.id = d.subscription_id
               WHERE d.status = 0 AND d.next_attempt_at <= now()
               ORDER BY d.next_attempt_at, d.commit_timestamp, d.event_index LIMIT $1""", limit)

    async def next_delivery_seconds(self) -> float | None:
        """Seconds until the next pending delivery is due (0 if one is due), None if none."""
        return await self.pool.fetchval(
            """SELECT greatest(0, extract(epoch FROM next - now()))::float8
               FROM (SELECT min(next_attempt_at) AS next FROM webhook_deliveries
                     WHERE status = 0) AS due WHERE next IS NOT NULL""")

    async def delivery_done(self, key: tuple, delivered: bool, error: str | None,
                            retry_in_seconds: float | None) -> None:
        """After an attempt: delivered, retried after retry_in_seconds, or (None) dead."""
        status = (DELIVERY_DELIVERED if delivered else
                  DELIVERY_DEAD if retry_in_seconds is None else DELIVERY_PENDING)
        async with self._background() as conn:
            await conn.execute(
                """UPDATE webhook_deliveries SET attempts = attempts + 1, status = $4::smallint,
                          last_error = $5, next_attempt_at = now() + make_interval(secs => $6),
                          delivered_at = CASE WHEN $4::smallint = 1 THEN now() END
                   WHERE subscription_id = $1 AND commit_timestamp = $2 AND event_index = $3""",
                *key, status, error, retry_in_seconds or 0.0)

    async def replay_dead(self, subscription_id: bytes) -> int:
        result = await self.pool.execute(
            """UPDATE webhook_deliveries SET status = 0, attempts = 0, next_attempt_at = now()
               WHERE subscription_id = $1 AND status = 2""", subscription_id)
        return int(result.split()[-1])

    async def deliveries(self, subscription_id: bytes) -> list[asyncpg.Record]:
        return await self.pool.fetch(
            """SELECT commit_timestamp, event_index, status, attempts, last_error
               FROM webhook_deliveries WHERE subscription_id = $1
               ORDER BY commit_timestamp, event_index""", subscription_id)
