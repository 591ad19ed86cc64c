"""Restarts and faults with the engine as a real subprocess (`python -m engine serve`) on one
database: SIGTERM drains and loses nothing, SIGKILL right after an acknowledgement loses
nothing and applies nothing twice, the shard lease keeps a second process from committing
until the first is gone, a fenced commit is refused, and the engine rides out Postgres going
away (UNAVAILABLE meanwhile, recovery on its own) and Redis being absent."""
from __future__ import annotations

import asyncio
import json
import random
import threading
import urllib.parse
from collections import Counter, defaultdict

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from harness import EngineProcess, account, transfer

T_LINKED = pb.TRANSFER_FLAGS_LINKED
DMNEC = pb.ACCOUNT_FLAGS_DEBITS_MUST_NOT_EXCEED_CREDITS
OK = pb.TRANSFER_RESULT_OK
EXISTS = pb.TRANSFER_RESULT_EXISTS
KILL_CYCLES = 20


class Engine(EngineProcess):
    """An EngineProcess whose start() also returns, with None, as soon as the process exits
    without serving (so a refused start is seen at once, not after the start timeout)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._output_done: dict[object, threading.Event] = {}

    def _done(self, proc) -> threading.Event:
        return self._output_done.setdefault(proc, threading.Event())

    def _read(self, proc) -> None:
        try:
            super()._read(proc)
        finally:
            if proc is self.proc:
                self._serving.set()
            self._done(proc).set()

    def start(self, timeout: float = 60) -> str | None:
        previous = self.proc
        if previous is not None:
            # The previous process's output must be drained first: its end must not be
            # taken for the end of the new one.
            previous.wait(10)
            assert self._done(previous).wait(10)
        return super().start(timeout)

    async def astart(self, timeout: float = 60) -> str | None:
        return await asyncio.to_thread(self.start, timeout)

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    def served(self) -> bool:
        return any('"serving"' in line for line in self.lines)


@pytest.fixture
def engines(database_url, redis_url):
    made: list[Engine] = []

    def make(**env) -> Engine:
        engine = Engine(database_url, redis_url, shards=4,
                        extra_env={k: str(v) for k, v in env.items()})
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.kill()


def mod(message, **changes):
    copy = type(message)()
    copy.CopyFrom(message)
    for field, value in changes.items():
        setattr(copy, field, value)
    return copy


async def bytes_uuids(db) -> None:
    await db.set_type_codec("uuid", schema="pg_catalog", encoder=bytes, decoder=bytes,
                            format="binary")


class Client:
    def __init__(self, address: str):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)

    async def __aenter__(self) -> "Client":
        await asyncio.wait_for(self.channel.channel_ready(), 10)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.channel.close()

    async def transfers(self, items) -> list[tuple[int, int]]:
        response = await self.stub.CreateTransfers(
            pb.CreateTransfersRequest(transfers=list(items)), timeout=30)
        return [(r.result, r.timestamp) for r in response.results]

    async def accounts(self, items) -> list[tuple[int, int]]:
        response = await self.stub.CreateAccounts(
            pb.CreateAccountsRequest(accounts=list(items)), timeout=30)
        return [(r.result, r.timestamp) for r in response.results]

    async def lookup_transfers(self, ids) -> list[pb.Transfer]:
        found = []
        ids = list(ids)
        for start in range(0, len(ids), 8_000):
            response = await self.stub.LookupTransfers(
                pb.LookupTransfersRequest(ids=ids[start:start + 8_000]), timeout=30)
            found.extend(response.transfers)
        return found

    async def lookup_accounts(self, ids) -> list[pb.Account]:
        response = await self.stub.LookupAccounts(pb.LookupAccountsRequest(ids=list(ids)), timeout=30)
        return list(response.accounts)


def random_batch(rng: random.Random, ids: list[bytes], size: int) -> list[pb.Transfer]:
    """Independent transfers and one linked chain of three, among unguarded accounts."""
    batch = []
    for i in range(size):
        debit, credit = rng.sample(ids, 2)
        batch.append(transfer(debit, credit, rng.randint(1, 1_000),
                              flags=T_LINKED if i in (1, 2) else 0))
    return batch


async def storage_invariants(db) -> None:
    """Balances are the sums of the stored transfers; double entry; per-shard seq 1..last_seq;
    unique timestamps."""
    accounts = {r["id"]: r for r in await db.fetch("SELECT * FROM accounts")}
    rows = await db.fetch('SELECT id, debit_account_id, credit_account_id, amount, "timestamp", '
                          "seq_shard, seq FROM transfers")
    debits, credits = defaultdict(int), defaultdict(int)
    for r in rows:
        debits[r["debit_account_id"]] += r["amount"]
        credits[r["credit_account_id"]] += r["amount"]
    for aid, a in accounts.items():
        assert (a["debits_posted"], a["credits_posted"]) == (debits[aid], credits[aid])
        if a["flags"] & DMNEC:
            assert a["debits_posted"] <= a["credits_posted"]
    assert sum(debits.values()) == sum(credits.values())
    last_seq = {r["shard"]: r["last_seq"] for r in await db.fetch("SELECT * FROM shards")}
    seqs = defaultdict(list)
    for r in rows:
        seqs[r["seq_shard"]].append(r["seq"])
    for shard, last in last_seq.items():
        assert sorted(seqs[shard]) == list(range(1, last + 1)), shard
    stamps = [r["timestamp"] for r in rows] + [a["timestamp"] for a in accounts.values()]
    assert len(stamps) == len(set(stamps))


# -- SIGTERM ----------------------------------------------------------------------------------------

async def test_sigterm_then_restart_keeps_every_account_and_transfer(engines, db):
    await bytes_uuids(db)
    rng = random.Random(7)
    engine = engines()
    accounts = [account() for _ in range(8)] + [account(flags=DMNEC)]
    plain = [a.id for a in accounts[:8]]
    guarded = accounts[8].id
    sent: list[pb.Transfer] = []
    acked: dict[bytes, int] = {}
    async with Client(await engine.astart()) as client:
        assert {r for r, _ in await client.accounts(accounts)} == {pb.ACCOUNT_RESULT_OK}
        funding = [transfer(plain[0], guarded, 100), transfer(guarded, plain[1], 60)]
        for _ in range(10):
            batch = random_batch(rng, plain, 25)
            sent.extend(batch)
            for t, (r, ts) in zip(batch, await client.transfers(batch)):
                assert r == OK
                acked[t.id] = ts
        for t, (r, ts) in zip(funding, await client.transfers(funding)):
            assert r == OK
            acked[t.id] = ts
        sent.extend(funding)
        failed = [transfer(plain[0], plain[0], 1), transfer(guarded, plain[1], 41)]
        assert [r for r, _ in await client.transfers(failed)] == [
            pb.TRANSFER_RESULT_ACCOUNTS_MUST_BE_DIFFERENT, pb.TRANSFER_RESULT_EXCEEDS_CREDITS]
        accounts_before = await client.lookup_accounts([a.id for a in accounts])
        transfers_before = await client.lookup_transfers([t.id for t in sent + failed])
    shards_before = [tuple(r) for r in await db.fetch(
        "SELECT shard, epoch, last_seq, last_timestamp FROM shards ORDER BY shard")]
    assert len(transfers_before) == len(sent)

    assert await asyncio.to_thread(engine.terminate) == 0
    assert any('"stopped"' in line for line in engine.lines)

    async with Client(await engine.astart()) as client:
        assert await client.lookup_accounts([a.id for a in accounts]) == accounts_before
        assert await client.lookup_transfers([t.id for t in sent + failed]) == transfers_before
        shards_after = [tuple(r) for r in await db.fetch(
            "SELECT shard, epoch, last_seq, last_timestamp FROM shards ORDER BY shard")]
        assert [(s, e - 1, q, ts) for s, e, q, ts in shards_after] == shards_before
        # Replays are EXISTS with the original timestamps; account replays too.
        results = await client.transfers([mod(t) for t in sent])
        assert results == [(EXISTS, acked[t.id]) for t in sent]
        assert await client.accounts([mod(a) for a in accounts]) == [
            (pb.ACCOUNT_RESULT_EXISTS, a.timestamp) for a in accounts_before]
        # The balances reloaded after the restart still enforce the limit exactly.
        assert [r for r, _ in await client.transfers([transfer(guarded, plain[1], 41)])] == [
            pb.TRANSFER_RESULT_EXCEEDS_CREDITS]
        new = transfer(guarded, plain[1], 40)
        [(result, stamp)] = await client.transfers([new])
        assert result == OK
        assert stamp > max(acked.values())
    await storage_invariants(db)


async def test_sigterm_drains_in_flight_requests(engines, db):
    """Every request acknowledged before the process stopped is stored; the others are not
    acknowledged as committed and, resubmitted after the restart, apply exactly once."""
    await bytes_uuids(db)
    rng = random.Random(11)
    engine = engines()
    accounts = [account() for _ in range(10)]
    ids = [a.id for a in accounts]
    batches = [random_batch(rng, ids, 400) for _ in range(60)]
    async with Client(await engine.astart()) as client:
        await client.accounts(accounts)

        async def send(batch):
            try:
                return await client.transfers(batch)
            except grpc.aio.AioRpcError as error:
                assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                        grpc.StatusCode.DEADLINE_EXCEEDED), error
                return None

        tasks = [asyncio.create_task(send(b)) for b in batches]
        # Stop once the engine is busy committing: the first acknowledgement has arrived.
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stopping = asyncio.create_task(asyncio.to_thread(engine.terminate))
        outcomes = await asyncio.gather(*tasks)
        assert await stopping == 0
    acked = {t.id: ts for b, out in zip(batches, outcomes) if out for t, (r, ts) in zip(b, out)
             if r == OK}
    assert all(out is None or [r for r, _ in out] == [OK] * len(b)
               for b, out in zip(batches, outcomes))

    async with Client(await engine.astart()) as client:
        stored = {t.id: t.timestamp for t in
                  await client.lookup_transfers([t.id for b in batches for t in b])}
        for tid, ts in acked.items():
            assert stored.get(tid) == ts
        for batch, out in zip(batches, outcomes):
            results = await client.transfers([mod(t) for t in batch])
            for t, (r, ts) in zip(batch, results):
                if t.id in stored:
                    assert (r, ts) == (EXISTS, stored[t.id])
                else:
                    assert r == OK
    await storage_invariants(db)


# -- SIGKILL ------------------------------------------------------------------------------------

async def test_sigkill_right_after_an_ack_loses_nothing(engines, db):
    await bytes_uuids(db)
    rng = random.Random(3)
    engine = engines()
    accounts = [account() for _ in range(12)]
    ids = [a.id for a in accounts]
    acked: dict[bytes, tuple[pb.Transfer, int]] = {}
    previous: list[pb.Transfer] = []
    unacked: list[list[pb.Transfer]] = []
    for cycle in range(KILL_CYCLES):
        address = await engine.astart()
        assert address, "\n".join(engine.lines[-20:])
        async with Client(address) as client:
            if cycle == 0:
                assert {r for r, _ in await client.accounts(accounts)} == {pb.ACCOUNT_RESULT_OK}
            # Everything acknowledged before any earlier SIGKILL is there, unchanged.
            found = await client.lookup_transfers(list(acked))
            assert found == [mod(t, timestamp=ts) for t, ts in acked.values()]
            # Requests in flight when the process was killed: applied entirely or not at all
            # per chain, and exactly once when resubmitted.
            for batch in unacked:
                stored = {t.id: t.timestamp for t in
                          await client.lookup_transfers([t.id for t in batch])}
                chain = [t.id in stored for t in batch[1:4]]
                assert all(chain) or not any(chain), "a linked chain was half applied"
                results = await client.transfers([mod(t) for t in batch])
                for t, (r, ts) in zip(batch, results):
                    if t.id in stored:
                        assert (r, ts) == (EXISTS, stored[t.id])
                    else:
                        assert r == OK
                    acked[t.id] = (t, ts)
            unacked = []
            # The last acknowledged batch replays as EXISTS with its timestamps.
            if previous:
                results = await client.transfers([mod(t) for t in previous])
                assert results == [(EXISTS, acked[t.id][1]) for t in previous]
            batch = random_batch(rng, ids, 30)
            results = await client.transfers(batch)
            assert [r for r, _ in results] == [OK] * len(batch)
            for t, (_, ts) in zip(batch, results):
                acked[t.id] = (t, ts)
            previous = batch
            if cycle % 2:
                # One more request, killed while it is in flight.
                extra = random_batch(rng, ids, 30)
                call = client.stub.CreateTransfers(pb.CreateTransfersRequest(transfers=extra))
                unacked.append(extra)
                await asyncio.sleep(0.001 * (cycle % 5))
                await engine.akill()
                try:
                    response = await asyncio.wait_for(call, 10)
                    for t, r in zip(extra, response.results):  # acknowledged after all
                        assert r.result == OK
                except grpc.aio.AioRpcError as error:
                    assert error.code() in (grpc.StatusCode.UNAVAILABLE,
                                            grpc.StatusCode.CANCELLED), error
            else:
                await engine.akill()

    async with Client(await engine.astart()) as client:
        found = await client.lookup_transfers(list(acked))
        assert found == [mod(t, timestamp=ts) for t, ts in acked.values()]
        stamps = [ts for _, ts in acked.values()]
        assert len(set(stamps)) == len(stamps)
    assert await db.fetchval("SELECT count(*) FROM transfers") >= len(acked)
    await storage_invariants(db)


# -- the shard lease ----------------------------------------------------------------------------

async def test_second_process_cannot_commit_while_the_first_holds_the_lease(engines, db):
    await bytes_uuids(db)
    first = engines()
    accounts = [account(), account()]
    a, b = accounts[0].id, accounts[1].id
    async with Client(await first.astart()) as client:
        await client.accounts(accounts)
        t1 = transfer(a, b, 5)
        [(r, ts1)] = await client.transfers([t1])
        assert r == OK
        epochs = [tuple(r) for r in await db.fetch("SELECT shard, epoch FROM shards ORDER BY shard")]

        # A second process gives up after TXENGINE_LEASE_WAIT_SECONDS, without serving.
        refused = engines(TXENGINE_LEASE_WAIT_SECONDS=2)
        assert await refused.astart() is None, "\n".join(refused.lines[-20:])
        assert await asyncio.to_thread(refused.proc.wait, 10) != 0
        assert not refused.served()
        assert [tuple(r) for r in await db.fetch(
            "SELECT shard, epoch FROM shards ORDER BY shard")] == epochs

        # A patient second process waits; meanwhile the first keeps committing under its
        # unchanged epochs (a takeover would have fenced these commits off).
        waiting = engines(TXENGINE_LEASE_WAIT_SECONDS=60)
        started = asyncio.create_task(waiting.astart(timeout=90))
        committed = []
        for _ in range(15):
            t = transfer(a, b, 1)
            [(r, ts)] = await client.transfers([t])
            assert r == OK
            committed.append((t, ts))
            await asyncio.sleep(0.1)
        assert not started.done() and not waiting.served()
        assert waiting.proc is not None and waiting.proc.poll() is None
        assert [tuple(r) for r in await db.fetch(
            "SELECT shard, epoch FROM shards ORDER BY shard")] == epochs

    await first.akill()
    address = await asyncio.wait_for(started, 90)
    assert address, "\n".join(waiting.lines[-20:])
    async with Client(address) as client:
        ids = [t1.id] + [t.id for t, _ in committed]
        found = await client.lookup_transfers(ids)
        assert [(t.id, t.timestamp) for t in found] == [(t1.id, ts1)] + [
            (t.id, ts) for t, ts in committed]
        t2 = transfer(a, b, 7)
        [(r, ts2)] = await client.transfers([t2])
        assert r == OK and ts2 > committed[-1][1]
        assert await client.transfers([mod(t1)]) == [(EXISTS, ts1)]
        [acc_a] = await client.lookup_accounts([a])
        assert acc_a.debits_posted == 5 + 15 + 7
    assert [(s, e - 1) for s, e in await db.fetch(
        "SELECT shard, epoch FROM shards ORDER BY shard")] == epochs
    await storage_invariants(db)


async def test_a_fenced_commit_is_not_acknowledged_and_the_retry_applies_once(engines, db):
    """Another owner's epoch (a takeover, simulated in SQL) fences the next commit off: it is
    UNAVAILABLE, stores nothing, and the same request retried later applies exactly once."""
    await bytes_uuids(db)
    engine = engines()
    accounts = [account(), account()]
    a, b = accounts[0].id, accounts[1].id
    async with Client(await engine.astart()) as client:
        await client.accounts(accounts)
        assert [r for r, _ in await client.transfers([transfer(a, b, 1)])] == [OK]
        await db.execute("UPDATE shards SET epoch = epoch + 1")
        batch = [transfer(a, b, 2), transfer(b, a, 3)]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await client.transfers(batch)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert await client.lookup_transfers([t.id for t in batch]) == []
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            try:
                results = await client.transfers([mod(t) for t in batch])
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE
                assert asyncio.get_running_loop().time() < deadline, "engine never recovered"
                await asyncio.sleep(0.1)
        assert [r for r, _ in results] == [OK, OK]
        assert await client.transfers([mod(t) for t in batch]) == [(EXISTS, ts) for _, ts in results]
        [acc_a] = await client.lookup_accounts([a])
        assert (acc_a.debits_posted, acc_a.credits_posted) == (1 + 2, 3)
    await storage_invariants(db)


# -- Postgres down, sessions killed, Redis down ------------------------------------------------------

TERMINATE_ENGINE_SESSIONS = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
    "WHERE application_name = 'txengine' AND datname = current_database()")


def crash_lines(engine: Engine) -> str:
    """The engine's error log lines, each reduced to its event and the exception's last line."""
    out = []
    for line in engine.lines:
        try:
            record = json.loads(line)
        except ValueError:
            if "Error" in line or "Traceback" in line:
                out.append(line[:300])
            continue
        if record.get("level") == "error":
            exception = (record.get("exception") or "").strip().splitlines()
            out.append(f"{record.get('event')}: {exception[-1] if exception else ''}")
    return "\n".join(out[-20:])


async def retry_unavailable(call, deadline: float):
    """Await call() until it does not fail with UNAVAILABLE; any other status fails the test."""
    while True:
        try:
            return await call()
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE, error
            assert asyncio.get_running_loop().time() < deadline, "the engine did not recover"
            await asyncio.sleep(0.1)


async def test_postgres_refusing_connections_is_unavailable_then_recovers(engines, db,
                                                                        database_url):
    """Postgres goes away (every engine session killed, new connections refused): commits and
    lookups are UNAVAILABLE, health says NOT_SERVING; once Postgres is back the engine recovers
    by itself, and the retried request applies exactly once."""
    await bytes_uuids(db)
    url = urllib.parse.urlsplit(database_url)
    admin = await asyncpg.connect(urllib.parse.urlunsplit(url._replace(path="/postgres")))
    name = await db.fetchval("SELECT current_database()")
    engine = engines()
    accounts = [account(), account()]
    a, b = accounts[0].id, accounts[1].id
    try:
        async with Client(await engine.astart()) as client:
            health = health_pb2_grpc.HealthStub(client.channel)
            await client.accounts(accounts)
            first = transfer(a, b, 1)
            [(r, ts_first)] = await client.transfers([first])
            assert r == OK

            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            assert await db.fetchval(TERMINATE_ENGINE_SESSIONS) > 0
            batch = [transfer(a, b, 2), transfer(b, a, 3)]
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.transfers([mod(t) for t in batch])
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await client.lookup_accounts([a])
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
            deadline = asyncio.get_running_loop().time() + 10
            while (await health.Check(health_pb2.HealthCheckRequest())).status != \
                    health_pb2.HealthCheckResponse.NOT_SERVING:
                assert asyncio.get_running_loop().time() < deadline, "health still SERVING"
                await asyncio.sleep(0.05)

            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            deadline = asyncio.get_running_loop().time() + 20
            results = await retry_unavailable(
                lambda: client.transfers([mod(t) for t in batch]), deadline)
            assert [r for r, _ in results] == [OK, OK], crash_lines(engine)
            assert await client.transfers([mod(t) for t in batch]) == [
                (EXISTS, ts) for _, ts in results]
            assert await client.transfers([mod(first)]) == [(EXISTS, ts_first)]
            while (await health.Check(health_pb2.HealthCheckRequest())).status != \
                    health_pb2.HealthCheckResponse.SERVING:
                assert asyncio.get_running_loop().time() < deadline, "health not SERVING again"
                await asyncio.sleep(0.05)
            [acc_a] = await client.lookup_accounts([a])
            assert (acc_a.debits_posted, acc_a.credits_posted) == (1 + 2, 3)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()
    await storage_invariants(db)


async def test_killed_postgres_sessions_are_unavailable_and_the_engine_recovers(engines, db):
    """The engine's Postgres sessions are killed again and again (as by a Postgres restart or
    a failover) while requests stream in. Every failure must be UNAVAILABLE (retry with the
    same ids), the engine must recover by itself once the sessions are left alone, nothing
    acknowledged may be lost, and resubmitted requests must apply exactly once."""
    await bytes_uuids(db)
    rng = random.Random(5)
    engine = engines()
    accounts = [account() for _ in range(10)]
    ids = [a.id for a in accounts]
    batches = [random_batch(rng, ids, 20) for _ in range(300)]
    outcomes: list[list[tuple[int, int]] | None] = []
    statuses: Counter = Counter()
    problems: list[str] = []
    async with Client(await engine.astart()) as client:
        await client.accounts(accounts)

        async def sender():
            for batch in batches:
                try:
                    outcomes.append(await client.transfers(batch))
                    statuses["OK"] += 1
                except grpc.aio.AioRpcError as error:
                    outcomes.append(None)
                    statuses[error.code().name] += 1
                try:
                    await client.lookup_accounts(ids[:2])
                    statuses["lookup OK"] += 1
                except grpc.aio.AioRpcError as error:
                    statuses[f"lookup {error.code().name}"] += 1
                await asyncio.sleep(0.005)

        sending = asyncio.create_task(sender())
        killed = 0
        while not sending.done():
            killed += await db.fetchval(TERMINATE_ENGINE_SESSIONS)
            await asyncio.sleep(rng.uniform(0.03, 0.1))
        await sending
        assert killed > 0 and statuses["UNAVAILABLE"] > 0, statuses
        if set(statuses) - {"OK", "UNAVAILABLE", "lookup OK", "lookup UNAVAILABLE"}:
            problems.append(f"statuses other than UNAVAILABLE for a lost session: {statuses}")

        # Left alone, the engine must commit again.
        deadline = asyncio.get_running_loop().time() + 15
        probe = transfer(ids[0], ids[1], 1)
        recovered, last_error = False, None
        while asyncio.get_running_loop().time() < deadline:
            try:
                [(r, _)] = await client.transfers([mod(probe)])
                recovered = r in (OK, EXISTS)
                break
            except grpc.aio.AioRpcError as error:
                last_error = f"{error.code().name}: {error.details()}"
                await asyncio.sleep(0.1)
        if not recovered:
            health = await health_pb2_grpc.HealthStub(client.channel).Check(
                health_pb2.HealthCheckRequest())
            problems.append(
                "the engine never committed again after its sessions were killed (15 s after "
                f"the last kill: {last_error}; health "
                f"{health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)})")
        else:
            acked = {}
            for batch, out in zip(batches, outcomes):
                if out is not None:
                    assert [r for r, _ in out] == [OK] * len(batch)
                    acked.update({t.id: ts for t, (_, ts) in zip(batch, out)})
            deadline = asyncio.get_running_loop().time() + 15
            stored = {t.id: t.timestamp for t in await retry_unavailable(
                lambda: client.lookup_transfers([t.id for b in batches for t in b]), deadline)}
            assert {tid: stored.get(tid) for tid in acked} == acked, "acknowledged transfer lost"
            for batch, out in zip(batches, outcomes):
                if out is not None:
                    continue
                results = await retry_unavailable(
                    lambda: client.transfers([mod(t) for t in batch]), deadline)
                for t, (r, ts) in zip(batch, results):
                    if t.id in stored:
                        assert (r, ts) == (EXISTS, stored[t.id])
                    else:
                        assert r == OK
    if recovered:
        await storage_invariants(db)
        assert await db.fetchval("SELECT count(*) FROM transfers") == \
            1 + sum(len(b) for b in batches)
    assert problems == [], "\n".join(problems) + "\n" + crash_lines(engine)


async def test_engine_serves_and_commits_without_redis(database_url, db):
    """Redis is never the source of truth: with nothing listening at the Redis URL the engine
    still starts, commits and restarts without losing anything."""
    engine = Engine(database_url, "redis://127.0.0.1:9/0", shards=4)
    try:
        accounts = [account(), account()]
        t = transfer(accounts[0].id, accounts[1].id, 3)
        async with Client(await engine.astart()) as client:
            assert [r for r, _ in await client.accounts(accounts)] == [pb.ACCOUNT_RESULT_OK] * 2
            [(r, ts)] = await client.transfers([t])
            assert r == OK
        await engine.akill()
        async with Client(await engine.astart()) as client:
            assert await client.transfers([mod(t)]) == [(EXISTS, ts)]
    finally:
        engine.kill()
