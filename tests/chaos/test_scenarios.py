"""Fault-injection scenarios: real engine, Postgres and Redis processes on loopback, a
concurrent retrying workload, faults, then the offline checker (checker.py) over the history.

Each scenario has a short variant (part of `make test`, fixed seed, a few seconds of faults)
and a long one (`make chaos`, marked slow, seed from --chaos-seed / $TXENGINE_CHAOS_SEED or
random, printed). Every run prints its figures: acknowledged transfers, retries, unresolved
requests and how they resolved, and recovery times. Recovery times are printed, not asserted,
except that the engine must serve again within RECOVERY_BOUND_SECONDS.
"""
from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections import Counter

import asyncpg
import pytest

from chaos.cluster import chaos_seed
from chaos.controllers import C2S, RECOVERY_BOUND_SECONDS, S2C, Hook
from chaos.workload import WorkloadConfig

pytestmark = pytest.mark.chaos

# Seconds of faults: short variants run in `make test`, long ones in `make chaos`.
DURATION = {"short": 8.0, "long": float(os.environ.get("TXENGINE_CHAOS_SECONDS", 120))}
LENGTHS = [pytest.param("short", id="short"),
           pytest.param("long", id="long", marks=pytest.mark.slow)]
HOUR_NS = 3_600 * 10**9


def seed_for(request, length: str, default: int) -> int:
    return chaos_seed(request.config, default if length == "short" else None)


async def run_faults(cluster, nemesis, duration: float, rng: random.Random) -> None:
    """The workload runs while `nemesis(cluster, rng, until)` injects faults until `until`."""
    cluster.workload.start()
    until = time.monotonic() + duration
    try:
        await nemesis(cluster, rng, until)
        remaining = until - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)
    finally:
        cluster.workload.stop()


async def finish(cluster, **kwargs):
    report = await cluster.finish(**kwargs)
    assert report.valid, report.summary()
    return report


async def sleep_until(rng: random.Random, low: float, high: float, until: float) -> bool:
    """Sleep a random while; False when that would pass `until`."""
    pause = rng.uniform(low, high)
    if time.monotonic() + pause >= until:
        return False
    await asyncio.sleep(pause)
    return True


# -- the engine ------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", LENGTHS)
async def test_engine_sigkill_every_few_seconds(make_cluster, request, length):
    """SIGKILL the engine every 1.5-3.5 s, restart it after 0-1 s."""
    seed = seed_for(request, length, 101)
    rng = random.Random(seed)
    cluster = await make_cluster("engine SIGKILL loop", seed=seed)

    async def nemesis(c, rng, until):
        while await sleep_until(rng, 1.5, 3.5, until):
            down = rng.uniform(0, 1.0)
            c.nemesis("engine_sigkill", down=down)
            await c.restart_engine(down_seconds=down)

    await run_faults(cluster, nemesis, DURATION[length], rng)
    report = await finish(cluster)
    assert cluster.engine.kills >= 1 and report.counts["acked_ok_ids"] > 0


COMMIT_QUERY = b"COMMIT;"
COMMIT_DONE = b"C\x00\x00\x00\x0bCOMMIT\x00"  # CommandComplete "COMMIT"


