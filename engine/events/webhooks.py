"""Webhook deliveries: recorded in Postgres from the outbox, then POSTed, signed, with retries.

Each request carries the event as JSON (protobuf JSON mapping) and the headers

* ``Txengine-Event-Id``: ``<commit_timestamp>-<index>``, the event's cursor (deduplicate on it);
* ``Txengine-Signature``: ``t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`` keyed with
  the subscription's secret. A receiver recomputes it and rejects a timestamp older than its
  tolerance (`verify_signature`), so a captured request cannot be replayed later.

A delivery is acknowledged by any 2xx answer. Otherwise it is tried again after an exponential
backoff with full jitter, and dead-lettered after `webhook_attempts_max` attempts, to be sent
again only by ReplayWebhookDeliveries.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time

import httpx
import structlog
from google.protobuf import json_format

from engine.config import Settings
from engine.events.codec import CONSUMER_GATHER_SECONDS, encode_commits
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.posting.engine import PostingEngine
from engine.storage.outbox import EventStore

log = structlog.get_logger("engine.events")

SIGNATURE_HEADER = "Txengine-Signature"
EVENT_ID_HEADER = "Txengine-Event-Id"
SIGNATURE_TOLERANCE_SECONDS = 300
DELIVERIES_PER_ROUND_MAX = 64
BACKOFF_CAP_SECONDS = 600.0
IDLE_POLL_SECONDS = 1.0
# Without subscriptions the progress only bounds outbox trimming: move it now and then.
IDLE_PROGRESS_SECONDS = 1.0


def sign(secret: bytes, body: bytes, unix_seconds: int) -> str:
    digest = hmac.new(secret, str(unix_seconds).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={unix_seconds},v1={digest}"


def verify_signature(secret: bytes, body: bytes, header: str, now_seconds: float | None = None,
                     tolerance_seconds: float = SIGNATURE_TOLERANCE_SECONDS) -> bool:
    """True when `header` signs `body` with `secret` and is at most tolerance_seconds old."""
    try:
        parts = dict(part.split("=", 1) for part in header.split(","))
        unix_seconds = int(parts["t"])
        given = parts["v1"]
    except (KeyError, ValueError):
        return False
    now = time.time() if now_seconds is None else now_seconds
    if abs(now - unix_seconds) > tolerance_seconds:
        return False
    return hmac.compare_digest(sign(secret, body, unix_seconds), f"t={unix_seconds},v1={given}")


def backoff_seconds(attempts: int, base_seconds: float, rng: random.Random = random) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^attempts)]."""
    return rng.uniform(0, min(BACKOFF_CAP_SECONDS, base_seconds * 2 ** attempts))


def event_id(event: pb.Event) -> str:
    return f"{event.cursor.commit_timestamp}-{event.cursor.index}"


class WebhookDispatcher:
    """Two loops: `record` turns outbox commits into delivery rows, `send` POSTs due ones."""

    def __init__(self, events: EventStore, settings: Settings, engine: PostingEngine):
        self.events = events
        self.settings = settings
        self.engine = engine
        self._due = asyncio.Event()
        self._idle_progress_at = 0.0

    async def record(self) -> None:
        while True:
            try:
                seen = self.engine.committed_timestamp
                position = await self.events.progress("webhooks")
                if not await self._record_some(position):
                    await self.engine.wait_for_commits(seen, IDLE_POLL_SECONDS,
                                                       CONSUMER_GATHER_SECONDS)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - Postgres down: retry later
                log.warning("webhook recording failed", error=repr(error))
                await asyncio.sleep(1.0)

    async def _record_some(self, position: int) -> bool:
        """Record the deliveries of the next commits. Commits are always read before the
        subscriptions: a subscription created after that read starts after those commits
        (its start_after is the newest commit visible at its creation), so none is missed."""
        latest = await self.events.latest_commit()
        if not await self.events.subscriptions():
            now = time.monotonic()
            if latest > position and now >= self._idle_progress_at:
                await self.events.record_deliveries([], latest)
                self._idle_progress_at = now + IDLE_PROGRESS_SECONDS
            return False
        rows, columns = await self.events.commits_after(position, 64, 32_768)
        if not rows:
            return False
        subscriptions = await self.events.subscriptions()
        deliveries = []
        for commit in encode_commits(rows, columns):
            wanted = [s for s in subscriptions if commit.commit_timestamp > s["start_after"]]
            if not wanted:
                continue
            for event in commit.messages():
                payload = None
                for s in wanted:
                    if s["event_types"] and event.type not in s["event_types"]:
                        continue
                    payload = payload or event.SerializeToString()
                    deliveries.append((s["id"], event.cursor.commit_timestamp,
                                       event.cursor.index, payload))
        await self.events.record_deliveries(deliveries, rows[-1]["commit_timestamp"])
        if deliveries:
            self._due.set()
        return True

    async def send(self) -> None:
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_seconds) as client:
            while True:
                try:
                    due = await self.events.due_deliveries(DELIVERIES_PER_ROUND_MAX)
                    if due:
                        await asyncio.gather(*(self._attempt(client, d) for d in due))
                        continue
                    wait = await self.events.next_delivery_seconds()
                    self._due.clear()
                    try:
                        # asyncio.timeout: wait_for (3.11) can lose the cancellation of stop().
                        async with asyncio.timeout(min(
                                wait if wait is not None else IDLE_POLL_SECONDS,
                                IDLE_POLL_SECONDS)):
                            await self._due.wait()
                    except TimeoutError:
                        pass
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 - Postgres down: retry later
                    log.warning("webhook sending failed", error=repr(error))
                    await asyncio.sleep(1.0)

    def wake(self) -> None:
        self._due.set()

    async def _attempt(self, client: httpx.AsyncClient, delivery) -> None:
        event = pb.Event.FromString(delivery["payload"])
        body = json_format.MessageToJson(event, indent=None).encode()
        headers = {"Content-Type": "application/json", EVENT_ID_HEADER: event_id(event),
                   SIGNATURE_HEADER: sign(delivery["secret"], body, int(time.time()))}
        error = None
        try:
            response = await client.post(delivery["url"], content=body, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except httpx.HTTPError as failure:
            error = f"{type(failure).__name__}: {failure}"
        attempts = delivery["attempts"] + 1
        retry = None
        if error is not None and attempts < self.settings.webhook_attempts_max:
            retry = backoff_seconds(attempts - 1, self.settings.webhook_backoff_base_seconds)
        key = (delivery["subscription_id"], delivery["commit_timestamp"], delivery["event_index"])
        await self.events.delivery_done(key, error is None, error, retry)
        if error is not None and retry is None:
            log.warning("webhook delivery dead-lettered", url=delivery["url"],
                        event_id=event_id(event), attempts=attempts, error=error)
