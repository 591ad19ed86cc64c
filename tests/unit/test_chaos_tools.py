"""The chaos tools themselves: the fault proxy does what each mode says, the controllers
really stop, pause and kill what they control, and the checker flags corrupted histories and
databases (a checker that always says "valid" proves nothing)."""
from __future__ import annotations

import asyncio
import json
import time

import asyncpg
import pytest
import pytest_asyncio

from chaos.checker import check
from chaos.controllers import (C2S, S2C, EngineController, FaultProxy, Hook, PostgresController,
                               RedisController)
from chaos.history import HistoryLog, read_history
from chaos.workload import Workload, WorkloadConfig
from engine.gen.txengine.v1 import ledger_pb2 as pb

OK, EXISTS = pb.TRANSFER_RESULT_OK, pb.TRANSFER_RESULT_EXISTS

DEAD_REDIS = "redis://127.0.0.1:9/0"  # nothing listens there: the engine commits without Redis


# -- the fault proxy -------------------------------------------------------------------------------

@pytest_asyncio.fixture
async def echo_server():
    """An echo server in this event loop; records every byte it receives."""
    received = bytearray()

    async def handle(reader, writer):
        try:
            while data := await reader.read(65536):
                received.extend(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    server.received = received
    yield server
    server.close()


@pytest.fixture
def proxy(echo_server):
    port = echo_server.sockets[0].getsockname()[1]
    p = FaultProxy(("127.0.0.1", port), name="test").start()
    yield p
    p.stop()


async def roundtrip(port: int, payload: bytes, timeout: float = 2.0):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readexactly(len(payload)), timeout)
    finally:
        writer.close()


async def test_proxy_passes_and_delays(proxy):
    assert await roundtrip(proxy.port, b"hello") == b"hello"
    proxy.delay(150)
    t0 = time.monotonic()
    assert await roundtrip(proxy.port, b"slow") == b"slow"
    assert time.monotonic() - t0 >= 0.28  # 150 ms each way
    proxy.pass_()
    t0 = time.monotonic()
    assert await roundtrip(proxy.port, b"fast") == b"fast"
    assert time.monotonic() - t0 < 0.25


async def test_proxy_blackhole_holds_bytes_until_healed(proxy, echo_server):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"a")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(1), 2) == b"a"
    proxy.blackhole()
    writer.write(b"held")
    await writer.drain()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.4)
    assert bytes(echo_server.received) == b"a"
    # A new connection during the partition gets no upstream either.
    with pytest.raises(asyncio.TimeoutError):
        await roundtrip(proxy.port, b"new", timeout=0.3)
    proxy.pass_()
    assert await asyncio.wait_for(reader.readexactly(4), 2) == b"held"
    writer.close()


async def test_proxy_drop_responses_then_reset_on_heal(proxy, echo_server):
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    proxy.drop_responses()
    writer.write(b"lost answer")
    await writer.drain()
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(reader.readexactly(11), 0.4)
    assert bytes(echo_server.received) == b"lost answer"  # the server did get the request
    proxy.pass_()  # a connection that lost bytes is reset: its stream cannot resume
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await asyncio.wait_for(reader.readexactly(1), 2)
    assert proxy.stats["dropped_bytes"] == 11
    assert await roundtrip(proxy.port, b"ok again") == b"ok again"


async def test_proxy_reset_closes_every_connection(proxy):
    readers = []
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"x")
        await writer.drain()
        assert await asyncio.wait_for(reader.readexactly(1), 2) == b"x"
        readers.append((reader, writer))
    assert proxy.reset() == 3
    for reader, writer in readers:
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await asyncio.wait_for(reader.readexactly(1), 2)
        writer.close()


async def test_proxy_hooks_fire_once_and_can_drop(proxy, echo_server):
    seen = []
    hook = proxy.add_hook(Hook(C2S, b"COMMIT;", "before", lambda pair: (seen.append(1), "drop")[1]))
    after = proxy.add_hook(Hook(S2C, b"pong", "after", lambda pair: seen.append(2)))
    assert await roundtrip(proxy.port, b"ping pong") == b"ping pong"
    assert await asyncio.to_thread(after.fired.wait, 2) and seen == [2]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"Q COMMIT; now")
    await writer.drain()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await asyncio.wait_for(reader.readexactly(1), 2)
    assert hook.fired.is_set() and seen == [2, 1]
    assert b"COMMIT" not in bytes(echo_server.received)  # dropped before the server saw it
    assert await roundtrip(proxy.port, b"COMMIT; again") == b"COMMIT; again"  # one-shot


