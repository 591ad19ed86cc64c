"""The committed-event stream through the real server: the outbox, SubscribeEvents with resume,
the Redis streams and balance projection, and eventually consistent lookups."""
from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import redis.asyncio as aioredis

from engine.events.relay import LEDGER_KEY, PUBLISHED_KEY, STREAM_KEY
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from engine.server import app as app_module
from harness import account, transfer

T = pb.EventType
PENDING = pb.TRANSFER_FLAGS_PENDING
POST = pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER


async def collect(stub, count: int, after: pb.EventCursor | None = None,
                  types=()) -> list[pb.Event]:
    """The first `count` events of a subscription (a bounded wait: the stream is live)."""
    request = pb.SubscribeEventsRequest(types=types)
    if after is not None:
        request.after.CopyFrom(after)
    call = stub.SubscribeEvents(request)
    events: list[pb.Event] = []

    async def read():
        async for response in call:
            events.extend(response.events)
            if len(events) >= count:
                return

    try:
        await asyncio.wait_for(read(), 60)
    finally:
        call.cancel()
    return events


async def ledger_activity(stub) -> dict:
    """Accounts, plain and two-phase transfers, a failed transfer and a closure."""
    a, b, c = account(), account(), account(flags=pb.ACCOUNT_FLAGS_HISTORY)
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[a, b, c]))
    plain = [transfer(a.id, b.id, 10 + i) for i in range(5)]
    await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=plain))
    hold = transfer(b.id, c.id, 7, flags=PENDING)
    failed = transfer(a.id, new_id(), 1)  # credit account not found: no event
    await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[hold, failed]))
    post = pb.Transfer(id=new_id(), pending_id=hold.id, flags=POST, amount=5)
    await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[post]))
    await stub.CloseAccounts(pb.CloseAccountsRequest(ids=[a.id]))
    await stub.CloseAccounts(pb.CloseAccountsRequest(ids=[a.id]))  # already closed: no event
    return {"accounts": [a, b, c], "transfers": [*plain, hold, post]}


async def test_events_in_commit_order_with_balances(stub):
    made = await ledger_activity(stub)
    events = await collect(stub, 3 + 7 + 1)
    assert [e.type for e in events] == (
        [T.EVENT_TYPE_ACCOUNT_CREATED] * 3 + [T.EVENT_TYPE_TRANSFER_COMMITTED] * 7
        + [T.EVENT_TYPE_ACCOUNT_CLOSED])
    assert [e.account.id for e in events[:3]] == [a.id for a in made["accounts"]]
    assert [e.transfer.id for e in events[3:10]] == [t.id for t in made["transfers"]]
    cursors = [(e.cursor.commit_timestamp, e.cursor.index) for e in events]
    assert cursors == sorted(set(cursors))
    # Per shard, transfers are numbered 1, 2, 3, ... in commit order.
    seqs: dict[int, list[int]] = {}
    for e in events[3:10]:
        seqs.setdefault(e.shard, []).append(e.seq)
    assert all(s == list(range(1, len(s) + 1)) for s in seqs.values())
    # The balances after the last change of each account are its current balances.
    last: dict[bytes, pb.AccountBalance] = {}
    for e in events[3:10]:
        last[e.transfer.debit_account_id] = e.debit_account_balance
        last[e.transfer.credit_account_id] = e.credit_account_balance
    looked = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=list(last)))
    for found in looked.accounts:
        b = last[found.id]
        assert (b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted) == (
            found.debits_pending, found.debits_posted, found.credits_pending, found.credits_posted)
    post = events[9]
    assert post.transfer.amount == 5 and post.credit_account_balance.credits_pending == 0
    assert events[10].account.flags & pb.ACCOUNT_FLAGS_CLOSED


async def test_resume_from_any_cursor_has_no_gap(stub):
    await ledger_activity(stub)
    everything = await collect(stub, 11)
    for k in (0, 3, 7, 10):
        resumed = await collect(stub, 11 - k - 1 or 1, after=everything[k].cursor) if k < 10 else []
        assert resumed == everything[k + 1:]
    only_closures = await collect(stub, 1, types=[T.EVENT_TYPE_ACCOUNT_CLOSED])
    assert only_closures == [everything[10]]


