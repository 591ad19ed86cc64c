"""The event stream's background parts of one engine process, started and stopped together."""
from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
import structlog

from engine.config import Settings
from engine.events.relay import OutboxTrimmer, RedisRelay
from engine.events.webhooks import WebhookDispatcher
from engine.posting.engine import PostingEngine
from engine.storage.outbox import EventStore
from engine.storage.store import Store

log = structlog.get_logger("engine.events")

STOP_RELEASE_SECONDS_MAX = 1.0
STOP_TASKS_SECONDS_MAX = 5.0


class EventParts:
    """Relay to Redis, webhook recording and sending, and outbox trimming, as asyncio tasks of
    the engine's loop. None of them is on the commit path: each reads the outbox through the
    read pool and only ever waits for commits."""

    def __init__(self, store: Store, redis: aioredis.Redis, engine: PostingEngine,
                 settings: Settings):
        assert store.pool is not None
        self.store = EventStore(store.pool)
        self.redis = redis
        self.engine = engine
        self.relay = RedisRelay(self.store, redis, settings, engine)
        self.webhooks = WebhookDispatcher(self.store, settings, engine)
        self.trimmer = OutboxTrimmer(self.store, settings)
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.relay.run(), name="event-relay"),
            asyncio.create_task(self.webhooks.record(), name="webhook-record"),
            asyncio.create_task(self.webhooks.send(), name="webhook-send"),
            asyncio.create_task(self.trimmer.run(), name="outbox-trim"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded, so a consumer that failed to stop cannot hold up the shutdown.
            _, stuck = await asyncio.wait(self._tasks, timeout=STOP_TASKS_SECONDS_MAX)
            for task in stuck:
                log.error("event task did not stop", task=task.get_name())
        self._tasks = []
        # A cancelled query hands its connection back in a task of its own; let those finish
        # before the store closes the pool under them.
        pool = self.store.pool
        deadline = asyncio.get_running_loop().time() + STOP_RELEASE_SECONDS_MAX
        while pool.get_idle_size() < pool.get_size() and \
                asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