async def test_proxy_follows_a_new_upstream(echo_server):
    p = FaultProxy(None, name="retarget", connect_retry_seconds=1.0).start()
    try:
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError)):
            await roundtrip(p.port, b"nobody", timeout=3)
        p.set_upstream(f"127.0.0.1:{echo_server.sockets[0].getsockname()[1]}")
        assert await roundtrip(p.port, b"found") == b"found"
    finally:
        p.stop()


# -- Postgres and Redis ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pg():
    controller = PostgresController()
    controller.start()
    yield controller
    controller.close()


async def test_postgres_controller_crash_pause_and_backend_kills(pg):
    await pg.create_database("tools")
    url = pg.url("tools")
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE t (v int)")
    await conn.execute("INSERT INTO t VALUES (1)")  # committed: must survive a crash
    assert await conn.fetchval("SHOW fsync") == "on"
    await conn.close()

    app = await asyncpg.connect(url, server_settings={"application_name": "txengine"})
    assert await pg.kill_backends("tools") == 1
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                        ConnectionError)):
        await app.fetchval("SELECT 1")
    app.terminate()

    pg.pause()
    try:
        with pytest.raises((asyncio.TimeoutError, OSError)):
            await asyncpg.connect(url, timeout=0.5)
    finally:
        pg.resume()
    assert await (await asyncpg.connect(url)).fetchval("SELECT 1") == 1

    await asyncio.to_thread(pg.stop_immediate)
    assert pg.pid is None
    with pytest.raises(OSError):
        await asyncpg.connect(url, timeout=2)
    accepting = await asyncio.to_thread(pg.start)
    assert accepting <= time.monotonic()
    conn = await asyncpg.connect(url)
    assert await conn.fetchval("SELECT v FROM t") == 1
    await conn.close()


def test_redis_controller_kill_pause_flush():
    redis = RedisController()
    try:
        redis.start()
        client = redis._client()
        client.set("k", "v")
        redis.flush()
        assert client.get("k") is None
        redis.pause()
        assert not redis.ping()
        redis.resume()
        assert redis.ping()
        redis.kill()
        assert not redis.ping()
        redis.start()
        assert redis.ping()
        client.close()
    finally:
        redis.close()


# -- the engine controller and the checker ---------------------------------------------------------

@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def checked_run(pg, tmp_path_factory):
    """A short fault-free run: history, database, and the engine still serving."""
    work = tmp_path_factory.mktemp("checked-run")
    await pg.create_database("checked")
    clock = work / "clock"
    engine = EngineController(pg.url("checked"), DEAD_REDIS, log_path=work / "engine.log",
                              clock_file=clock)
    address = await asyncio.to_thread(engine.start)
    assert address, "\n".join(engine.lines[-20:])
    await asyncio.to_thread(engine.wait_serving)
    history = HistoryLog(work / "history.jsonl")
    workload = Workload(address, history, WorkloadConfig(clients=2), seed=7)
    await workload.setup()
    workload.start()
    await asyncio.sleep(1.5)
    await workload.drain(10)
    history.flush()
    yield {"engine": engine, "history": history.path, "url": pg.admin_url("checked"),
           "work": work, "workload": workload}
    await workload.close()
    history.close()
    engine.kill9()


async def corrupted(run, sql: str, *args):
    """Run one statement on the checked run's database (each test undoes its own damage)."""
    conn = await asyncpg.connect(run["url"])
    await conn.set_type_codec("uuid", schema="pg_catalog", encoder=bytes, decoder=bytes,
                              format="binary")
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def kinds(report) -> set[str]:
    return {k.removeprefix("violation:") for k in report.counts if k.startswith("violation:")}


async def test_engine_controller_pause_resume_and_clock(checked_run):
    engine = checked_run["engine"]
    engine.pause()
    with pytest.raises(TimeoutError):
        await asyncio.to_thread(engine.wait_serving, 1.5)
    engine.resume()
    await asyncio.to_thread(engine.wait_serving, 10)
    assert engine.clock_file.read_text() == "0"


async def test_checker_passes_a_clean_run(checked_run):
    report = await check(checked_run["history"], checked_run["url"], checked_run["engine"].address)
    assert report.valid, report.summary()
    assert report.counts["acked_ok_ids"] > 0 and report.counts["lookups_checked"] > 0