async def test_redis_streams_and_projection(stub, engine_app):
    made = await ledger_activity(stub)
    events = await collect(stub, 11)
    last_commit = events[-1].cursor.commit_timestamp
    redis = engine_app.redis
    while int(await redis.get(PUBLISHED_KEY) or 0) < last_commit:
        await asyncio.sleep(0.01)
    published = []
    for shard in range(engine_app.store.shard_count):
        for entry_id, fields in await redis.xrange(STREAM_KEY.format(shard=shard)):
            batch = pb.EventBatch.FromString(fields[b"events"])
            if batch.events[0].cursor.commit_timestamp < events[0].cursor.commit_timestamp:
                continue  # an earlier test's database (the Redis is the session's)
            assert entry_id == f"{batch.events[0].cursor.commit_timestamp}-0".encode()
            assert {e.shard for e in batch.events} == {shard}
            published.extend(batch.events)
    published.sort(key=lambda e: (e.cursor.commit_timestamp, e.cursor.index))
    assert published == events
    relay = engine_app.events.relay
    assert relay.commits_published >= 5
    while relay.lag_seconds(time.time_ns()) != 0:  # caught up: no commit left to publish
        await asyncio.sleep(0.01)
    ids = [a.id for a in made["accounts"]]
    strong = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=ids))
    eventual = await stub.LookupAccounts(pb.LookupAccountsRequest(
        ids=ids, consistency=pb.CONSISTENCY_EVENTUAL, min_version=last_commit))
    assert list(eventual.accounts) == list(strong.accounts)
    assert eventual.version >= last_commit and strong.version == 0


async def test_eventual_lookup_never_older_than_min_version(stub, engine_app):
    a, b = account(), account()
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[a, b]))
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(
        transfers=[transfer(a.id, b.id, 3)]))
    seen = response.results[0].timestamp
    # Whatever the relay has published so far, the answer reflects the transfer.
    for _ in range(20):
        looked = await stub.LookupAccounts(pb.LookupAccountsRequest(
            ids=[a.id], consistency=pb.CONSISTENCY_EVENTUAL, min_version=seen))
        assert looked.version >= seen and looked.accounts[0].debits_posted == 3


async def test_bad_subscription_requests_are_rejected(stub):
    with pytest.raises(grpc.aio.AioRpcError) as bad_type:
        await collect(stub, 1, types=[99])
    assert bad_type.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as bad_consistency:
        await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[new_id()], consistency=7))
    assert bad_consistency.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_expiry_and_reopen_events(engine_app, stub):
    a, b = account(), account()
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[a, b]))
    hold = transfer(a.id, b.id, 40, flags=PENDING, timeout_seconds=60)
    await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[hold]))
    moved = time.time_ns() + 120 * 10**9
    engine_app.engine.clock = lambda: moved  # the commit loop expires the reservation
    expired = await collect(stub, 1, types=[T.EVENT_TYPE_TRANSFER_EXPIRED])
    await stub.CloseAccounts(pb.CloseAccountsRequest(ids=[b.id]))
    await stub.ReopenAccounts(pb.ReopenAccountsRequest(ids=[b.id]))
    events = await collect(stub, 6)
    assert [e.type for e in events] == [
        T.EVENT_TYPE_ACCOUNT_CREATED, T.EVENT_TYPE_ACCOUNT_CREATED,
        T.EVENT_TYPE_TRANSFER_COMMITTED, T.EVENT_TYPE_TRANSFER_EXPIRED,
        T.EVENT_TYPE_ACCOUNT_CLOSED, T.EVENT_TYPE_ACCOUNT_REOPENED]
    assert events[3] == expired[0]
    assert expired[0].transfer.id == hold.id and expired[0].timestamp >= moved
    assert expired[0].debit_account_balance.debits_pending == 0
    assert expired[0].credit_account_balance.credits_pending == 0
    assert events[2].debit_account_balance.debits_pending == 40
    assert events[4].account.flags & pb.ACCOUNT_FLAGS_CLOSED
    assert not events[5].account.flags & pb.ACCOUNT_FLAGS_CLOSED


