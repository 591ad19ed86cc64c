"""One chaos scenario's world: a database on a shared Postgres, its own Redis, the engine (or
two), a fault proxy on each leg, the workload, the history log, and the figures.

    client tasks ─▶ front FaultProxy ─▶ engine ─▶ pg FaultProxy ─▶ Postgres (TCP)
                                           └──▶ Redis
The checker reads Postgres through its unix socket (never through a proxy) and looks ids up
through the engine directly.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import random
import statistics
import time
import uuid
from collections import defaultdict

from chaos.checker import CheckReport, check
from chaos.controllers import (RECOVERY_BOUND_SECONDS, EngineController, FaultProxy,
                               PostgresController, RedisController)
from chaos.history import HistoryLog
from chaos.workload import Workload, WorkloadConfig

SEED_ENV = "TXENGINE_CHAOS_SEED"


def chaos_seed(config, default: int | None) -> int:
    """--chaos-seed, else $TXENGINE_CHAOS_SEED, else `default`, else a random seed."""
    try:
        option = config.getoption("--chaos-seed")
    except ValueError:  # the option is registered only when tests/chaos is named
        option = None
    if option is not None:
        return int(option)
    if os.environ.get(SEED_ENV):
        return int(os.environ[SEED_ENV])
    return default if default is not None else random.randrange(1, 1_000_000)


class ChaosCluster:
    def __init__(self, name: str, pg: PostgresController, workdir: pathlib.Path, *, seed: int,
                 config: WorkloadConfig | None = None, shards: int = 4, pg_proxy: bool = True,
                 clock: bool = False):
        self.name = name
        self.pg = pg
        self.workdir = pathlib.Path(workdir)
        self.seed = seed
        self.config = config or WorkloadConfig()
        self.shards = shards
        self.use_pg_proxy = pg_proxy
        self.clock_file = self.workdir / "engine-clock-offset-ns" if clock else None
        self.database = f"chaos_{uuid.uuid4().hex[:10]}"
        self.figures: dict[str, list[float]] = defaultdict(list)
        self.notes: list[str] = []
        self.engines: list[EngineController] = []
        self.redis: RedisController | None = None
        self.pg_proxy: FaultProxy | None = None
        self.front: FaultProxy | None = None
        self.engine: EngineController | None = None
        self.history = HistoryLog(self.workdir / "history.jsonl")
        self.workload: Workload | None = None
        self.started_at = time.monotonic()

    # -- set-up ------------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        """What the checker reads: Postgres itself, over its unix socket."""
        return self.pg.admin_url(self.database)

    @property
    def engine_database_url(self) -> str:
        port = self.pg_proxy.port if self.pg_proxy is not None else None
        return self.pg.url(self.database, port=port)

    def new_engine(self, name: str = "engine", **kwargs) -> EngineController:
        kwargs.setdefault("clock_file", self.clock_file)
        engine = EngineController(self.engine_database_url, self.redis.url, shards=self.shards,
                                  log_path=self.workdir / "engines.log", name=name, **kwargs)
        self.engines.append(engine)
        return engine

    async def start(self) -> "ChaosCluster":
        await self.pg.create_database(self.database)
        self.redis = RedisController()
        await asyncio.to_thread(self.redis.start)
        if self.use_pg_proxy:
            self.pg_proxy = FaultProxy(("127.0.0.1", self.pg.port), name="engine-pg").start()
        self.front = FaultProxy(None, name="client-engine", connect_retry_seconds=1.0).start()
        self.engine = self.new_engine()
        address = await asyncio.to_thread(self.engine.start)
        assert address, "engine did not start:\n" + "\n".join(self.engine.lines[-30:])
        self.front.set_upstream(address)
        self.figures["engine_serving_after_spawn_s"].append(
            await asyncio.to_thread(self.engine.wait_serving))
        self.workload = Workload(self.front.address, self.history, self.config, self.seed)
        await self.workload.setup()
        return self

    # -- faults ------------------------------------------------------------------------------

    def nemesis(self, what: str, **fields) -> None:
        self.history.write("nemesis", what=what, **fields)

    async def restart_engine(self, engine: EngineController | None = None,
                             down_seconds: float = 0.0) -> float:
        """SIGKILL, wait `down_seconds`, start again; returns seconds from spawn to SERVING."""
        engine = engine or self.engine
        await asyncio.to_thread(engine.kill9)
        if down_seconds:
            await asyncio.sleep(down_seconds)
        return await self.start_engine(engine)

    async def start_engine(self, engine: EngineController | None = None) -> float:
        engine = engine or self.engine
        deadline = time.monotonic() + RECOVERY_BOUND_SECONDS
        while True:
            address = await asyncio.to_thread(engine.start)
            if address:
                break
            # Exited without serving (e.g. killed by a hook during start-up): try again.
            assert time.monotonic() < deadline, \
                f"{engine.name} never served again:\n" + "\n".join(engine.lines[-30:])
            await asyncio.sleep(0.2)
        self.front.set_upstream(address)
        seconds = await asyncio.to_thread(engine.wait_serving)
        self.figures["engine_serving_after_spawn_s"].append(seconds)
        return seconds

    async def heal(self) -> None:
        """Every fault off; Postgres and Redis up; the engine serving."""
        for proxy in (self.pg_proxy, self.front):
            if proxy is not None:
                proxy.clear_hooks()
                proxy.pass_()
        if self.pg.paused:
            self.pg.resume()
        if self.pg.pid is None:
            await asyncio.to_thread(self.pg.start)
        if self.redis.paused:
            self.redis.resume()
        if not self.redis.ping():
            await asyncio.to_thread(self.redis.restart)
        for engine in self.engines:
            engine.resume()
        if not self.engine.running:
            await self.start_engine()
        else:
            await asyncio.to_thread(self.engine.wait_serving)

    # -- the end -----------------------------------------------------------------------------

    async def finish(self, settle_seconds: float = 20.0) -> CheckReport:
        """Heal, let the clients get definite answers, then check the history."""
        await self.heal()
        t0 = time.monotonic()
        await self.workload.drain(settle_seconds)
        self.figures["drain_s"].append(time.monotonic() - t0)
        self.history.flush()
        t0 = time.monotonic()
        report = await check(self.history.path, self.database_url, self.engine.address)
        self.figures["check_s"].append(time.monotonic() - t0)
        self.print_report(report)
        return report

    def print_report(self, report: CheckReport) -> None:
        stats = self.workload.stats if self.workload else {}
        statuses = {k.removeprefix("status_"): v for k, v in sorted(stats.items())
                    if k.startswith("status_")}
        lines = [
            f"\n[chaos] {self.name} seed={self.seed} "
            f"({time.monotonic() - self.started_at:.1f} s, data in {self.workdir})",
            f"  workload: requests={stats.get('requests', 0)} attempts={stats.get('attempts', 0)} "
            f"retries={stats.get('retries', 0)} acked_ok_items={stats.get('acked_ok', 0)} "
            f"exists_items={stats.get('acked_exists', 0)} "
            f"item_failures={stats.get('item_failures', 0)} errors={statuses or 'none'} "
            f"unresolved_requests={stats.get('unresolved_requests', 0)}",
            "  kinds: " + ", ".join(f"{k.removeprefix('requests_')}={v}"
                                    for k, v in sorted(stats.items())
                                    if k.startswith("requests_")),
        ]
        for name, values in self.figures.items():
            if values:
                lines.append(f"  {name}: n={len(values)} min={min(values):.3f} "
                             f"mean={statistics.fmean(values):.3f} max={max(values):.3f}")
        lines += [f"  note: {n}" for n in self.notes]
        lines.append("  " + report.summary().replace("\n", "\n  "))
        print("\n".join(lines), flush=True)
        (self.workdir / "figures.json").write_text(json.dumps({
            "scenario": self.name, "seed": self.seed, "valid": report.valid,
            "workload": dict(stats), "checker": dict(report.counts),
            "figures": {k: v for k, v in self.figures.items()}, "notes": self.notes,
            "violations": report.violations}, indent=1, default=str))

    async def close(self) -> None:
        if self.workload is not None:
            with_timeout = asyncio.wait_for(self.workload.drain(0), 15)
            try:
                await with_timeout
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
            await self.workload.close()
        for engine in self.engines:
            engine.resume()
            await asyncio.to_thread(engine.kill9)
        for proxy in (self.front, self.pg_proxy):
            if proxy is not None:
                proxy.stop()
        if self.pg.paused:
            self.pg.resume()
        if self.pg.pid is None:
            await asyncio.to_thread(self.pg.start)
        if self.redis is not None:
            self.redis.close()
        self.history.close()
