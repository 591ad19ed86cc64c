"""Overload: bounded shard queues and a bounded number of concurrent RPCs.

An engine with shard_queue_items_max=8,190 (one full batch per shard) and
rpc_concurrency_max=32 is flooded with concurrent 8,190-transfer requests. Beyond the limits
the engine answers RESOURCE_EXHAUSTED at once (with google.rpc.RetryInfo when the refusal is
the engine's queue limit) and never anything but OK or RESOURCE_EXHAUSTED; afterwards every
acknowledged transfer is stored exactly once and nothing of a refused request is; the process's
memory stays bounded. A request whose deadline expires while it waits in the queue ends with
DEADLINE_EXCEEDED and its transfers are all committed or all absent.

Timings and memory are printed (pytest -s); only generous liveness and memory bounds are
asserted.
"""
from __future__ import annotations

import asyncio
import collections
import statistics
import time
import uuid

import grpc
import psutil
import pytest
from google.rpc import error_details_pb2, status_pb2

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from engine.posting.batch import shards_of
from engine.server import app as app_module

BATCH_MAX = 8_190
CLIENTS = 48
ROUNDS = 2
RSS_BOUND_BYTES = 2 * 1024**3
LIVENESS_SECONDS = 120
GRPC_LIMIT_MESSAGE = "Concurrent RPC limit exceeded"


def retry_info(error: grpc.aio.AioRpcError) -> error_details_pb2.RetryInfo | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    info = error_details_pb2.RetryInfo()
                    detail.Unpack(info)
                    return info
    return None


@pytest.fixture
async def overload_app(settings):
    app = await app_module.start(settings.model_copy(update={
        "shard_queue_items_max": BATCH_MAX, "rpc_concurrency_max": 32}))
    yield app
    await app.stop(0)


async def accounts_by_shard(stub, shard_count: int, per_shard: int = 2) -> dict[int, list[bytes]]:
    """Accounts of ledger 1, `per_shard` in each shard."""
    by_shard: dict[int, list[bytes]] = collections.defaultdict(list)
    while min((len(by_shard[s]) for s in range(shard_count)), default=0) < per_shard:
        candidates = [new_id() for _ in range(64)]
        for account_id, shard in zip(candidates, shards_of(candidates, shard_count).tolist()):
            if len(by_shard[shard]) < per_shard:
                by_shard[shard].append(account_id)
    ids = [i for ids in by_shard.values() for i in ids]
    response = await stub.CreateAccounts(pb.CreateAccountsRequest(
        accounts=[pb.Account(id=i, ledger=1, code=1) for i in ids]))
    assert {r.result for r in response.results} == {pb.ACCOUNT_RESULT_OK}
    return by_shard


def batch(debit: bytes, credit: bytes, size: int = BATCH_MAX) -> pb.CreateTransfersRequest:
    return pb.CreateTransfersRequest(transfers=[
        pb.Transfer(id=new_id(), debit_account_id=debit, credit_account_id=credit, amount=1,
                    ledger=1, code=1) for _ in range(size)])


class RssSampler:
    def __init__(self):
        self.process = psutil.Process()
        self.samples = [self.process.memory_info().rss]
        self._task = asyncio.create_task(self._run())

    async def _run(self):
        while True:
            self.samples.append(self.process.memory_info().rss)
            await asyncio.sleep(0.1)

    async def stop(self) -> int:
        self._task.cancel()
        self.samples.append(self.process.memory_info().rss)
        return max(self.samples)


