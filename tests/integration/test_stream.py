"""StreamTransfers through the real server: pipelined requests get one response each, in
order, with the results CreateTransfers gives for the same requests (checked against a mirror
run of them through CreateTransfers on twin accounts); replays through the stream are EXISTS;
a client that stops reading makes the server stop taking its requests, holds at most 8 of them
in the engine while its results wait, and gets every one of them when it reads again; a
cancelled stream leaves each request either committed entirely or not at all, and is counted
by the server as Canceled.
"""
from __future__ import annotations

import asyncio
import gc
import random
import time

import grpc
import pytest

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from engine.observability import metrics
from engine.server.servicer import STREAM_IN_FLIGHT_MAX
from harness import account, transfer

PENDING = pb.TRANSFER_FLAGS_PENDING
POST = pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER
VOID = pb.TRANSFER_FLAGS_VOID_PENDING_TRANSFER
LINKED = pb.TRANSFER_FLAGS_LINKED
DMNEC = pb.ACCOUNT_FLAGS_DEBITS_MUST_NOT_EXCEED_CREDITS
OK = pb.TRANSFER_RESULT_OK
EXISTS = pb.TRANSFER_RESULT_EXISTS


async def open_accounts(stub, *flags: int) -> list[bytes]:
    accounts = [account(flags=f) for f in flags]
    response = await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=accounts))
    assert [r.result for r in response.results] == [pb.ACCOUNT_RESULT_OK] * len(accounts)
    return [a.id for a in accounts]


async def stream(stub, requests: list[pb.StreamTransfersRequest]) -> list[pb.StreamTransfersResponse]:
    """All requests written at once (pipelined), all responses read."""
    return [r async for r in stub.StreamTransfers(iter(requests))]


def results_of(response) -> list[tuple[int, int]]:
    return [(r.index, r.result) for r in response.results]


def script(rng: random.Random, accounts: list[bytes], count: int) -> list[list[pb.Transfer]]:
    """`count` requests of 1..5 items: funding, spending that may exceed the limit, pending
    transfers and their posts/voids from earlier requests (some twice), linked pairs, replays of
    earlier items and invalid items."""
    bank, w1, w2, shop = accounts
    requests: list[list[pb.Transfer]] = []
    pendings: list[bytes] = []
    earlier: list[pb.Transfer] = []
    for _ in range(count):
        items: list[pb.Transfer] = []
        for _ in range(rng.randint(1, 5)):
            wallet = rng.choice([w1, w2])
            kind = rng.random()
            if kind < 0.2:
                items.append(transfer(bank, wallet, rng.randint(50, 200)))
            elif kind < 0.45:
                items.append(transfer(wallet, shop, rng.randint(1, 150)))
            elif kind < 0.6:
                t = transfer(wallet, shop, rng.randint(1, 100), flags=PENDING)
                pendings.append(t.id)
                items.append(t)
            elif kind < 0.75 and pendings:
                flag = rng.choice([POST, VOID])
                items.append(pb.Transfer(id=new_id(), pending_id=rng.choice(pendings),
                                         amount=rng.choice([0, 0, 5]) if flag == POST else 0,
                                         flags=flag))
            elif kind < 0.85:
                items += [transfer(wallet, shop, rng.randint(1, 80), flags=LINKED),
                          transfer(shop, wallet, rng.randint(1, 80))]
            elif kind < 0.95 and earlier:
                original = rng.choice(earlier)
                copy = pb.Transfer()
                copy.CopyFrom(original)
                items.append(copy)
            else:
                items.append(transfer(wallet, shop, 0))
        earlier += items
        requests.append(items)
    return requests


def translate(requests: list[list[pb.Transfer]], ids: dict[bytes, bytes]) -> list[list[pb.Transfer]]:
    """The same requests on twin accounts and with fresh transfer ids (the same fresh id for
    every occurrence of an id)."""
    out = []
    for items in requests:
        twins = []
        for t in items:
            twin = pb.Transfer()
            twin.CopyFrom(t)
            for field in ("id", "debit_account_id", "credit_account_id", "pending_id"):
                value = getattr(t, field)
                if value:
                    setattr(twin, field, ids.setdefault(value, new_id()))
            twins.append(twin)
        out.append(twins)
    return out