async def test_checker_flags_a_lost_acknowledged_transfer(checked_run):
    [row] = await corrupted(checked_run, "DELETE FROM transfers WHERE id = (SELECT id FROM "
                            "transfers WHERE flags = 0 ORDER BY \"timestamp\" DESC LIMIT 1) "
                            "RETURNING *")
    try:
        report = await check(checked_run["history"], checked_run["url"])
        assert {"lost", "seq", "balance"} <= kinds(report), report.summary()
    finally:
        columns = list(dict(row))
        await corrupted(checked_run, f"INSERT INTO transfers ({', '.join(columns)}) VALUES "
                        f"({', '.join(f'${i + 1}' for i in range(len(columns)))})", *row.values())
    assert (await check(checked_run["history"], checked_run["url"])).valid


FIRST_ACCOUNT = 'WHERE id = (SELECT id FROM accounts ORDER BY "timestamp" LIMIT 1)'


async def test_checker_flags_a_wrong_balance(checked_run):
    await corrupted(checked_run, "UPDATE accounts SET credits_posted = credits_posted + 1 "
                    + FIRST_ACCOUNT)
    try:
        report = await check(checked_run["history"], checked_run["url"])
        assert {"balance", "conservation"} <= kinds(report), report.summary()
    finally:
        await corrupted(checked_run, "UPDATE accounts SET credits_posted = credits_posted - 1 "
                        + FIRST_ACCOUNT)


async def test_checker_flags_a_broken_sequence_and_order(checked_run):
    await corrupted(checked_run, "UPDATE transfers SET seq = seq + 1000000 WHERE seq = 1")
    try:
        assert "seq" in kinds(await check(checked_run["history"], checked_run["url"]))
    finally:
        await corrupted(checked_run, "UPDATE transfers SET seq = 1 WHERE seq = 1000001")


async def test_checker_flags_an_overdraft_of_a_guarded_account(checked_run):
    """A transfer that takes a guarded account below zero, stored with consistent balances
    and sequence: only the replay in timestamp order can tell."""
    rows = await corrupted(checked_run, """
        WITH g AS (SELECT * FROM accounts WHERE flags & 2 = 2 ORDER BY "timestamp" LIMIT 1),
             w AS (SELECT a.* FROM accounts a, g WHERE a.ledger = g.ledger AND a.flags = 0
                   ORDER BY a."timestamp" LIMIT 1)
        SELECT g.id AS g, w.id AS w, g.ledger, g.credits_posted - g.debits_posted + 1 AS amount,
               g.shard AS gshard, w.shard AS wshard FROM g, w""")
    [r] = rows
    ids = [bytes.fromhex("7" * 32)]
    from engine.posting.batch import shards_of
    shard_count = len(await corrupted(checked_run, "SELECT shard FROM shards"))
    own = int(shards_of(ids, shard_count)[0])
    [s] = await corrupted(checked_run, "SELECT last_seq, last_timestamp FROM shards "
                                       "WHERE shard = $1", r["gshard"])
    stamp = s["last_timestamp"] + 1
    statements = [
        ("INSERT INTO transfers (shard, id, debit_account_id, credit_account_id, amount, "
         "pending_id, ledger, code, flags, timeout_seconds, user_data, \"timestamp\", seq_shard, "
         "seq) VALUES ($1, $2, $3, $4, $5, $6, $7, 1, 0, 0, '', $8, $9, $10)",
         own, ids[0], r["g"], r["w"], r["amount"], bytes(16), r["ledger"], stamp, r["gshard"],
         s["last_seq"] + 1),
        ("UPDATE accounts SET debits_posted = debits_posted + $2 WHERE id = $1",
         r["g"], r["amount"]),
        ("UPDATE accounts SET credits_posted = credits_posted + $2 WHERE id = $1",
         r["w"], r["amount"]),
        ("UPDATE shards SET last_seq = last_seq + 1, last_timestamp = $2 WHERE shard = $1",
         r["gshard"], stamp),
    ]
    for sql, *args in statements:
        await corrupted(checked_run, sql, *args)
    try:
        report = await check(checked_run["history"], checked_run["url"])
        assert {"replay", "limit", "committed_without_ok"} <= kinds(report), report.summary()
    finally:
        await corrupted(checked_run, "DELETE FROM transfers WHERE id = $1", ids[0])
        await corrupted(checked_run, "UPDATE accounts SET debits_posted = debits_posted - $2 "
                                     "WHERE id = $1", r["g"], r["amount"])
        await corrupted(checked_run, "UPDATE accounts SET credits_posted = credits_posted - $2 "
                                     "WHERE id = $1", r["w"], r["amount"])
        await corrupted(checked_run, "UPDATE shards SET last_seq = last_seq - 1 WHERE shard = $1",
                        r["gshard"])
    assert (await check(checked_run["history"], checked_run["url"])).valid