async def test_trimmed_cursor_is_out_of_range(stub, engine_app):
    await ledger_activity(stub)
    events = await collect(stub, 11)
    store = engine_app.events.store
    await store.set_progress("redis", events[-1].cursor.commit_timestamp)
    await store.set_progress("webhooks", events[-1].cursor.commit_timestamp)
    # Trim the commit of the three accounts: a cursor in it can no longer resume (the engine
    # cannot tell whether events of that commit followed it), one in the next commit can.
    assert await store.trim(events[2].cursor.commit_timestamp, 1000) == 1
    for cursor in (events[0].cursor, events[2].cursor):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await collect(stub, 1, after=cursor)
        assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert await collect(stub, 7, after=events[3].cursor) == events[4:]
    assert (await collect(stub, 1))[0] == events[3]  # no cursor: the oldest retained event


async def test_a_commit_larger_than_a_response_spans_several(stub):
    accounts = [account() for _ in range(20)]
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=accounts))
    ids = [a.id for a in accounts]
    requests = [pb.CreateTransfersRequest(transfers=[
        transfer(ids[k % 20], ids[(k + 1) % 20], 1, user_data=b"u" * 16) for k in range(8_190)])
        for _ in range(3)]
    # Three requests sent at once are usually committed together (up to 32,768 transfers).
    await asyncio.gather(*(stub.CreateTransfers(r) for r in requests))
    call = stub.SubscribeEvents(pb.SubscribeEventsRequest(types=[T.EVENT_TYPE_TRANSFER_COMMITTED]))
    sizes, seen = [], 0
    async for response in call:
        sizes.append(len(response.events))
        seen += len(response.events)
        if seen >= 3 * 8_190:
            call.cancel()
            break
    assert seen == 3 * 8_190 and max(sizes) <= 8_190


async def test_the_relay_refuses_a_redis_that_holds_another_ledger(settings):
    """A Redis left by another ledger database (here: its mark far in the future, which would
    make the relay skip every commit of this one) is refused, commits go on, and once the
    operator empties it the relay claims it and publishes everything retained."""
    redis = aioredis.Redis.from_url(settings.redis_url)
    await redis.set(LEDGER_KEY, "another-ledger")
    await redis.set(PUBLISHED_KEY, 2**62)
    app = await app_module.start(settings)
    try:
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            a, b = account(), account()
            await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[a, b]))
            paid = transfer(a.id, b.id, 5)
            reply = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[paid]))
            assert reply.results[0].result == pb.TRANSFER_RESULT_OK
            committed = reply.results[0].timestamp
            await asyncio.sleep(1.0)
            assert await redis.get(LEDGER_KEY) == b"another-ledger"
            assert int(await redis.get(PUBLISHED_KEY)) == 2**62
            assert app.events.relay.commits_published == 0

            await redis.flushdb()
            for _ in range(1000):
                if int(await redis.get(PUBLISHED_KEY) or 0) >= committed:
                    break
                await asyncio.sleep(0.02)
            instance = await app.events.store.ledger_instance()
            assert (await redis.get(LEDGER_KEY)).decode() == instance
            streamed = [pb.EventBatch.FromString(fields[b"events"])
                        for shard in range(app.store.shard_count)
                        for _, fields in await redis.xrange(STREAM_KEY.format(shard=shard))]
            transfers = [e.transfer.id for batch in streamed for e in batch.events
                         if e.type == T.EVENT_TYPE_TRANSFER_COMMITTED]
            assert transfers == [paid.id]
    finally:
        await app.stop(0)
        await redis.aclose()


async def test_a_large_commits_outbox_row_is_stored_uncompressed(stub, db):
    """A batch's balance records (64 bytes a transfer) go out of line without pglz, which would
    otherwise compress them on the commit's critical path (migration 0006)."""
    a, b = account(), account()
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[a, b]))
    transfers = [transfer(a.id, b.id, 1 + i % 100) for i in range(2_000)]
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers))
    assert {r.result for r in response.results} == {pb.TRANSFER_RESULT_OK}
    size, compression = await db.fetchrow(
        "SELECT length(transfer_balances), pg_column_compression(transfer_balances) "
        "FROM event_outbox WHERE transfer_count = 2000")
    assert size == 64 * 2_000 and compression is None