async def test_pipelined_requests_match_create_transfers(stub):
    """50 requests written at once: 50 responses, in request order, each with exactly the
    results CreateTransfers gives for the same requests one at a time (on twin accounts);
    commit timestamps grow with the request order; replaying everything through the stream
    gives the results a CreateTransfers replay gives (EXISTS for every committed item, with its
    timestamp)."""
    accounts = await open_accounts(stub, 0, DMNEC, DMNEC, 0)
    twins = await open_accounts(stub, 0, DMNEC, DMNEC, 0)
    requests = script(random.Random(5), accounts, 50)
    mirror = translate(requests, dict(zip(accounts, twins)))

    responses = await stream(stub, [pb.StreamTransfersRequest(transfers=r) for r in requests])
    assert len(responses) == 50
    expected = []
    for items in mirror:
        response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=items))
        expected.append(results_of(response))
    assert [results_of(r) for r in responses] == expected
    got = {r for response in expected for _, r in response}
    assert {OK, EXISTS, pb.TRANSFER_RESULT_EXCEEDS_CREDITS, pb.TRANSFER_RESULT_AMOUNT_MUST_NOT_BE_ZERO,
            pb.TRANSFER_RESULT_LINKED_EVENT_FAILED} <= got, got  # the script is varied enough

    ok_stamps = [r.timestamp for response in responses for r in response.results if r.result == OK]
    assert ok_stamps == sorted(ok_stamps) and len(set(ok_stamps)) == len(ok_stamps)
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=accounts + twins))
    balances = [(a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)
                for a in found.accounts]
    assert balances[:4] == balances[4:]

    # Replays: through the stream and through CreateTransfers, the same results again; every
    # item that was OK is now EXISTS with its original timestamp.
    replays = await stream(stub, [pb.StreamTransfersRequest(transfers=r) for r in requests])
    expected = []
    for items in mirror:
        response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=items))
        expected.append(results_of(response))
    assert [results_of(r) for r in replays] == expected
    for first, again in zip(responses, replays):
        for r, replay in zip(first.results, again.results):
            if r.result == OK:
                assert (replay.result, replay.timestamp) == (EXISTS, r.timestamp)
    # Replayed items that failed the first time may commit now: the same on both sides.
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=accounts + twins))
    balances = [(a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)
                for a in found.accounts]
    assert balances[:4] == balances[4:]


async def test_a_client_that_stops_reading_holds_a_bounded_number_of_requests(engine_app, stub, db):
    """200 requests written without reading any response. The client's channel does not probe
    bandwidth, so its receive window stays at the initial 64 KiB, far less than the ~340 KB of
    responses: the server must stop taking requests until the client reads, and meanwhile never
    holds more than STREAM_IN_FLIGHT_MAX of them in the engine (sampled from its queue). Once
    the client reads, all 200 responses arrive, in order, none lost."""
    source, sink = await open_accounts(stub, 0, 0)
    per_request, count = 100, 200
    requests = [pb.StreamTransfersRequest(transfers=[transfer(source, sink, 1) for _ in range(per_request)])
                for _ in range(count)]
    engine = engine_app.engine
    channel = grpc.aio.insecure_channel(engine_app.address, options=[("grpc.http2.bdp_probe", 0)])
    call = ledger_pb2_grpc.LedgerServiceStub(channel).StreamTransfers()

    async def write_all() -> None:
        for request in requests:
            await call.write(request)
        await call.done_writing()

    writer = asyncio.ensure_future(write_all())
    try:
        # Do not read. Sample the engine's queue until the server stops committing.
        most_queued, last, still_since = 0, -1, time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            most_queued = max(most_queued, len(engine._queue))
            committed = await db.fetchval("SELECT count(*) FROM transfers")
            if committed != last:
                last, still_since = committed, time.monotonic()
            elif committed and time.monotonic() - still_since > 0.5:
                break  # the server stopped taking requests: it waits for the client to read
            await asyncio.sleep(0.005)
        print(f"\nwithout reading: {last // per_request} of {count} requests committed, "
              f"writes {'done' if writer.done() else 'blocked'}, at most {most_queued} queued")
        assert most_queued <= STREAM_IN_FLIGHT_MAX
        assert last < count * per_request, "the server took every request of a client not reading"

        responses = [r async for r in call]
        await writer
        assert await call.code() == grpc.StatusCode.OK
    finally:
        writer.cancel()
        await channel.close()
    assert len(responses) == count
    for response in responses:
        assert results_of(response) == [(i, OK) for i in range(per_request)]
    stamps = [r.timestamp for response in responses for r in response.results]
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)
    assert await db.fetchval("SELECT count(*) FROM transfers") == count * per_request
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[sink]))
    assert found.accounts[0].credits_posted == count * per_request