async def test_flood_is_refused_at_once_and_nothing_is_lost_or_duplicated(overload_app, db):
    app = overload_app
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        by_shard = await accounts_by_shard(stub, app.engine.shard_count)
        shards = sorted(by_shard)
        # Debit and credit accounts in different shards: one request holds 8,190 items of each
        # of two shard queues, so that one request alone fits (see the same-shard test below).
        pairs = [(by_shard[s][0], by_shard[shards[(i + 1) % len(shards)]][1])
                 for i, s in enumerate(shards)]
        requests = [batch(*pairs[i % len(pairs)]) for i in range(CLIENTS * ROUNDS)]
        sampler = RssSampler()
        outcomes: list[tuple[pb.CreateTransfersRequest, str, float, object]] = []

        async def client(index: int):
            for round_ in range(ROUNDS):
                request = requests[round_ * CLIENTS + index]
                began = time.monotonic()
                try:
                    response = await stub.CreateTransfers(request, timeout=LIVENESS_SECONDS)
                    outcomes.append((request, "OK", time.monotonic() - began, response))
                except grpc.aio.AioRpcError as error:
                    outcomes.append((request, error.code().name, time.monotonic() - began, error))

        began = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(CLIENTS))),
                               LIVENESS_SECONDS)
        flood_seconds = time.monotonic() - began
        peak_rss = await sampler.stop()

    codes = collections.Counter(code for _, code, _, _ in outcomes)
    kinds = collections.Counter()
    for _, code, _, result in outcomes:
        if code == "RESOURCE_EXHAUSTED":
            if retry_info(result) is not None:
                kinds["engine queue limit (RetryInfo)"] += 1
            elif GRPC_LIMIT_MESSAGE in (result.details() or ""):
                kinds["grpc maximum_concurrent_rpcs (no details)"] += 1
            else:
                kinds[f"other: {result.details()}"] += 1
    latency = {code: statistics.median(s for _, c, s, _ in outcomes if c == code) for code in codes}
    print(f"\nflood: {len(outcomes)} requests of {BATCH_MAX} in {flood_seconds:.1f}s; codes {dict(codes)}; "
          f"refusals {dict(kinds)}; median seconds {({k: round(v, 3) for k, v in latency.items()})}; "
          f"peak RSS {peak_rss / 2**20:.0f} MiB")

    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] >= 1 and codes["RESOURCE_EXHAUSTED"] >= 1, codes
    assert not [k for k in kinds if k.startswith("other")], kinds
    for _, code, _, result in outcomes:
        if code == "OK":
            assert {r.result for r in result.results} == {pb.TRANSFER_RESULT_OK}
    assert peak_rss < RSS_BOUND_BYTES

    # Every acknowledged transfer exactly once, nothing of a refused request.
    acknowledged = [uuid.UUID(bytes=t.id) for r, code, _, _ in outcomes if code == "OK"
                    for t in r.transfers]
    refused = [uuid.UUID(bytes=t.id) for r, code, _, _ in outcomes if code != "OK" for t in r.transfers]
    assert await db.fetchval("SELECT count(*) FROM transfers") == len(acknowledged)
    assert await db.fetchval(
        "SELECT count(DISTINCT id) FROM transfers WHERE id = ANY($1::uuid[])", acknowledged) == len(acknowledged)
    assert await db.fetchval("SELECT count(*) FROM transfers WHERE id = ANY($1::uuid[])", refused) == 0
    # And the balances agree: one unit per acknowledged transfer on each side.
    assert await db.fetchval("SELECT sum(debits_posted) FROM accounts") == len(acknowledged)
    assert await db.fetchval("SELECT sum(credits_posted) FROM accounts") == len(acknowledged)


async def test_a_deadline_that_expires_in_the_queue(overload_app, db):
    """The client gets DEADLINE_EXCEEDED; the request's transfers commit entirely or not at all."""
    app = overload_app
    seen = collections.Counter()
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        by_shard = await accounts_by_shard(stub, app.engine.shard_count)
        shards = sorted(by_shard)
        big_pair = (by_shard[shards[0]][0], by_shard[shards[1]][0])
        small_pair = (by_shard[shards[2]][0], by_shard[shards[3]][0])
        expired: list[pb.CreateTransfersRequest] = []
        for _ in range(10):
            ahead = asyncio.ensure_future(stub.CreateTransfers(batch(*big_pair), timeout=LIVENESS_SECONDS))
            # The big request is queued or, with the engine idle, already committing: either way
            # the next one waits behind it.
            while not (app.engine.queue_depths().get(shards[0]) or app.engine._busy) and not ahead.done():
                await asyncio.sleep(0.001)
            short = batch(*small_pair, size=200)
            try:
                await stub.CreateTransfers(short, timeout=0.02)
                seen["OK"] += 1
            except grpc.aio.AioRpcError as error:
                seen[error.code().name] += 1
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    expired.append(short)
            seen[f"ahead:{(await ahead).__class__.__name__}"] += 1
            if len(expired) >= 3:
                break
        deadline = time.monotonic() + LIVENESS_SECONDS
        while (app.engine.queue_depths() and any(app.engine.queue_depths().values())) or app.engine._busy:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        print(f"\nshort deadlines: {dict(seen)}")
        assert expired, f"no request expired while queued: {dict(seen)}"
        assert set(k for k in seen if not k.startswith("ahead")) <= {"OK", "DEADLINE_EXCEEDED"}, seen
        committed = []
        for request in expired:
            ids = [t.id for t in request.transfers]
            found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=ids))
            assert len(found.transfers) in (0, len(ids)), "a request committed in part"
            committed.append(len(found.transfers) == len(ids))
        print(f"expired requests committed anyway: {committed}")


async def test_one_full_batch_between_accounts_of_one_shard_fits_an_empty_queue(overload_app, db):
    """shard_queue_items_max >= BATCH_ITEMS_MAX is meant to let any single request in
    (engine/limits.py: "one request must fit a shard queue"; config.py enforces it).

    FAILS: PostingEngine.create_transfers (engine/posting/engine.py) counts a transfer once for
    its debit account's shard and once more for its credit account's shard, so an 8,190-transfer
    request whose two accounts share a shard needs 16,380 items of that shard's queue and is
    refused with RESOURCE_EXHAUSTED on an idle engine, every time: retrying can never succeed."""
    app = overload_app
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        by_shard = await accounts_by_shard(stub, app.engine.shard_count)
        debit, credit = by_shard[0][:2]
        response = await stub.CreateTransfers(batch(debit, credit), timeout=LIVENESS_SECONDS)
        assert {r.result for r in response.results} == {pb.TRANSFER_RESULT_OK}