def rewrite(run, name: str, edit=lambda e: [e], extra=()) -> str:
    """A copy of the run's history, edited event by event (edit returns a list of events),
    with `extra` events appended."""
    path = run["work"] / name
    with open(path, "w") as out:
        for event in read_history(run["history"]):
            for e in edit(event):
                out.write(json.dumps(e) + "\n")
        for e in extra:
            out.write(json.dumps(e) + "\n")
    return str(path)


async def test_checker_flags_forged_histories(checked_run):
    events = read_history(checked_run["history"])
    committed = {r["id"].hex() for r in await corrupted(checked_run, "SELECT id FROM transfers")}
    ok_reqs = {e["req"] for e in events if e["ev"] == "ok"}
    plain = next(e for e in events if e["ev"] == "request" and e["op"] == "transfers"
                 and e["kind"] == "new" and e["req"] in ok_reqs
                 and all(i["id"] in committed and not i["flags"] for i in e["items"]))

    # An acknowledgement for a transfer that was never stored: "lost".
    forged = dict(plain, req=10**6, items=[dict(plain["items"][0], id="ab" * 16)])
    mono = events[-1]["mono"]
    path = rewrite(checked_run, "lost.jsonl", extra=[
        forged, {"ev": "invoke", "req": 10**6, "attempt": 0, "mono": mono},
        {"ev": "ok", "req": 10**6, "attempt": 0, "results": [[OK, 123]], "mono": mono}])
    assert "lost" in kinds(await check(path, checked_run["url"]))

    # The only send of a stored transfer was rejected (INVALID_ARGUMENT): it changed something.
    def reject(e):
        if e.get("req") == plain["req"] and e["ev"] == "ok":
            return [{"ev": "fail", "req": e["req"], "attempt": e["attempt"], "mono": e["mono"],
                     "code": "INVALID_ARGUMENT", "ambiguous": False}]
        return [e]
    sole = all(sum(i["id"] in {x["id"] for x in e["items"]} for e in events
                   if e["ev"] == "request") == 1 for i in plain["items"])
    if sole:
        report = await check(rewrite(checked_run, "rejected.jsonl", reject), checked_run["url"])
        assert "committed_without_ok" in kinds(report), report.summary()

    # A conflict answer for the identical version: the "changed" version is the stored one.
    def conflict(e):
        if e.get("req") == plain["req"] and e["ev"] == "ok":
            e = dict(e, results=[[pb.TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_AMOUNT, 0]]
                     + e["results"][1:])
        return [e]
    report = await check(rewrite(checked_run, "conflict.jsonl", conflict), checked_run["url"])
    assert "conflict" in kinds(report), report.summary()

    # An OK acknowledged twice for the same id.
    def twice(e):
        if e.get("req") == plain["req"] and e["ev"] == "ok":
            return [e, dict(e, attempt=e["attempt"] + 1)]
        return [e]
    report = await check(rewrite(checked_run, "twice.jsonl", twice), checked_run["url"])
    assert "applied_twice" in kinds(report), report.summary()

    # UNKNOWN never escapes.
    def unknown(e):
        if e.get("req") == plain["req"] and e["ev"] == "ok":
            return [{"ev": "fail", "req": e["req"], "attempt": e["attempt"], "mono": e["mono"],
                     "code": "UNKNOWN", "ambiguous": True}, dict(e, attempt=e["attempt"] + 1)]
        return [e]
    report = await check(rewrite(checked_run, "unknown.jsonl", unknown), checked_run["url"])
    assert "status" in kinds(report), report.summary()


async def test_checker_flags_a_half_stored_chain(checked_run):
    events = read_history(checked_run["history"])
    ok = {e["req"]: e for e in events if e["ev"] == "ok"}
    chains = [e for e in events if e["ev"] == "request" and e["op"] == "transfers"
              and e["req"] in ok and any(i["flags"] & 1 for i in e["items"])
              and all(r[0] in (OK, EXISTS) for r in ok[e["req"]]["results"])]
    if not chains:
        pytest.skip("no committed chain in this short run")
    victim = next(i for i in chains[0]["items"] if i["flags"] & 1)
    [row] = await corrupted(checked_run, "DELETE FROM transfers WHERE id = $1 RETURNING *",
                            bytes.fromhex(victim["id"]))
    try:
        assert "chain" in kinds(await check(checked_run["history"], checked_run["url"]))
    finally:
        columns = list(dict(row))
        await corrupted(checked_run, f"INSERT INTO transfers ({', '.join(columns)}) VALUES "
                        f"({', '.join(f'${i + 1}' for i in range(len(columns)))})", *row.values())