@pytest.mark.parametrize("read_before_cancel", [0, 10])
async def test_cancelling_a_stream_leaves_each_request_whole(stub, db, read_before_cancel):
    """A stream cancelled after some responses: every request answered is committed, every
    other request is either committed entirely or not at all, balances equal what is stored,
    and replaying everything with CreateTransfers commits the rest exactly once."""
    source, sink = await open_accounts(stub, 0, 0)
    per_request, count = 40, 60
    requests = [[transfer(source, sink, 1) for _ in range(per_request)] for _ in range(count)]
    call = stub.StreamTransfers(iter([pb.StreamTransfersRequest(transfers=r) for r in requests]))
    answered = []
    if read_before_cancel:
        async for response in call:
            answered.append(response)
            if len(answered) == read_before_cancel:
                break
    else:
        await asyncio.sleep(0.05)  # let the server take some of them
    call.cancel()
    assert await call.code() == grpc.StatusCode.CANCELLED

    # A request after the cancel commits after everything the engine had already queued.
    (barrier,) = await open_accounts(stub, 0)
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(
        transfers=[transfer(barrier, source, 1)]))
    assert response.results[0].result == OK

    stored = []
    for k, items in enumerate(requests):
        found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[t.id for t in items]))
        stored.append(len(found.transfers))
        assert stored[-1] in (0, per_request), f"request {k}: {stored[-1]} of {per_request} stored"
    assert all(n == per_request for n in stored[:len(answered)])
    committed = sum(stored)
    print(f"\ncancelled after {len(answered)} responses: {committed // per_request} of {count} "
          "requests committed")
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[sink]))
    assert found.accounts[0].credits_posted == committed

    for k, items in enumerate(requests):
        response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=items))
        assert {r.result for r in response.results} == ({EXISTS} if stored[k] else {OK})
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[sink]))
    assert found.accounts[0].credits_posted == count * per_request


def _handled(code: str) -> float:
    """grpc_server_handled_total of StreamTransfers with a grpc_code label value (the
    go-grpc-prometheus spelling: Canceled, Unknown, ...)."""
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(generate_latest(metrics.REGISTRY).decode())
               for s in family.samples}
    labels = {"grpc_type": "bidi_stream", "grpc_service": "txengine.v1.LedgerService",
              "grpc_method": "StreamTransfers", "grpc_code": code}
    return samples.get(("grpc_server_handled_total", frozenset(labels.items())), 0.0)


async def test_a_stream_cancelled_while_its_responses_wait_ends_cleanly(engine_app, stub, db):
    """A stream the client cancels while the server waits to send it responses (the client had
    stopped reading; without BDP probing the client's window stays at its initial 64 KiB, so
    the server certainly blocks): the server counts it as grpc_code Canceled (not Unknown, a
    server error), and nothing fails in the event loop while the handler is closed."""
    loop = asyncio.get_running_loop()
    loop_errors: list[dict] = []
    previous_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: loop_errors.append(context))
    try:
        source, sink = await open_accounts(stub, 0, 0)
        codes = ("Canceled", "Unknown")
        before = {code: _handled(code) for code in codes}
        requests = [pb.StreamTransfersRequest(transfers=[transfer(source, sink, 1) for _ in range(100)])
                    for _ in range(100)]
        channel = grpc.aio.insecure_channel(engine_app.address, options=[("grpc.http2.bdp_probe", 0)])
        call = ledger_pb2_grpc.LedgerServiceStub(channel).StreamTransfers(iter(requests))
        # Read nothing until the server stops committing: it is then blocked sending a response.
        last, still_since, deadline = -1, time.monotonic(), time.monotonic() + 20
        while (last <= 0 or time.monotonic() - still_since < 0.3) and time.monotonic() < deadline:
            committed = await db.fetchval("SELECT count(*) FROM transfers")
            if committed != last:
                last, still_since = committed, time.monotonic()
            await asyncio.sleep(0.01)
        assert 0 < last < 100 * 100
        call.cancel()
        assert await call.code() == grpc.StatusCode.CANCELLED
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if sum(_handled(code) - before[code] for code in codes):
                break
            await asyncio.sleep(0.02)
        await channel.close()
        gc.collect()
        await asyncio.sleep(0.1)
    finally:
        loop.set_exception_handler(previous_handler)
    assert {code: _handled(code) - before[code] for code in codes} == {"Canceled": 1, "Unknown": 0}
    assert [repr(c.get("exception") or c.get("message")) for c in loop_errors] == []