@pytest.mark.parametrize("length", LENGTHS)
async def test_engine_sigkill_around_commit(make_cluster, request, length):
    """SIGKILL the engine at the edges of its COMMIT, seen on the wire by the proxy between
    the engine and Postgres: before the COMMIT reaches Postgres (which then rolls back), just
    after it was sent (committed, never acknowledged), when the answer is held back from the
    engine, or 0-3 ms after the engine got it (it may or may not have acknowledged); and
    0-20 ms after a client sent a batch. No client may hold an OK for a transfer that is not
    stored, and nothing may apply twice."""
    seed = seed_for(request, length, 102)
    rng = random.Random(seed)
    cluster = await make_cluster("engine SIGKILL around COMMIT", seed=seed)
    moments = ["before_commit", "commit_sent", "answer_held", "after_answer", "after_request"]
    fired: dict[str, int] = {m: 0 for m in moments}

    async def nemesis(c, rng, until):
        k = rng.randrange(len(moments))
        while await sleep_until(rng, 0.3, 0.8, until):
            moment = moments[k % len(moments)]
            k += 1
            pid = c.engine.pid

            def kill(_pair=None, pid=pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

            if moment == "after_request":
                await asyncio.sleep(rng.uniform(0, 0.02))
                kill()
                hook = None
            elif moment == "before_commit":
                hook = Hook(C2S, COMMIT_QUERY, "before", lambda pair: (kill(), "drop")[1])
            elif moment == "commit_sent":
                hook = Hook(C2S, COMMIT_QUERY, "after", kill)
            elif moment == "answer_held":
                hook = Hook(S2C, COMMIT_DONE, "before", lambda pair: (kill(), "drop")[1])
            else:
                delay = rng.uniform(0, 0.003)
                hook = Hook(S2C, COMMIT_DONE, "after",
                            lambda pair, d=delay: threading.Timer(d, kill).start())
            if hook is not None:
                c.pg_proxy.add_hook(hook)
                if not await asyncio.to_thread(hook.fired.wait, 5):
                    c.pg_proxy.clear_hooks()
                    if not hook.fired.is_set():
                        continue
            fired[moment] += 1
            c.nemesis("engine_sigkill", moment=moment)
            await asyncio.to_thread(c.engine.proc.wait, 10)
            await c.start_engine()

    await run_faults(cluster, nemesis, DURATION[length], rng)
    cluster.notes.append(f"kills by moment: {fired}")
    report = await finish(cluster)
    assert sum(fired.values()) >= 3, fired
    assert report.counts["acked_ok_ids"] > 0


@pytest.mark.parametrize("length", LENGTHS)
async def test_engine_paused_and_clock_jumps(make_cluster, request, length):
    """The engine's wall clock jumps +1 h, then back to -1 h (the clock shim, no engine change:
    see controllers.EngineController.jump_clock); the engine is SIGSTOPped for 2-4 s; it
    restarts with its clock 2 h behind the timestamps it already handed out. Order comes from
    the database: timestamps stay unique and increasing in every shard's sequence, never go
    back, and every valid request still commits."""
    seed = seed_for(request, length, 103)
    rng = random.Random(seed)
    cluster = await make_cluster("engine pause + clock jumps", seed=seed, clock=True)
    marks: list[tuple[str, int]] = []

    async def committed(c, what: str) -> int:
        assert await c.workload.probe_commit(RECOVERY_BOUND_SECONDS) is not None, what
        stamp = await max_timestamp(c)
        assert not marks or stamp > marks[-1][1], f"timestamps went back after {what}: {marks}"
        marks.append((what, stamp))
        return stamp

    async def nemesis(c, rng, until):
        await committed(c, "start")
        while time.monotonic() < until:
            c.nemesis("clock_jump", offset_h=1)
            c.engine.jump_clock(HOUR_NS)
            stamp = await committed(c, "clock +1 h")
            assert stamp > time.time_ns() + HOUR_NS // 2, "the clock shim did not move the clock"
            if not await sleep_until(rng, 0.5, 1.5, until):
                return
            c.nemesis("clock_jump", offset_h=-1)
            c.engine.jump_clock(-HOUR_NS)
            await committed(c, "clock -1 h")
            if not await sleep_until(rng, 0.5, 1.5, until):
                return
            pause = rng.uniform(2, 4)
            c.nemesis("engine_sigstop", seconds=pause)
            c.engine.pause()
            await asyncio.sleep(pause)
            c.engine.resume()
            await committed(c, "SIGCONT")
            c.nemesis("engine_restart_with_clock", offset_h=-2)
            c.engine.clock_file.write_text(str(-2 * HOUR_NS))
            await c.restart_engine()
            await committed(c, "restart at -2 h")
            if not await sleep_until(rng, 0.5, 1.5, until):
                return

    await run_faults(cluster, nemesis, DURATION[length], rng)
    cluster.notes.append("max timestamp - wall clock after each step (s): " + ", ".join(
        f"{what}: {(stamp - time.time_ns()) / 1e9:+.0f}" for what, stamp in marks))
    report = await finish(cluster)
    assert await max_timestamp(cluster) >= marks[-1][1]
    assert report.counts["acked_ok_ids"] > 0


async def max_timestamp(cluster) -> int:
    conn = await asyncpg.connect(cluster.database_url)
    try:
        return await conn.fetchval('SELECT coalesce(max("timestamp"), 0) FROM transfers')
    finally:
        await conn.close()


@pytest.mark.parametrize("length", LENGTHS)
async def test_hot_account(make_cluster, request, length):
    """80 % of transfers touch one guarded account; one engine SIGKILL and one round of
    Postgres backend kills in the middle."""
    seed = seed_for(request, length, 104)
    rng = random.Random(seed)
    config = WorkloadConfig(hot_share=0.8, clients=5)
    cluster = await make_cluster("hot account", seed=seed, config=config)

    async def nemesis(c, rng, until):
        while await sleep_until(rng, 2, 3, until):
            c.nemesis("engine_sigkill")
            await c.restart_engine(down_seconds=rng.uniform(0, 0.5))
            if not await sleep_until(rng, 1, 2, until):
                return
            c.nemesis("pg_backend_kill")
            await c.pg.kill_backends(c.database)

    await run_faults(cluster, nemesis, DURATION[length], rng)
    report = await finish(cluster)
    assert report.counts["acked_ok_ids"] > 0


# -- Postgres --------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", LENGTHS)
async def test_postgres_crash_and_restart(make_cluster, request, length):
    """`pg_ctl -m immediate` (a crash: WAL replay on start) every 2-4 s, down 0.2-1 s. Figure:
    first commit after Postgres accepts connections again."""
    seed = seed_for(request, length, 105)
    rng = random.Random(seed)
    cluster = await make_cluster("Postgres crash + restart", seed=seed)

    async def nemesis(c, rng, until):
        while await sleep_until(rng, 2, 4, until):
            c.nemesis("pg_stop_immediate")
            await asyncio.to_thread(c.pg.stop_immediate)
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            accepting = await asyncio.to_thread(c.pg.start)
            c.nemesis("pg_started")
            assert await c.workload.probe_commit(RECOVERY_BOUND_SECONDS) is not None, \
                "no commit after Postgres came back:\n" + "\n".join(c.engine.error_lines())
            c.figures["first_commit_after_pg_accepts_s"].append(time.monotonic() - accepting)

    await run_faults(cluster, nemesis, DURATION[length], rng)
    await finish(cluster)
    assert cluster.figures["first_commit_after_pg_accepts_s"]


@pytest.mark.parametrize("length", LENGTHS)
async def test_postgres_backend_kills(make_cluster, request, length):
    """pg_terminate_backend of every engine session every 0.4-1.2 s (its writer, lease and
    read pool), mid-transaction or not."""
    seed = seed_for(request, length, 106)
    rng = random.Random(seed)
    cluster = await make_cluster("Postgres backend kills", seed=seed)
    killed = [0]

    async def nemesis(c, rng, until):
        while await sleep_until(rng, 0.4, 1.2, until):
            c.nemesis("pg_backend_kill")
            killed[0] += await c.pg.kill_backends(c.database)

    await run_faults(cluster, nemesis, DURATION[length], rng)
    cluster.notes.append(f"backends terminated: {killed[0]}")
    t0 = time.monotonic()
    assert await cluster.workload.probe_commit(RECOVERY_BOUND_SECONDS) is not None
    cluster.figures["first_commit_after_last_kill_s"].append(time.monotonic() - t0)
    await finish(cluster)
    assert killed[0] > 0


@pytest.mark.parametrize("length", LENGTHS)
async def test_postgres_paused(make_cluster, request, length):
    """SIGSTOP of the postmaster and every backend for 2-4.5 s, then SIGCONT. Requests wait
    or time out (DEADLINE_EXCEEDED after 3 s: ambiguous, retried with the same ids while the
    first attempt may still be queued in the engine)."""
    seed = seed_for(request, length, 107)
    rng = random.Random(seed)
    cluster = await make_cluster("Postgres paused", seed=seed)

    async def nemesis(c, rng, until):
        while await sleep_until(rng, 1, 2, until):
            pause = rng.uniform(2, 4.5)
            c.nemesis("pg_sigstop", seconds=pause)
            c.pg.pause()
            await asyncio.sleep(pause)
            c.pg.resume()
            resumed = time.monotonic()
            c.nemesis("pg_sigcont")
            assert await c.workload.probe_commit(RECOVERY_BOUND_SECONDS) is not None
            c.figures["first_commit_after_pg_resumed_s"].append(time.monotonic() - resumed)

    await run_faults(cluster, nemesis, DURATION[length], rng)
    await finish(cluster)


# -- Redis -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("length", LENGTHS)
async def test_redis_down_paused_flushed(make_cluster, request, length):
    """Redis killed (then restarted), paused and flushed under load: Redis is never the source
    of truth, so 100 % of valid writes succeed - not one RPC may fail."""
    seed = seed_for(request, length, 108)
    rng = random.Random(seed)
    cluster = await make_cluster("Redis down/paused/flushed", seed=seed)

    async def nemesis(c, rng, until):
        step = 0
        while await sleep_until(rng, 0.5, 1.0, until):
            action = step % 3
            step += 1
            if action == 0:
                c.nemesis("redis_kill")
                c.redis.kill()
                await asyncio.sleep(rng.uniform(1, 2))
                await asyncio.to_thread(c.redis.start)
            elif action == 1:
                c.nemesis("redis_sigstop")
                c.redis.pause()
                await asyncio.sleep(rng.uniform(1, 2))
                c.redis.resume()
            else:
                c.nemesis("redis_flushall")
                await asyncio.to_thread(c.redis.flush)

    await run_faults(cluster, nemesis, DURATION[length], rng)
    report = await finish(cluster)
    stats = cluster.workload.stats
    # Only the deliberately malformed requests may fail (INVALID_ARGUMENT).
    errors = {k: v for k, v in stats.items()
              if k.startswith("status_") and k != "status_INVALID_ARGUMENT"}
    valid_writes = (stats["requests_new"] + stats["requests_duplicate"]
                    + stats["requests_retry_identical"])
    print(f"  redis: valid write requests={valid_writes}, failed RPCs={sum(errors.values())} "
          f"{errors or ''}")
    assert not errors, f"RPCs failed while only Redis was faulty: {errors}"
    assert report.counts["acked_ok_ids"] > 0


async def test_engine_starts_while_redis_is_paused(make_cluster, request):
    """An engine (re)started while Redis is stopped (SIGSTOP: connections are accepted, never
    answered) must still serve: Redis is never required to commit."""
    seed = seed_for(request, "short", 109)
    cluster = await make_cluster("engine restart with Redis paused", seed=seed)
    cluster.redis.pause()
    try:
        await asyncio.to_thread(cluster.engine.kill9)
        address = await asyncio.to_thread(cluster.engine.start, RECOVERY_BOUND_SECONDS)
        assert address, ("the engine did not serve while Redis was paused:\n"
                         + "\n".join(cluster.engine.lines[-10:]))
        cluster.front.set_upstream(address)
        cluster.figures["serving_after_spawn_redis_paused_s"].append(
            await asyncio.to_thread(cluster.engine.wait_serving))
        assert await cluster.workload.probe_commit(10) is not None
    finally:
        cluster.redis.resume()
    cluster.workload.start()
    await asyncio.sleep(1)
    await finish(cluster)


# -- the network -----------------------------------------------------------------------------------

async def network_faults(proxy, c, rng, until, label: str) -> None:
    step = 0
    while await sleep_until(rng, 0.3, 0.8, until):
        action = step % 4
        step += 1
        if action == 0:
            ms = rng.uniform(50, 300)
            c.nemesis(f"{label}_delay", ms=ms)
            proxy.delay(ms)
            await asyncio.sleep(rng.uniform(1, 2))
        elif action == 1:
            c.nemesis(f"{label}_blackhole")
            proxy.blackhole()
            await asyncio.sleep(rng.uniform(1, 4))
        elif action == 2:
            c.nemesis(f"{label}_reset")
            proxy.pass_()
            proxy.reset()
            await asyncio.sleep(rng.uniform(0.3, 1))
        else:
            c.nemesis(f"{label}_drop_responses")
            proxy.drop_responses()
            await asyncio.sleep(rng.uniform(0.5, 2.5))
        c.nemesis(f"{label}_heal")
        proxy.pass_()


@pytest.mark.parametrize("length", LENGTHS)
async def test_network_faults_engine_to_postgres(make_cluster, request, length):
    """Delay, blackhole, reset and dropped responses between the engine and Postgres: a
    COMMIT whose answer is lost is an ambiguous commit the clients resolve by retrying."""
    seed = seed_for(request, length, 110)
    rng = random.Random(seed)
    cluster = await make_cluster("network faults engine->Postgres", seed=seed)

    async def nemesis(c, rng, until):
        await network_faults(c.pg_proxy, c, rng, until, "pg_net")

    await run_faults(cluster, nemesis, DURATION[length], rng)
    cluster.notes.append(f"proxy: {dict(cluster.pg_proxy.stats)}")
    t0 = time.monotonic()
    assert await cluster.workload.probe_commit(RECOVERY_BOUND_SECONDS) is not None
    cluster.figures["first_commit_after_heal_s"].append(time.monotonic() - t0)
    await finish(cluster)


@pytest.mark.parametrize("length", LENGTHS)
async def test_network_faults_client_to_engine(make_cluster, request, length):
    """Delay, blackhole, reset and dropped responses between the clients and the engine: the
    engine commits, the client never hears, and retries with the same ids."""
    seed = seed_for(request, length, 111)
    rng = random.Random(seed)
    cluster = await make_cluster("network faults client->engine", seed=seed)

    async def nemesis(c, rng, until):
        await network_faults(c.front, c, rng, until, "client_net")

    await run_faults(cluster, nemesis, DURATION[length], rng)
    cluster.notes.append(f"proxy: {dict(cluster.front.stats)}")
    report = await finish(cluster)
    assert report.counts["ambiguous_attempts"] > 0


# -- two engines -----------------------------------------------------------------------------------

async def shard_epochs(cluster) -> list[tuple[int, int]]:
    conn = await asyncpg.connect(cluster.database_url)
    try:
        rows = await conn.fetch("SELECT shard, epoch FROM shards ORDER BY shard")
        return [tuple(r) for r in rows]
    finally:
        await conn.close()


@pytest.mark.parametrize("length", LENGTHS)
async def test_two_engines_contend_for_the_shards(make_cluster, request, length):
    """A second engine on the same database waits for the shard lease while the first serves
    (epochs unchanged, it never serves); the first is SIGKILLed; the second takes over and
    the clients follow it. Repeated with the roles swapped."""
    seed = seed_for(request, length, 112)
    rng = random.Random(seed)
    cluster = await make_cluster("two engines: fencing takeover", seed=seed)

    async def nemesis(c, rng, until):
        while time.monotonic() < until - 1:
            standby = c.new_engine(f"engine-{len(c.engines) + 1}", lease_wait_seconds=60)
            epochs = await shard_epochs(c)
            starting = asyncio.create_task(asyncio.to_thread(standby.start, 90))
            await asyncio.sleep(rng.uniform(1.5, 2.5))
            assert not starting.done() and standby.serving_at is None, \
                "a second engine served while the first held the lease"
            assert await shard_epochs(c) == epochs, "the waiting engine changed the epochs"
            c.nemesis("engine_sigkill_active", standby=standby.name)
            killed = time.monotonic()
            await asyncio.to_thread(c.engine.kill9)
            address = await asyncio.wait_for(starting, 90)
            assert address, "\n".join(standby.lines[-20:])
            c.front.set_upstream(address)
            await asyncio.to_thread(standby.wait_serving)
            c.figures["takeover_s"].append(time.monotonic() - killed)
            c.engine = standby
            if not await sleep_until(rng, 1, 2, until):
                return

    await run_faults(cluster, nemesis, DURATION[length], rng)
    report = await finish(cluster)
    assert cluster.figures["takeover_s"] and report.counts["acked_ok_ids"] > 0


@pytest.mark.parametrize("length", LENGTHS)
async def test_zombie_engine_is_fenced(make_cluster, request, length):
    """The serving engine is SIGSTOPped and its lease session terminated (as if its lease
    expired); a second engine takes the shards (new epochs) and serves. When the zombie
    resumes, it still has its writer session and its in-memory state: its commits must fail
    at the epoch fence (UNAVAILABLE), so exactly one writer commits. Requests sent straight
    to the zombie are logged and checked like all others."""
    seed = seed_for(request, length, 113)
    rng = random.Random(seed)
    cluster = await make_cluster("zombie engine fenced", seed=seed)
    zombie_answers: list[str] = []

    async def nemesis(c, rng, until):
        while time.monotonic() < until - 1:
            zombie = c.engine
            standby = c.new_engine(f"engine-{len(c.engines) + 1}", lease_wait_seconds=60)
            starting = asyncio.create_task(asyncio.to_thread(standby.start, 90))
            await asyncio.sleep(rng.uniform(1, 2))
            # Stop it just after a COMMIT answer reached it: between transactions, with a
            # batch committed but maybe not yet acknowledged, and its writer session alive.
            hook = c.pg_proxy.add_hook(Hook(
                S2C, COMMIT_DONE, "after",
                lambda pair, pid=zombie.pid: os.kill(pid, signal.SIGSTOP)))
            if not await asyncio.to_thread(hook.fired.wait, 5):
                c.pg_proxy.clear_hooks()
                if not hook.fired.is_set():
                    zombie.pause()
            c.nemesis("engine_sigstop_and_lease_kill", zombie=zombie.name)
            stopped = time.monotonic()
            await asyncio.sleep(0.2)
            holders = await c.pg.lease_holders(c.database)
            await c.pg.kill_backends(c.database, pids=holders)
            done, _ = await asyncio.wait([starting], timeout=5)
            if not done:
                c.notes.append("standby not serving 5 s after the lease was freed: "
                               + await c.pg.activity(c.database))
                zombie.resume()
            address = await asyncio.wait_for(starting, 90)
            assert address, "\n".join(standby.lines[-20:])
            c.front.set_upstream(address)
            c.front.reset()  # clients leave the zombie
            c.figures["takeover_s"].append(time.monotonic() - stopped)
            c.engine = standby
            zombie.resume()
            await asyncio.sleep(0.3)
            for _ in range(3):
                status, outcome = await c.workload.send_once(zombie.address, "zombie")
                zombie_answers.append("ok" if status == "ok" else outcome)
            c.nemesis("zombie_killed", zombie=zombie.name)
            await asyncio.to_thread(zombie.kill9)
            if not await sleep_until(rng, 1, 2, until):
                return

    await run_faults(cluster, nemesis, DURATION[length], rng)
    cluster.notes.append(f"answers of the zombie: {zombie_answers}")
    fenced = sum("taken over" in line or "FencingLost" in line
                 for e in cluster.engines for line in e.lines)
    cluster.notes.append(f"fenced commit log lines: {fenced}")
    report = await finish(cluster)
    assert zombie_answers and "ok" not in zombie_answers, zombie_answers
    assert report.counts["acked_ok_ids"] > 0


# -- everything at once ----------------------------------------------------------------------------

@pytest.mark.parametrize("length", LENGTHS)
async def test_combined_chaos(make_cluster, request, length):
    """A random mix, one fault at a time, each healed before the next: engine SIGKILL or
    SIGSTOP, Postgres crash, pause or backend kills, network faults on either leg, Redis
    down (Jepsen's rotating nemesis, as in reliability.md T12)."""
    seed = seed_for(request, length, 114)
    rng = random.Random(seed)
    cluster = await make_cluster("combined chaos", seed=seed)
    done: list[str] = []

    async def engine_kill(c):
        await c.restart_engine(down_seconds=rng.uniform(0, 0.5))

    async def engine_pause(c):
        c.engine.pause()
        await asyncio.sleep(rng.uniform(0.5, 2))
        c.engine.resume()

    async def pg_crash(c):
        await asyncio.to_thread(c.pg.stop_immediate)
        await asyncio.sleep(rng.uniform(0.1, 0.8))
        await asyncio.to_thread(c.pg.start)

    async def pg_pause(c):
        c.pg.pause()
        await asyncio.sleep(rng.uniform(0.5, 2.5))
        c.pg.resume()

    async def backend_kill(c):
        await c.pg.kill_backends(c.database)

    async def net(c):
        proxy = rng.choice([c.pg_proxy, c.front])
        fault = rng.choice(["delay", "blackhole", "drop_responses", "reset"])
        if fault == "delay":
            proxy.delay(rng.uniform(20, 200))
        elif fault == "reset":
            proxy.reset()
        else:
            getattr(proxy, fault)()
        await asyncio.sleep(rng.uniform(0.3, 2))
        proxy.pass_()

    async def redis_down(c):
        c.redis.kill()
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        await asyncio.to_thread(c.redis.start)

    faults = [engine_kill, engine_pause, pg_crash, pg_pause, backend_kill, net, redis_down]

    async def nemesis(c, rng, until):
        while await sleep_until(rng, 0.3, 1.0, until):
            fault = rng.choice(faults)
            c.nemesis(fault.__name__)
            done.append(fault.__name__)
            await fault(c)

    await run_faults(cluster, nemesis, DURATION[length], rng)
    cluster.notes.append(f"faults: {dict(sorted(Counter(done).items()))}")
    t0 = time.monotonic()
    assert await cluster.workload.probe_commit(RECOVERY_BOUND_SECONDS) is not None
    cluster.figures["first_commit_after_last_fault_s"].append(time.monotonic() - t0)
    report = await finish(cluster)
    assert report.counts["acked_ok_ids"] > 0


# -- found by this suite: fails until the engine is fixed (see the docstring) -----------------

async def test_standby_lease_wait_is_bounded_when_the_owner_stalls_in_a_commit(make_cluster,
                                                                             request):
    """The owner is SIGSTOPped inside its write transaction (its fenced `UPDATE shards` done,
    so it holds the shard rows), then its lease session is terminated (as by an operator, or
    a network fault on that one connection). A standby started with --lease-wait-seconds 3
    gets the advisory locks, then must take over or give up within its lease wait: it must
    not wait, unbounded, behind the stalled owner's row locks.

    Engine bug (fails today): Store.acquire_lease bumps the epochs with
    `UPDATE shards SET epoch = epoch + 1 ...` with no lock_timeout, after the advisory-lock
    wait loop, so the standby blocks on Lock/transactionid for as long as the owner stays
    stopped; --lease-wait-seconds bounds only the advisory-lock polling."""
    seed = seed_for(request, "short", 115)
    cluster = await make_cluster("standby vs owner stalled mid-commit", seed=seed)
    owner = cluster.engine
    cluster.workload.start()
    await asyncio.sleep(0.5)
    # "UPDATE 4" completes the fenced shard update, the first statement of every write
    # transaction (4 shards); asyncpg sends the SQL text only once, then a prepared statement.
    hook = cluster.pg_proxy.add_hook(Hook(
        S2C, b"UPDATE 4\x00", "before", lambda pair, pid=owner.pid: os.kill(pid, signal.SIGSTOP)))
    assert await asyncio.to_thread(hook.fired.wait, 10), "the owner never committed"
    cluster.workload.stop()
    await asyncio.sleep(0.2)
    holders = await cluster.pg.lease_holders(cluster.database)
    await cluster.pg.kill_backends(cluster.database, pids=holders)
    standby = cluster.new_engine("standby", lease_wait_seconds=3)
    started = time.monotonic()
    starting = asyncio.create_task(asyncio.to_thread(standby.start, 30))
    done, _ = await asyncio.wait([starting], timeout=15)
    waited = time.monotonic() - started
    activity = await cluster.pg.activity(cluster.database)
    cluster.figures["standby_decided_after_s"].append(waited)
    owner.resume()  # let the stalled owner finish: the standby then proceeds
    address = await asyncio.wait_for(starting, 60)
    if address:
        cluster.engine = standby
        cluster.front.set_upstream(address)
        await asyncio.to_thread(owner.kill9)
    report = await finish(cluster)
    assert done, (f"the standby (lease wait 3 s) was still starting {waited:.0f} s later, "
                  f"blocked behind the stalled owner's transaction: {activity}")
    assert report.valid
