"""The Python SDK (clients/python, `txengine_client`) against a real engine: every RPC through
`Client` and `AsyncClient` with typed results, errors carrying field violations, auto-batching
that really coalesces (counted at the engine), retries across SIGKILL and restart that never
apply a transfer twice, TLS/mTLS with token and correlation-id metadata, txctl and the
quickstart example.

GetAccountTransfers, GetAccountBalances and StreamTransfers are UNIMPLEMENTED in this engine
version. Their tests against the engine are skipped by a probe that calls each RPC once and
sees UNIMPLEMENTED, so they run as soon as the engine serves them. Until then a stand-in
LedgerService in front of the real engine (StreamTransfers as one CreateTransfers per request,
the history RPCs over canned rows) shows the SDK's side of the contract.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict

import grpc
import pytest
from harness import ROOT, START_TIMEOUT_SECONDS, EngineProcess
from txengine_client import (
    BATCH_ITEMS_MAX,
    Account,
    AccountBalance,
    AccountFilter,
    AccountFlags,
    AccountResult,
    AsyncClient,
    Client,
    ClientOptions,
    CreateResult,
    DeadlineExceeded,
    InvalidArgument,
    RetryPolicy,
    Transfer,
    TransferFlags,
    TransferResult,
    Unavailable,
    Unimplemented,
    as_id,
    new_id,
)

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc

SDK_ROOT = ROOT / "clients" / "python"
DMNEC = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
NO_RETRY = RetryPolicy(attempts_max=1)


# -- the probe -----------------------------------------------------------------------------------

def _probe_unimplemented() -> set[str]:
    """The RPCs this engine version answers UNIMPLEMENTED: each is called once through the SDK
    on the engine's own servicer in a throwaway server with no storage behind it. A served RPC
    fails there some other way (it reaches for the missing engine), which counts as served."""
    from engine.server.servicer import LedgerServicer

    async def probe() -> set[str]:
        server = grpc.aio.server()
        ledger_pb2_grpc.add_LedgerServiceServicer_to_server(
            LedgerServicer.__new__(LedgerServicer), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        options = ClientOptions(retry=NO_RETRY, deadline_s=5)
        one = [[Transfer(debit_account_id=1, credit_account_id=2, amount=1, ledger=1, code=1)]]
        unimplemented = set()
        try:
            async with AsyncClient(f"127.0.0.1:{port}", options=options) as client:
                calls = {
                    "GetAccountTransfers": client.get_account_transfers(as_id(1)),
                    "GetAccountBalances": client.get_account_balances(as_id(1)),
                    "StreamTransfers": client.stream_transfers(one).__anext__(),
                }
                for name, call in calls.items():
                    try:
                        await asyncio.wait_for(call, 10)
                    except Unimplemented:
                        unimplemented.add(name)
                    except Exception:  # noqa: BLE001, S110 - anything else: served
                        pass
        finally:
            await server.stop(0)
        return unimplemented

    result: list[set[str]] = []
    thread = threading.Thread(target=lambda: result.append(asyncio.run(probe())))
    thread.start()
    thread.join(60)
    return result[0] if result else set()


UNIMPLEMENTED_RPCS = _probe_unimplemented()


def served(rpc: str):
    return pytest.mark.skipif(rpc in UNIMPLEMENTED_RPCS,
                              reason=f"{rpc} is UNIMPLEMENTED in this engine version")


# -- helpers -------------------------------------------------------------------------------------

def accounts(count: int, **fields) -> list[Account]:
    return [Account(ledger=1, code=10, **fields) for _ in range(count)]


def transfer(debit: Account, credit: Account, amount: int, **fields) -> Transfer:
    return Transfer(debit_account_id=debit.id, credit_account_id=credit.id, amount=amount,
                    ledger=1, code=1, **fields)


def names(results: list[CreateResult]) -> list[str]:
    return [r.result.name for r in results]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- values without a server -------------------------------------------------------------------

def test_enums_mirror_the_proto_without_prefixes():
    from txengine_client import AccountFilterFlags

    for sdk_enum, proto_name, prefix in [
        (AccountResult, "AccountResult", "ACCOUNT_RESULT_"),
        (TransferResult, "TransferResult", "TRANSFER_RESULT_"),
        (AccountFlags, "AccountFlags", "ACCOUNT_FLAGS_"),
        (TransferFlags, "TransferFlags", "TRANSFER_FLAGS_"),
        (AccountFilterFlags, "AccountFilterFlags", "ACCOUNT_FILTER_FLAGS_"),
    ]:
        proto = {v.name.removeprefix(prefix): v.number
                 for v in pb.DESCRIPTOR.enum_types_by_name[proto_name].values}
        proto = {("NONE" if name == "UNSPECIFIED" and "Flags" in proto_name else name): number
                 for name, number in proto.items()}
        assert {m.name: m.value for m in sdk_enum.__members__.values()} == proto, proto_name


def test_ids_are_time_ordered_strictly_increasing_and_convert():
    made = [new_id() for _ in range(20_000)]
    assert all(a.int < b.int for a, b in itertools.pairwise(made))
    assert {i.version for i in made} == {7}
    assert abs((made[-1].int >> 80) - time.time_ns() // 1_000_000) < 60_000
    one = as_id(1)
    assert as_id(one) is one
    assert as_id(b"\x00" * 15 + b"\x01") == one == as_id("00000000-0000-0000-0000-000000000001")
    assert one.bytes == (1).to_bytes(16, "big")
    for bad in (-1, 2**128, b"\x01" * 15):
        with pytest.raises(ValueError):
            as_id(bad)
    assert Transfer(id=5, debit_account_id=b"\x00" * 15 + b"\x02", credit_account_id=one,
                    amount=1, ledger=1, code=1).id == as_id(5)


# -- every served RPC --------------------------------------------------------------------------

async def test_async_client_serves_every_rpc_with_typed_results(engine_app):
    async with AsyncClient(engine_app.address) as client:
        alice, bob = accounts(2)
        guarded = Account(ledger=1, code=10, flags=DMNEC | AccountFlags.HISTORY,
                          user_data=b"guard")
        results = await client.create_accounts([alice, bob, guarded, Account(ledger=0, code=1)])
        assert names(results) == ["OK", "OK", "OK", "LEDGER_MUST_NOT_BE_ZERO"]
        assert [r.index for r in results] == [0, 1, 2, 3]
        assert all(isinstance(r.result, AccountResult) for r in results)
        assert results[0].timestamp > 0 and results[3].timestamp == 0
        assert (await client.create_account(alice)).exists

        pay = transfer(alice, guarded, 70, user_data=b"\x01" * 16)
        [ok] = await client.create_transfers([pay])
        assert ok.ok and ok.is_ok_or_exists and isinstance(ok.result, TransferResult)
        [again] = await client.create_transfers([pay])
        assert again.exists and again.is_ok_or_exists and again.timestamp == ok.timestamp
        [changed] = await client.create_transfers([pay.replace(amount=71)])
        assert changed.result is TransferResult.EXISTS_WITH_DIFFERENT_AMOUNT
        assert not changed.is_ok_or_exists
        chain = [transfer(guarded, bob, 50, flags=TransferFlags.LINKED),
                 transfer(guarded, bob, 50)]
        assert names(await client.create_transfers(chain)) == [
            "LINKED_EVENT_FAILED", "EXCEEDS_CREDITS"]
        single = await client.create_transfer(transfer(guarded, bob, 20))
        assert single.ok and single.index == 0

        found = await client.lookup_accounts([alice.id, new_id(), guarded.id])
        assert [a.id for a in found] == [alice.id, guarded.id]
        assert (found[0].debits_posted, found[1].credits_posted, found[1].debits_posted) == (
            70, 70, 20)
        assert found[1].flags == DMNEC | AccountFlags.HISTORY
        assert found[1].user_data == b"guard" and found[1].timestamp == results[2].timestamp
        [stored] = await client.lookup_transfers([pay.id, chain[0].id])
        assert stored == pay.replace(timestamp=ok.timestamp)
        assert stored.pending_id is None and stored.flags is TransferFlags.NONE


async def test_sync_client_serves_every_rpc_with_typed_results(engine_app):
    def scenario() -> None:
        with Client(engine_app.address) as client:
            alice, bob = accounts(2)
            assert names(client.create_accounts([alice, bob])) == ["OK", "OK"]
            assert client.create_account(bob).exists
            batch = [transfer(alice, bob, 5), transfer(alice, alice, 5),
                     transfer(alice, bob, 0), transfer(bob, alice, 2)]
            results = client.create_transfers(batch)
            assert names(results) == ["OK", "ACCOUNTS_MUST_BE_DIFFERENT",
                                      "AMOUNT_MUST_NOT_BE_ZERO", "OK"]
            assert [r.index for r in results] == [0, 1, 2, 3]
            assert client.create_transfer(batch[0]).exists
            assert client.create_transfer(transfer(alice, bob, 1)).ok
            found = client.lookup_accounts([bob.id, alice.id])
            assert [(a.id, a.debits_posted, a.credits_posted) for a in found] == [
                (bob.id, 2, 6), (alice.id, 6, 2)]
            stored = client.lookup_transfers([t.id for t in batch])
            assert [t.id for t in stored] == [batch[0].id, batch[3].id]
            assert stored[1] == batch[3].replace(timestamp=results[3].timestamp)
            assert client.lookup_transfers([]) == []

    await asyncio.to_thread(scenario)


# -- errors ------------------------------------------------------------------------------------

async def test_invalid_requests_raise_with_field_violations_and_apply_nothing(engine_app):
    alice, bob = accounts(2)
    batch = [transfer(alice, bob, 1), transfer(alice, bob, 1, user_data=b"x" * 17)]
    async with AsyncClient(engine_app.address) as client:
        await client.create_accounts([alice, bob])
        with pytest.raises(InvalidArgument) as caught:
            await client.create_transfers(batch, correlation_id="test-corr-1")
        error = caught.value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [v.field for v in error.violations] == ["transfers[1].user_data"]
        assert "16 bytes" in error.violations[0].description
        assert error.reason == "INVALID_REQUEST" and error.attempts == 1
        assert error.correlation_id == "test-corr-1" and "test-corr-1" in str(error)
        assert await client.lookup_transfers([t.id for t in batch]) == []
        with pytest.raises(InvalidArgument) as caught:
            await client.create_transfers([transfer(alice, bob, 1)] * (BATCH_ITEMS_MAX + 1))
        assert [v.field for v in caught.value.violations] == ["transfers"]

    def sync_side() -> None:
        with Client(engine_app.address) as client:
            with pytest.raises(InvalidArgument) as caught:
                client.create_accounts([Account(ledger=1, code=1, user_data=b"y" * 20)])
            assert [v.field for v in caught.value.violations] == ["accounts[0].user_data"]

    await asyncio.to_thread(sync_side)


async def test_unavailable_and_deadline_exceeded_are_retried_a_bounded_number_of_times(
        engine_app):
    quick = RetryPolicy(attempts_max=3, backoff_initial_s=0.01, backoff_max_s=0.02)
    nobody = f"127.0.0.1:{free_port()}"
    async with AsyncClient(nobody, options=ClientOptions(retry=quick)) as client:
        with pytest.raises(Unavailable) as caught:
            await client.lookup_accounts([new_id()])
        assert caught.value.attempts == 3
    async with AsyncClient(engine_app.address, options=ClientOptions(retry=quick)) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            await client.lookup_accounts([new_id()], deadline_s=1e-6)
        assert caught.value.attempts == 3

    def sync_side() -> None:
        with Client(nobody, options=ClientOptions(retry=quick)) as client:
            with pytest.raises(Unavailable) as caught:
                client.create_transfer(Transfer(debit_account_id=1, credit_account_id=2,
                                                amount=1, ledger=1, code=1))
            assert caught.value.attempts == 3

    await asyncio.to_thread(sync_side)


# -- auto-batching -----------------------------------------------------------------------------

async def test_auto_batching_coalesces_concurrent_single_transfers(engine_app, monkeypatch):
    """500 concurrent create_transfer calls become a handful of CreateTransfers requests (each
    request is one engine.create_transfers call), and each caller gets its own result."""
    engine = engine_app.engine
    requests: list[int] = []
    original = engine.create_transfers

    async def counting(columns):
        requests.append(len(columns))
        return await original(columns)

    monkeypatch.setattr(engine, "create_transfers", counting)
    rng = random.Random(5)
    async with AsyncClient(engine_app.address) as client:
        pool = accounts(10)
        await client.create_accounts(pool)
        unknown = Account(ledger=1, code=10)
        sent = []
        for i in range(500):
            debit, credit = rng.sample(pool, 2)
            if i % 50 == 7:
                sent.append(transfer(debit, credit, 0))  # AMOUNT_MUST_NOT_BE_ZERO
            elif i % 50 == 8:
                sent.append(transfer(debit, unknown, 3))  # CREDIT_ACCOUNT_NOT_FOUND
            else:
                sent.append(transfer(debit, credit, rng.randint(1, 100)))
        results = await asyncio.gather(*(client.create_transfer(t) for t in sent))

    assert 1 <= len(requests) <= 10, requests
    assert sum(requests) == 500
    for i, result in enumerate(results):
        expected = {7: "AMOUNT_MUST_NOT_BE_ZERO", 8: "CREDIT_ACCOUNT_NOT_FOUND"}.get(i % 50, "OK")
        assert (result.result.name, result.index) == (expected, 0), i
    stamps = [r.timestamp for r in results if r.ok]
    assert len(set(stamps)) == len(stamps) == 480

    async with AsyncClient(engine_app.address) as client:
        balances = {a.id: a for a in await client.lookup_accounts([a.id for a in pool])}
    debits, credits = defaultdict(int), defaultdict(int)
    for t, r in zip(sent, results):
        if r.ok:
            debits[t.debit_account_id] += t.amount
            credits[t.credit_account_id] += t.amount
    for account in balances.values():
        assert (account.debits_posted, account.credits_posted) == (
            debits[account.id], credits[account.id])


async def test_auto_batching_keeps_a_malformed_transfer_from_failing_its_neighbours(engine_app):
    async with AsyncClient(engine_app.address) as client:
        alice, bob = accounts(2)
        await client.create_accounts([alice, bob])
        sent = [transfer(alice, bob, 1, user_data=b"z" * (17 if i in (3, 31) else 4))
                for i in range(40)]
        outcomes = await asyncio.gather(*(client.create_transfer(t) for t in sent),
                                        return_exceptions=True)
        for i, outcome in enumerate(outcomes):
            if i in (3, 31):
                assert isinstance(outcome, InvalidArgument), outcome
                assert [v.field for v in outcome.violations] == ["transfers[0].user_data"]
            else:
                assert isinstance(outcome, CreateResult) and outcome.ok, (i, outcome)
        with pytest.raises(ValueError, match="LINKED"):
            await client.create_transfer(transfer(alice, bob, 1, flags=TransferFlags.LINKED))
    # Closing a client sends what is still waiting for its (here very long) window.
    async with AsyncClient(engine_app.address,
                           options=ClientOptions(batch_window_s=300)) as client:
        late = [asyncio.ensure_future(client.create_transfer(transfer(alice, bob, 2)))
                for _ in range(5)]
        await asyncio.sleep(0)
        assert not any(f.done() for f in late)
    assert all(r.ok for r in await asyncio.wait_for(asyncio.gather(*late), 10))


# -- retries across SIGKILL --------------------------------------------------------------------

class FixedPortEngine(EngineProcess):
    """The engine subprocess on the same port across restarts, so one client channel reaches
    every incarnation (the harness lets each start pick a new port). The launch is the
    harness's own, with the port as the only difference."""

    def __init__(self, *args, port: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.port = port

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> str:
        env = {**os.environ, "TXENGINE_LOG_FORMAT": "json", **self.extra_env}
        self._serving.clear()
        self.address = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--listen", f"127.0.0.1:{self.port}",
             "--database-url", self.database_url, "--redis-url", self.redis_url,
             "--shards", str(self.shards)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if not self._serving.wait(timeout):
            self.kill()
            raise RuntimeError("engine did not start:\n" + "\n".join(self.lines[-40:]))
        return self.address


# Loaded by the engine subprocess (PYTHONPATH): holds back the answer, not the commit, of the
# first CreateTransfers whose first transfer carries DELAY_ACK as user_data, so that the test
# can SIGKILL the engine between commit and acknowledgement. A marker file per batch makes the
# delay happen once across restarts, so the retry is answered.
DELAY_ACK = b"delay-ack"
FAULT_SITECUSTOMIZE = """
import asyncio, os, pathlib
import grpc, grpc.aio

_server = grpc.aio.server
_done = pathlib.Path(os.environ["TXENGINE_TEST_FAULT_DIR"])


class _DelayAck(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.endswith("/CreateTransfers"):
            return handler
        inner = handler.unary_unary

        async def answer(request, context):
            response = await inner(request, context)
            parsed = request
            if isinstance(request, bytes):  # the engine parses request bodies itself
                from engine.gen.txengine.v1 import ledger_pb2
                parsed = ledger_pb2.CreateTransfersRequest.FromString(request)
            first = parsed.transfers[0] if parsed.transfers else None
            if first is not None and first.user_data == DELAY_ACK:
                marker = _done / first.id.hex()
                if not marker.exists():
                    marker.touch()
                    await asyncio.sleep(3600)
            return response

        return grpc.unary_unary_rpc_method_handler(
            answer, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


def _server_with_fault(*args, interceptors=(), **kwargs):
    return _server(*args, interceptors=[*(interceptors or ()), _DelayAck()], **kwargs)


grpc.aio.server = _server_with_fault
""".replace("DELAY_ACK", repr(DELAY_ACK))


async def test_retries_across_sigkill_and_restart_never_apply_a_transfer_twice(
        database_url, redis_url, db, tmp_path):
    """A sender keeps one request in flight through the blocking client while the engine is
    SIGKILLed and restarted five times: three times right after a request has committed and
    before it is answered (fault injection holds the answer back), twice at a random moment.
    Every call ends OK or EXISTS, the three whose answers were lost exactly EXISTS, every
    transfer is stored once, and the balances are the sums of the distinct transfers."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAULT_SITECUSTOMIZE)
    (tmp_path / "faults").mkdir()
    engine = FixedPortEngine(database_url, redis_url, shards=4, port=free_port(), extra_env={
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "TXENGINE_TEST_FAULT_DIR": str(tmp_path / "faults")})
    patient = ClientOptions(deadline_s=10, reconnect_backoff_max_s=0.5, retry=RetryPolicy(
        attempts_max=200, backoff_initial_s=0.05, backoff_max_s=0.5))
    rng = random.Random(9)
    pool = accounts(6)
    held_back = (8, 20, 32)
    batches = []
    for i in range(40):
        batch = [transfer(*rng.sample(pool, 2), rng.randint(1, 1_000)) for _ in range(20)]
        batch[0] = batch[0].replace(flags=TransferFlags.LINKED,  # a chain of two per request
                                    user_data=DELAY_ACK if i in held_back else b"")
        batches.append(batch)
    outcomes: list[list[CreateResult]] = []
    failure: list[BaseException] = []

    async def committed(batch: list[Transfer]) -> None:
        deadline = time.monotonic() + 60
        while not await db.fetchval("SELECT count(*) FROM transfers WHERE id = $1", batch[0].id):
            assert time.monotonic() < deadline and not failure, failure or "never committed"
            await asyncio.sleep(0.005)

    async def progress(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(outcomes) < count and not failure:
            assert time.monotonic() < deadline, "the sender made no progress"
            await asyncio.sleep(0.005)

    async def restart() -> None:
        await asyncio.to_thread(engine.kill)
        await asyncio.to_thread(engine.start)

    try:
        address = await asyncio.to_thread(engine.start)
        with Client(address, options=patient) as client:
            assert names(await asyncio.to_thread(client.create_accounts, pool)) == ["OK"] * 6

            def send() -> None:
                try:
                    for batch in batches:
                        outcomes.append(client.create_transfers(batch))
                except BaseException as error:  # noqa: BLE001 - reported by the test
                    failure.append(error)

            sender = threading.Thread(target=send)
            sender.start()
            for index in held_back:
                await committed(batches[index])
                await restart()  # committed, answer held back: the retry must find it
                await progress(index + 4)
                await asyncio.sleep(rng.uniform(0, 0.05))
                if index != held_back[-1]:
                    await restart()  # whatever is in flight now
            await asyncio.to_thread(sender.join, 180)
            assert not sender.is_alive(), "the sender did not finish"
            assert not failure, failure

            results = [r for out in outcomes for r in out]
            assert len(results) == sum(len(b) for b in batches)
            assert all(r.is_ok_or_exists for r in results), names(results)
            for index in held_back:
                assert names(outcomes[index]) == ["EXISTS"] * len(batches[index]), index
            sent = [t for batch in batches for t in batch]
            stored = await asyncio.to_thread(client.lookup_transfers, [t.id for t in sent])
            assert stored == [t.replace(timestamp=r.timestamp) for t, r in zip(sent, results)]
            debits, credits = defaultdict(int), defaultdict(int)
            for t in sent:
                debits[t.debit_account_id] += t.amount
                credits[t.credit_account_id] += t.amount
            for account in await asyncio.to_thread(client.lookup_accounts,
                                                   [a.id for a in pool]):
                assert (account.debits_posted, account.credits_posted) == (
                    debits[account.id], credits[account.id])
    finally:
        await asyncio.to_thread(engine.kill)
    assert await db.fetchval("SELECT count(*) FROM transfers") == len(sent)


# -- TLS, mTLS, token and correlation ids ------------------------------------------------------

class StandIn(ledger_pb2_grpc.LedgerServiceServicer):
    """A LedgerService in front of the real engine, for what the engine cannot show yet:
    creates and lookups are forwarded; StreamTransfers is one CreateTransfers per request,
    answered in order (the contract's semantics); the history RPCs page through `history`
    (canned rows, by timestamp) and record the filters they get. It records every call's
    metadata, and `break_stream_after` aborts the first stream UNAVAILABLE after that many
    answers, right after committing the next request (so its answer is lost)."""

    def __init__(self, engine_address: str):
        self.channel = grpc.aio.insecure_channel(engine_address)
        self.engine = ledger_pb2_grpc.LedgerServiceStub(self.channel)
        self.metadata: list[dict[str, str]] = []
        self.filters: list[pb.AccountFilter] = []
        self.history = [pb.Transfer(id=as_id(1000 + i).bytes, amount=i + 1, ledger=1,
                                    code=i % 3 + 1, debit_account_id=as_id(1).bytes,
                                    credit_account_id=as_id(2).bytes, timestamp=1000 + i)
                        for i in range(25)]
        self.break_stream_after: int | None = None
        self.streams = 0

    def _seen(self, context) -> None:
        self.metadata.append(dict(context.invocation_metadata()))

    async def CreateAccounts(self, request, context):
        self._seen(context)
        return await self.engine.CreateAccounts(request)

    async def CreateTransfers(self, request, context):
        self._seen(context)
        return await self.engine.CreateTransfers(request)

    async def LookupAccounts(self, request, context):
        self._seen(context)
        return await self.engine.LookupAccounts(request)

    async def LookupTransfers(self, request, context):
        self._seen(context)
        return await self.engine.LookupTransfers(request)

    def _page(self, account_filter: pb.AccountFilter) -> list[pb.Transfer]:
        self.filters.append(account_filter)
        low, high = account_filter.timestamp_min, account_filter.timestamp_max
        rows = [t for t in self.history if t.timestamp >= low and (not high or t.timestamp <= high)]
        if account_filter.flags & pb.ACCOUNT_FILTER_FLAGS_REVERSED:
            rows.reverse()
        return rows[:account_filter.limit]

    async def GetAccountTransfers(self, request, context):
        self._seen(context)
        return pb.GetAccountTransfersResponse(transfers=self._page(request.filter))

    async def GetAccountBalances(self, request, context):
        self._seen(context)
        return pb.GetAccountBalancesResponse(balances=[
            pb.AccountBalance(timestamp=t.timestamp, debits_posted=t.amount, credits_pending=7)
            for t in self._page(request.filter)])

    async def StreamTransfers(self, request_iterator, context):
        self._seen(context)
        self.streams += 1
        answered = 0
        async for request in request_iterator:
            response = await self.engine.CreateTransfers(
                pb.CreateTransfersRequest(transfers=request.transfers))
            if self.break_stream_after is not None and answered == self.break_stream_after:
                self.break_stream_after = None
                await context.abort(grpc.StatusCode.UNAVAILABLE, "stand-in: stream broken")
            answered += 1
            yield pb.StreamTransfersResponse(results=response.results)


async def serve_stand_in(stand_in: StandIn, credentials=None) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    ledger_pb2_grpc.add_LedgerServiceServicer_to_server(stand_in, server)
    if credentials is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return server, port


def make_certificates(directory: pathlib.Path) -> dict[str, bytes]:
    """A throwaway CA, a server certificate for localhost and a client certificate."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
            "-subj", "/CN=txengine test CA")
    for name, extension in [("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
                            ("client", "extendedKeyUsage=clientAuth")]:
        (directory / f"{name}.ext").write_text(extension + "\n")
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "1",
                "-extfile", f"{name}.ext")
    return {p.stem + p.suffix: p.read_bytes() for p in directory.glob("*.*")}


@pytest.mark.skipif(shutil.which("openssl") is None,
                    reason="needs the openssl command to make certificates")
async def test_mutual_tls_token_and_correlation_ids(engine_app, tmp_path):
    pems = make_certificates(tmp_path)
    stand_in = StandIn(engine_app.address)
    credentials = grpc.ssl_server_credentials(
        [(pems["server.key"], pems["server.pem"])], root_certificates=pems["ca.pem"],
        require_client_auth=True)
    server, port = await serve_stand_in(stand_in, credentials)
    try:
        mtls = ClientOptions(root_certificates=tmp_path / "ca.pem",
                             certificate_chain=pems["client.pem"],
                             private_key=str(tmp_path / "client.key"), token="s3cret")
        async with AsyncClient(f"localhost:{port}", options=mtls) as client:
            [result] = await client.create_accounts([Account(ledger=1, code=1)],
                                                    correlation_id="corr-42")
            assert result.ok
            await client.lookup_accounts([new_id()])
        first, second = stand_in.metadata
        assert first["authorization"] == "Bearer s3cret"
        assert first["x-correlation-id"] == "corr-42"
        assert len(second["x-correlation-id"]) == 32  # made per call when not given
        assert second["x-correlation-id"] != "corr-42"

        def sync_side() -> None:
            with Client(f"localhost:{port}", options=mtls) as client:
                assert client.lookup_transfers([new_id()]) == []
            # Without a client certificate the handshake fails: no call reaches the service.
            tls_only = ClientOptions(root_certificates=pems["ca.pem"], retry=NO_RETRY)
            with Client(f"localhost:{port}", options=tls_only) as client, \
                    pytest.raises(Unavailable):
                client.lookup_transfers([new_id()])

        await asyncio.to_thread(sync_side)
        assert len(stand_in.metadata) == 3
    finally:
        await server.stop(0)
        await stand_in.channel.close()


# -- streaming and history: the stand-in until the engine serves them ----------------------

async def test_stream_transfers_pipelines_in_order_and_resends_after_a_break(engine_app):
    stand_in = StandIn(engine_app.address)
    server, port = await serve_stand_in(stand_in)
    try:
        alice, bob = accounts(2)
        batches = [[transfer(alice, bob, 1) for _ in range(i % 4 + 1)] for i in range(12)]
        batches[5][0] = transfer(alice, alice, 1)  # ACCOUNTS_MUST_BE_DIFFERENT

        async def produce():
            for batch in batches:
                await asyncio.sleep(0)
                yield batch

        async with AsyncClient(f"127.0.0.1:{port}") as client:
            await client.create_accounts([alice, bob])
            stand_in.break_stream_after = 4
            answers = [r async for r in client.stream_transfers(produce(), in_flight_max=3)]
        assert stand_in.streams == 2  # broken once, reopened once
        assert [len(a) for a in answers] == [len(b) for b in batches]
        for i, answer in enumerate(answers):
            assert [r.index for r in answer] == list(range(len(batches[i])))
            expected = ["OK"] * len(batches[i])
            if i == 5:
                expected[0] = "ACCOUNTS_MUST_BE_DIFFERENT"
            if i == 4:  # committed, then its answer was lost: the resend finds it
                expected = ["EXISTS"] * len(batches[i])
            assert names(answer) == expected, i

        def sync_side() -> list[list[CreateResult]]:
            with Client(f"127.0.0.1:{port}") as client:
                stand_in.break_stream_after = 2
                return list(client.stream_transfers(iter(batches[:5]), in_flight_max=2))

        again = await asyncio.to_thread(sync_side)
        assert stand_in.streams == 4
        assert [names(a) for a in again] == [["EXISTS"] * len(b) for b in batches[:5]]

        sent = [t for b in batches for t in b if t.debit_account_id != t.credit_account_id]
        async with AsyncClient(engine_app.address) as client:
            found = await client.lookup_accounts([alice.id])
        assert found[0].debits_posted == len(sent)

        # A failing batches iterable ends the stream with its own error; leaving early ends it.
        def endless():
            while True:
                yield [transfer(alice, bob, 1)]

        def broken_sync():
            yield batches[0]
            raise RuntimeError("no more batches")

        async def broken():
            yield batches[0]
            raise RuntimeError("no more batches")

        async with AsyncClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(RuntimeError, match="no more batches"):
                async for _ in client.stream_transfers(broken()):
                    pass
            async for answer in client.stream_transfers(endless()):
                assert names(answer) == ["OK"]
                break

        def sync_endings() -> None:
            with Client(f"127.0.0.1:{port}") as client:
                with pytest.raises(RuntimeError, match="no more batches"):
                    for _ in client.stream_transfers(broken_sync()):
                        pass
                for answer in client.stream_transfers(endless()):
                    assert names(answer) == ["OK"]
                    break

        await asyncio.to_thread(sync_endings)
    finally:
        await server.stop(0)
        await stand_in.channel.close()


async def test_history_queries_encode_the_filter_and_page_by_timestamp(engine_app):
    stand_in = StandIn(engine_app.address)
    server, port = await serve_stand_in(stand_in)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            page = await client.get_account_transfers(AccountFilter(
                account_id=1, timestamp_min=1003, timestamp_max=1020, limit=5, credits=False,
                code=2, user_data=b"u"))
            assert [t.timestamp for t in page] == [1003, 1004, 1005, 1006, 1007]
            assert isinstance(page[0], Transfer) and page[0].id == as_id(1003)
            sent = stand_in.filters[-1]
            assert (sent.account_id, sent.timestamp_min, sent.timestamp_max, sent.limit,
                    sent.flags, sent.code, sent.user_data) == (
                as_id(1).bytes, 1003, 1020, 5, pb.ACCOUNT_FILTER_FLAGS_DEBITS, 2, b"u")
            every = [t.timestamp async for t in client.iter_account_transfers(
                AccountFilter(account_id=1, limit=4, reversed=True))]
            assert every == list(range(1024, 999, -1))
            balances = await client.get_account_balances(as_id(1))
            assert balances[0] == AccountBalance(timestamp=1000, debits_pending=0,
                                                 debits_posted=1, credits_pending=7,
                                                 credits_posted=0)
            assert stand_in.filters[-1].limit == BATCH_ITEMS_MAX
            assert stand_in.filters[-1].flags == (pb.ACCOUNT_FILTER_FLAGS_DEBITS
                                                  | pb.ACCOUNT_FILTER_FLAGS_CREDITS)

        def sync_side() -> None:
            with Client(f"127.0.0.1:{port}") as client:
                every = [b.timestamp for b in client.iter_account_balances(
                    AccountFilter(account_id=1, limit=10, timestamp_min=1005))]
                assert every == list(range(1005, 1025))
                assert len(client.get_account_transfers(1)) == 25

        await asyncio.to_thread(sync_side)
    finally:
        await server.stop(0)
        await stand_in.channel.close()


# -- streaming and history against the engine (run once the engine serves them) -----------

@served("StreamTransfers")
async def test_stream_transfers_against_the_engine(engine_app):
    alice, bob = accounts(2)
    batches = [[transfer(alice, bob, 2) for _ in range(50)] for _ in range(20)]
    async with AsyncClient(engine_app.address) as client:
        await client.create_accounts([alice, bob])
        answers = [a async for a in client.stream_transfers(batches, in_flight_max=4)]
        assert [names(a) for a in answers] == [["OK"] * 50] * 20
        [found] = await client.lookup_accounts([alice.id])
        assert found.debits_posted == 2 * 50 * 20

    def sync_side() -> None:
        with Client(engine_app.address) as client:
            again = list(client.stream_transfers(batches[:5]))
            assert [names(a) for a in again] == [["EXISTS"] * 50] * 5

    await asyncio.to_thread(sync_side)


@served("GetAccountTransfers")
async def test_get_account_transfers_against_the_engine(engine_app):
    alice, bob, carol = accounts(3)
    async with AsyncClient(engine_app.address) as client:
        await client.create_accounts([alice, bob, carol])
        sent = []
        for i in range(12):
            t = transfer(alice, bob, i + 1) if i % 3 else transfer(carol, alice, i + 1)
            [result] = await client.create_transfers([t])
            sent.append(t.replace(timestamp=result.timestamp))
        mine = [t for t in sent if alice.id in (t.debit_account_id, t.credit_account_id)]
        assert await client.get_account_transfers(alice.id) == mine
        page = await client.get_account_transfers(AccountFilter(
            account_id=alice.id, limit=3, credits=False, reversed=True))
        assert page == [t for t in reversed(mine) if t.debit_account_id == alice.id][:3]
        assert [t async for t in client.iter_account_transfers(
            AccountFilter(account_id=alice.id, limit=2))] == mine

    def sync_side() -> None:
        with Client(engine_app.address) as client:
            assert client.get_account_transfers(alice.id) == mine
            assert list(client.iter_account_transfers(
                AccountFilter(account_id=alice.id, limit=5))) == mine

    await asyncio.to_thread(sync_side)


@served("GetAccountBalances")
async def test_get_account_balances_against_the_engine(engine_app):
    alice = Account(ledger=1, code=10, flags=AccountFlags.HISTORY)
    bob = Account(ledger=1, code=10)
    async with AsyncClient(engine_app.address) as client:
        await client.create_accounts([alice, bob])
        stamps = []
        for amount in (5, 7, 11):
            [result] = await client.create_transfers([transfer(alice, bob, amount)])
            stamps.append(result.timestamp)
        history = await client.get_account_balances(alice.id)
        assert [(b.timestamp, b.debits_posted) for b in history] == list(
            zip(stamps, [5, 12, 23]))
        assert all(isinstance(b, AccountBalance) for b in history)

    def sync_side() -> None:
        with Client(engine_app.address) as client:
            assert client.get_account_balances(alice.id) == history

    await asyncio.to_thread(sync_side)


# -- txctl and the quickstart ------------------------------------------------------------------

async def run(*args: str, env: dict | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(process.communicate(), 60)
    return process.returncode, out.decode(), err.decode()


async def test_txctl_creates_and_looks_up_with_tables_and_json(engine_app):
    txctl = [sys.executable, "-m", "txengine_client.cli", "--address", engine_app.address]
    alice, bob = str(new_id()), str(new_id())
    for account_id, flags in [(alice, "history"), (bob, "debits-must-not-exceed-credits")]:
        code, out, err = await run(*txctl, "accounts", "create", "--ledger", "1", "--code", "7",
                                   "--flags", flags, "--id", account_id)
        assert code == 0 and account_id in out and " OK " in out, err
    code, out, _ = await run(*txctl, "--json", "transfers", "create", "--debit", alice,
                             "--credit", bob, "--amount", "250", "--ledger", "1", "--code", "3",
                             "--id", "0x77", "--user-data", "beef")
    [created] = json.loads(out)
    assert code == 0 and created["result"] == "OK" and created["timestamp"] > 0
    assert created["id"] == "00000000-0000-0000-0000-000000000077"
    code, out, _ = await run(*txctl, "--json", "transfers", "create", "--debit", alice,
                             "--credit", bob, "--amount", "250", "--ledger", "1", "--code", "3",
                             "--id", "119", "--user-data", "beef")
    assert code == 0 and json.loads(out)[0]["result"] == "EXISTS"
    code, out, _ = await run(*txctl, "transfers", "create", "--debit", bob, "--credit", alice,
                             "--amount", "251", "--ledger", "1", "--code", "3")
    assert code == 1 and "EXCEEDS_CREDITS" in out
    code, out, _ = await run(*txctl, "accounts", "get", alice, bob)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["ID", "LEDGER", "CODE", "FLAGS"]
    assert lines[1].split()[:6] == [alice, "1", "7", "HISTORY", "0", "250"]
    assert lines[2].split()[3] == "DEBITS_MUST_NOT_EXCEED_CREDITS"
    code, out, err = await run(*txctl, "--json", "transfers", "get", "0x77", str(new_id()))
    [stored] = json.loads(out)
    assert code == 1 and "not found" in err
    assert (stored["amount"], stored["user_data"], stored["debit_account_id"]) == (
        250, "beef", alice)
    code, _, err = await run(*txctl, "transfers", "create", "--debit", alice, "--credit", bob,
                             "--amount", "1", "--ledger", "1", "--code", "3",
                             "--user-data", "00" * 17)
    assert code == 3 and "INVALID_ARGUMENT" in err and "transfers[0].user_data" in err
    code, _, err = await run(*txctl, "accounts", "get", "not-an-id")
    assert code == 2


@served("GetAccountTransfers")
@served("GetAccountBalances")
async def test_txctl_history_commands(engine_app):
    txctl = [sys.executable, "-m", "txengine_client.cli", "--address", engine_app.address]
    alice, bob = Account(ledger=1, code=1, flags=AccountFlags.HISTORY), Account(ledger=1, code=1)
    async with AsyncClient(engine_app.address) as client:
        await client.create_accounts([alice, bob])
        await client.create_transfers([transfer(alice, bob, 9), transfer(bob, alice, 4)])
    code, out, _ = await run(*txctl, "--json", "account-transfers", str(alice.id))
    assert code == 0 and [t["amount"] for t in json.loads(out)] == [9, 4]
    code, out, _ = await run(*txctl, "balances", str(alice.id), "--reversed")
    assert code == 0 and out.splitlines()[1].split()[1:5] == ["0", "9", "0", "4"]


async def test_quickstart_example_runs(engine_app):
    code, out, err = await run(sys.executable, str(SDK_ROOT / "examples" / "quickstart.py"),
                               env={"TXENGINE_ADDRESS": engine_app.address})
    assert code == 0, out + err
    assert "EXISTS" in out and "balances" in out


async def test_close_and_reopen_accounts(engine_app):
    from txengine_client import AsyncClient, ClosureResult

    async with AsyncClient(engine_app.address) as client:
        account, other = Account(ledger=1, code=1), Account(ledger=1, code=1)
        await client.create_accounts([account, other])
        closed = await client.close_accounts([account.id, account.id, new_id()])
        assert [(c.index, c.result) for c in closed] == [
            (0, ClosureResult.OK), (1, ClosureResult.OK), (2, ClosureResult.ACCOUNT_NOT_FOUND)]
        [refused] = await client.create_transfers([Transfer(
            debit_account_id=account.id, credit_account_id=other.id, amount=1, ledger=1, code=1)])
        assert refused.result is TransferResult.DEBIT_ACCOUNT_CLOSED
        assert (await client.reopen_accounts([account.id]))[0].ok
        [moved] = await client.create_transfers([Transfer(
            debit_account_id=account.id, credit_account_id=other.id, amount=1, ledger=1, code=1)])
        assert moved.ok
