"""The event stream under crashes: SIGKILL of the engine and of Redis, and a paused Redis,
during publication, with a subscriber that reconnects from its last cursor.

Afterwards, for every shard, the Redis stream holds each committed transfer exactly once, in
shard sequence order 1, 2, 3, ... without a gap (the published mark and the entries change in
one Redis script, so an ambiguous timeout cannot publish a commit twice); and the subscriber,
resuming from the cursor of the last event it saw, received every committed transfer with no
gap and none twice.
"""
from __future__ import annotations

import asyncio
import random

import asyncpg
import grpc
import pytest
import redis

from chaos.controllers import EngineController, RedisController
from engine.events.relay import PUBLISHED_KEY, STREAM_KEY
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id

pytestmark = pytest.mark.chaos
SHARDS = 4
BATCH = 200
LENGTHS = [pytest.param(3, id="short"), pytest.param(12, id="long", marks=pytest.mark.slow)]


class Writer:
    """Batched CreateTransfers in a loop; a failed request is sent again with the same ids."""

    def __init__(self, accounts: list[bytes], seed: int):
        self.accounts = accounts
        self.rng = random.Random(seed)
        self.address: str | None = None
        self.acknowledged = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        request = None
        while not self.stop.is_set():
            if request is None:
                request = pb.CreateTransfersRequest(transfers=[
                    pb.Transfer(id=new_id(), debit_account_id=d, credit_account_id=c, amount=1,
                                ledger=1, code=1)
                    for d, c in (self.rng.sample(self.accounts, 2) for _ in range(BATCH))])
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                    await stub.CreateTransfers(request, timeout=5)
                self.acknowledged += BATCH
                request = None
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.05)


class Subscriber:
    """SubscribeEvents from the start; reconnects after any failure from its last cursor."""

    def __init__(self):
        self.address: str | None = None
        self.events: list[pb.Event] = []
        self.reconnects = 0

    async def run(self) -> None:
        while True:
            request = pb.SubscribeEventsRequest(types=[pb.EVENT_TYPE_TRANSFER_COMMITTED])
            if self.events:
                request.after.CopyFrom(self.events[-1].cursor)
            try:
                async with grpc.aio.insecure_channel(self.address) as channel:
                    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                    async for response in stub.SubscribeEvents(request):
                        self.events.extend(response.events)
            except grpc.aio.AioRpcError:
                self.reconnects += 1
                await asyncio.sleep(0.1)


async def committed_transfers(url: str) -> dict[int, list[tuple[int, bytes]]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT seq_shard, seq, id FROM transfers ORDER BY seq_shard, seq")
    finally:
        await conn.close()
    out: dict[int, list[tuple[int, bytes]]] = {s: [] for s in range(SHARDS)}
    for r in rows:
        out[r["seq_shard"]].append((r["seq"], r["id"].bytes))
    return out


@pytest.mark.parametrize("rounds", LENGTHS)
async def test_kills_during_publication_lose_and_repeat_nothing(chaos_postgres, tmp_path, rounds):
    database = await chaos_postgres.create_database(f"events_{random.randrange(10**9)}")
    url = chaos_postgres.admin_url(database)
    redis_server = RedisController()
    await asyncio.to_thread(redis_server.start)
    engine = EngineController(chaos_postgres.url(database), redis_server.url, shards=SHARDS, log_path=tmp_path / "engine.log")
    writer = Writer([new_id() for _ in range(50)], seed=rounds)
    subscriber = Subscriber()
    tasks: list[asyncio.Task] = []
    try:
        address = await asyncio.to_thread(engine.start)
        assert address, "\n".join(engine.lines[-20:])
        async with grpc.aio.insecure_channel(address) as channel:
            await ledger_pb2_grpc.LedgerServiceStub(channel).CreateAccounts(
                pb.CreateAccountsRequest(accounts=[pb.Account(id=i, ledger=1, code=1)
                                                   for i in writer.accounts]))
        writer.address = subscriber.address = address
        tasks = [asyncio.create_task(writer.run()), asyncio.create_task(subscriber.run())]
        rng = random.Random(rounds)
        for round_ in range(rounds):
            await asyncio.sleep(rng.uniform(0.5, 1.0))
            redis_server.pause()  # scripts in flight time out: their outcome is unknown
            await asyncio.sleep(rng.uniform(1.2, 2.0))
            redis_server.resume()
            await asyncio.sleep(rng.uniform(0.3, 0.8))
            engine.kill9()  # in the middle of commits and of publication
            address = await asyncio.to_thread(engine.start)
            assert address, "\n".join(engine.lines[-20:])
            writer.address = subscriber.address = address
            await asyncio.sleep(rng.uniform(0.3, 0.8))
            if round_ % 2:
                # Redis restarts empty: the relay publishes the retained outbox again.
                redis_server.kill()
                await asyncio.sleep(0.5)
                await asyncio.to_thread(redis_server.start)
        writer.stop.set()
        await asyncio.wait_for(tasks[0], 60)

        committed = await committed_transfers(url)
        total = sum(len(v) for v in committed.values())
        assert total >= writer.acknowledged > 0
        client = redis.Redis.from_url(redis_server.url)
        conn = await asyncpg.connect(url)
        try:
            latest = await conn.fetchval("SELECT max(commit_timestamp) FROM event_outbox")
        finally:
            await conn.close()

        async def published() -> None:
            while int(client.get(PUBLISHED_KEY) or 0) < latest:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(published(), 60)
        for shard in range(SHARDS):
            streamed = [(e.seq, e.transfer.id)
                        for _, fields in client.xrange(STREAM_KEY.format(shard=shard))
                        for e in pb.EventBatch.FromString(fields[b"events"]).events
                        if e.type == pb.EVENT_TYPE_TRANSFER_COMMITTED]
            assert streamed == committed[shard], f"shard {shard}: stream differs from the ledger"
            assert [s for s, _ in streamed] == list(range(1, len(streamed) + 1))

        async def caught_up() -> None:
            while len(subscriber.events) < total:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(caught_up(), 60)
        received = {s: [] for s in range(SHARDS)}
        for e in subscriber.events:
            received[e.shard].append((e.seq, e.transfer.id))
        assert received == committed, "the resuming subscriber saw a gap or a repeat"
        assert subscriber.reconnects >= rounds
        print(f"  events: {total} transfers, {engine.kills} engine kills, "
              f"{subscriber.reconnects} subscriber reconnects")
    finally:
        for task in tasks:
            task.cancel()
        engine.kill9()
        redis_server.close()
