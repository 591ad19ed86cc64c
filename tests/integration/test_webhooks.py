"""Webhooks through the real server to a real HTTP receiver on loopback: signed deliveries,
retries of failed attempts, one acknowledged delivery per event, dead letters and replay."""
from __future__ import annotations

import asyncio
import collections
import http.server
import json
import threading

import grpc
import pytest
import pytest_asyncio

from engine.config import Settings
from engine.events.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, verify_signature
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.server import app as app_module
from harness import account, transfer

SECRET = b"s3cret-for-the-webhook-tests"


class Receiver:
    """An HTTP server on loopback that answers 500 to the first `failures` attempts of each
    event, then 200; it records every attempt and verifies every signature."""

    def __init__(self, failures: int):
        self.failures = failures
        self.attempts: collections.Counter[str] = collections.Counter()
        self.acknowledged: collections.Counter[str] = collections.Counter()
        self.bodies: dict[str, dict] = {}
        self.bad_signatures = 0
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                event_id = self.headers[EVENT_ID_HEADER]
                if not verify_signature(SECRET, body, self.headers[SIGNATURE_HEADER]):
                    receiver.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                receiver.attempts[event_id] += 1
                ok = receiver.attempts[event_id] > receiver.failures
                if ok:
                    receiver.acknowledged[event_id] += 1
                    receiver.bodies[event_id] = json.loads(body)
                self.send_response(200 if ok else 500)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest_asyncio.fixture
async def hooked(database_url, redis_url, tmp_path):
    settings = Settings(listen="127.0.0.1:0", database_url=database_url, redis_url=redis_url,
                        data_dir=tmp_path, shards=4, lease_wait_seconds=5,
                        webhook_backoff_base_seconds=0.02, webhook_attempts_max=4)
    app = await app_module.start(settings)
    async with grpc.aio.insecure_channel(app.address) as channel:
        yield app, ledger_pb2_grpc.LedgerServiceStub(channel)
    await app.stop(0)


async def until(predicate, what: str) -> None:
    """Wait for a condition that the engine brings about in the background (bounded)."""
    async def poll():
        while not predicate():
            await asyncio.sleep(0.02)
    try:
        await asyncio.wait_for(poll(), 60)
    except TimeoutError:
        raise AssertionError(f"never happened: {what}") from None


async def test_every_event_delivered_signed_once_despite_failures(hooked):
    app, stub = hooked
    receiver = Receiver(failures=2)
    try:
        created = await stub.CreateWebhookSubscription(pb.CreateWebhookSubscriptionRequest(
            url=receiver.url, secret=SECRET))
        listed = await stub.ListWebhookSubscriptions(pb.ListWebhookSubscriptionsRequest())
        assert [s.id for s in listed.subscriptions] == [created.subscription.id]
        a, b = account(), account()
        await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[a, b]))
        transfers = [transfer(a.id, b.id, 1 + i) for i in range(10)]
        await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers))
        await until(lambda: len(receiver.acknowledged) == 12, "12 events acknowledged")
        assert receiver.bad_signatures == 0
        assert set(receiver.acknowledged.values()) == {1}
        assert set(receiver.attempts.values()) == {3}
        delivered = sorted(receiver.bodies.values(),
                           key=lambda e: (int(e["cursor"]["commitTimestamp"]), e["cursor"].get("index", 0)))
        assert [e["type"] for e in delivered] == (
            ["EVENT_TYPE_ACCOUNT_CREATED"] * 2 + ["EVENT_TYPE_TRANSFER_COMMITTED"] * 10)
        assert [int(e["transfer"]["amount"]) for e in delivered[2:]] == list(range(1, 11))
        # The receiver counts an answer before the engine has read it and recorded it.
        while [r["status"] for r in await app.events.store.deliveries(
                created.subscription.id)] != [1] * 12:
            await asyncio.sleep(0.02)
        rows = await app.events.store.deliveries(created.subscription.id)
        assert [(r["status"], r["attempts"]) for r in rows] == [(1, 3)] * 12
    finally:
        receiver.close()


async def test_dead_letters_are_replayed_by_the_operator(hooked):
    app, stub = hooked
    receiver = Receiver(failures=4)  # as many as webhook_attempts_max: every delivery dies
    try:
        created = await stub.CreateWebhookSubscription(pb.CreateWebhookSubscriptionRequest(
            url=receiver.url, secret=SECRET, types=[pb.EVENT_TYPE_ACCOUNT_CREATED]))
        subscription = created.subscription.id
        await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account(), account()]))

        async def statuses():
            return [r["status"] for r in await app.events.store.deliveries(subscription)]

        while await statuses() != [2, 2]:
            await asyncio.sleep(0.02)
        assert not receiver.acknowledged
        replayed = await stub.ReplayWebhookDeliveries(pb.ReplayWebhookDeliveriesRequest(
            subscription_id=subscription))
        assert replayed.replayed == 2
        while await statuses() != [1, 1]:
            await asyncio.sleep(0.02)
        assert len(receiver.acknowledged) == 2
        deleted = await stub.DeleteWebhookSubscription(pb.DeleteWebhookSubscriptionRequest(
            id=subscription))
        assert deleted.deleted
    finally:
        receiver.close()


def test_signature_rejects_tampering_and_replay():
    from engine.events.webhooks import sign

    header = sign(SECRET, b"{}", 1_000_000)
    assert verify_signature(SECRET, b"{}", header, now_seconds=1_000_010)
    assert not verify_signature(SECRET, b"{ }", header, now_seconds=1_000_010)
    assert not verify_signature(b"another secret..", b"{}", header, now_seconds=1_000_010)
    assert not verify_signature(SECRET, b"{}", header, now_seconds=1_000_000 + 301)
    assert not verify_signature(SECRET, b"{}", "garbage", now_seconds=1_000_000)


@pytest.mark.parametrize("request_fields, field", [
    ({"url": "ftp://example.com/x", "secret": SECRET}, "url"),
    ({"url": "http://127.0.0.1/x", "secret": b"short"}, "secret"),
    ({"url": "http://127.0.0.1/x", "secret": SECRET, "types": [42]}, "types[0]"),
])
async def test_bad_subscriptions_are_rejected(stub, request_fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await stub.CreateWebhookSubscription(pb.CreateWebhookSubscriptionRequest(**request_fields))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in error.value.details()
    listed = await stub.ListWebhookSubscriptions(pb.ListWebhookSubscriptionsRequest())
    assert not listed.subscriptions
