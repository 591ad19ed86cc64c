"""`txengine capacity`: a stepped load, the knee, a sizing model, and a report to act on.

The engine runs in this process over its own embedded Postgres (or --database-url), exactly as
in `txengine bench`, and the load comes from bench's generator processes: each step runs C
closed-loop clients sending requests of B transfers, so C x B transfers are in flight. Per step
it measures throughput and request latency, the CPU seconds of the engine process and of every
Postgres process (psutil), WAL bytes (pg_current_wal_lsn) and table bytes
(pg_total_relation_size) written.

From the steps it finds the knee (highest throughput whose p99 meets --p99-ms) and fits:

* CPU cost per transfer, engine = a + b/B (per transfer + per request of B transfers) and
  Postgres = a + b/K (per transfer + per commit of K transfers);
* a throughput model from that demand: the commit path gets a share of the cores other work
  leaves free, up to what one engine can use, and with N transfers in flight latency is
  L = alpha + N*D/U (D CPU seconds per transfer, U cores), throughput N/L, p99 ~ rho*L;
* bytes per transfer of WAL and of the transfers table with its indexes.

One step is held out of every fit and predicted, so the report states how well the model
predicts a load it has not seen. The report (Markdown, JSON and PNG plots) answers "what do we
need for X transfers/s at p99 <= Y ms, and how much storage per month", with its assumptions.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
import psutil

from engine import bench
from engine.limits import COMMIT_ITEMS_MAX

SECONDS_PER_MONTH = 30 * 86_400
MIN_CORES = 0.01
DEFAULT_STEPS = "1x16,1x64,2x128,2x512,4x512,2x2048,4x2048,4x4096"
WARMUP = (1, 256, 20)  # clients, batch, requests per client: fills caches, not measured


@dataclasses.dataclass(frozen=True)
class Step:
    clients: int
    batch: int

    @property
    def in_flight(self) -> int:
        return self.clients * self.batch

    @property
    def label(self) -> str:
        return f"{self.clients}x{self.batch}"


@dataclasses.dataclass
class StepResult:
    """What one step measured; CPU in seconds, sizes in bytes, latency in milliseconds."""

    clients: int
    batch: int
    requests: int
    transfers: int
    ok: int
    seconds: float
    transfers_per_second: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    engine_cpu_seconds: float
    postgres_cpu_seconds: float
    generator_cpu_seconds: float
    machine_busy_seconds: float  # every CPU of the machine, whoever used it
    cpus: int
    wal_bytes: int
    transfers_table_bytes: int
    database_bytes: int
    commits: int
    committed_items: int

    @property
    def step(self) -> Step:
        return Step(self.clients, self.batch)

    @property
    def effective_latency_seconds(self) -> float:
        """In-flight transfers over throughput (Little's law): what the latency model fits."""
        return self.clients * self.batch / self.transfers_per_second

    @property
    def items_per_commit(self) -> float:
        return self.committed_items / max(1, self.commits)

    @property
    def others_cores(self) -> float:
        """Cores busy with work that is not this measurement's (other users of the machine)."""
        ours = self.engine_cpu_seconds + self.postgres_cpu_seconds + self.generator_cpu_seconds
        return max(0.0, (self.machine_busy_seconds - ours) / self.seconds)

    @property
    def free_cores(self) -> float:
        """Cores the other work left to this measurement (at least a twentieth of one)."""
        return max(0.05, self.cpus - self.others_cores)

    @property
    def used_cores(self) -> float:
        """Cores this measurement used: engine, Postgres and load generators."""
        ours = self.engine_cpu_seconds + self.postgres_cpu_seconds + self.generator_cpu_seconds
        return ours / self.seconds

    @property
    def engine_cpu_per_transfer(self) -> float:
        return self.engine_cpu_seconds / self.transfers

    @property
    def postgres_cpu_per_transfer(self) -> float:
        return self.postgres_cpu_seconds / self.transfers


# -- measuring ---------------------------------------------------------------------------------

class PostgresProcesses:
    """CPU seconds of the postmaster and every process it started (backends, WAL writer,
    checkpointer, autovacuum), found from the backend of a connection."""

    def __init__(self, backend_pid: int):
        self.postmaster = None
        try:
            backend = psutil.Process(backend_pid)
            self.postmaster = backend.parent()
        except (psutil.Error, ProcessLookupError):
            pass  # Postgres on another host: its CPU is not measured

    @property
    def measured(self) -> bool:
        return self.postmaster is not None

    def cpu_seconds(self) -> dict[int, float]:
        if self.postmaster is None:
            return {}
        seconds = {}
        for process in [self.postmaster, *self.postmaster.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            seconds[process.pid] = times.user + times.system
        return seconds


def _cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(value - before.get(pid, 0.0) for pid, value in after.items())


def _lsn_bytes(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


async def _storage(conn) -> dict[str, int]:
    row = await conn.fetchrow(
        """SELECT pg_current_wal_lsn()::text AS lsn,
                  (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)
                     FROM pg_partition_tree('transfers')) AS transfers,
                  pg_database_size(current_database()) AS database""")
    return {"wal": _lsn_bytes(row["lsn"]), "transfers": int(row["transfers"]),
            "database": int(row["database"])}


def _engine_cpu_seconds() -> float:
    times = psutil.Process().cpu_times()
    return times.user + times.system


def _processes_cpu_seconds(processes: list[psutil.Process]) -> float:
    """CPU of the generators; an exited one that is not yet joined still reports its times."""
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


async def _next(results, timeout_seconds: float = 600.0):
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            return results.get_nowait()
        except Exception:
            if time.monotonic() > deadline:
                raise TimeoutError("a load generator did not answer")
            await asyncio.sleep(0.01)


class Progress:
    """One line per step; on a terminal also a live line while the step runs."""

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.live = stream.isatty()

    def say(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K")
        print(text, file=self.stream, flush=True)

    def tick(self, text: str) -> None:
        if self.live:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()


async def run_step(app, account_ids: list[bytes], step: Step, requests: int, probe,
                   postgres: PostgresProcesses, progress: Progress, label: str) -> StepResult:
    """Spawn the step's generators, let them build their requests, then measure the send."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Event(), context.Queue()
    seed_base = int.from_bytes(os.urandom(4), "big")
    procs = [context.Process(target=bench._generator, args=(
        app.address, account_ids, requests, step.batch, seed_base + i, start, results))
        for i in range(step.clients)]
    for proc in procs:
        proc.start()
    progress.tick(f"{label}: building {step.clients} x {requests} requests of {step.batch}")
    for _ in procs:
        await _next(results)
    generators = [psutil.Process(proc.pid) for proc in procs]
    stages_before = app.engine.stages.snapshot()
    storage_before = await _storage(probe)
    postgres_before = postgres.cpu_seconds()
    engine_before = _engine_cpu_seconds()
    generators_before = _processes_cpu_seconds(generators)
    machine_before = _machine_busy_seconds()
    began = time.perf_counter()
    start.set()
    latencies, ok = [], 0
    for done in range(len(procs)):
        progress.tick(f"{label}: running, {done}/{len(procs)} clients done, "
                      f"{time.perf_counter() - began:.1f} s")
        message = await _next(results)
        latencies.extend(message[1])
        ok += message[2]
    elapsed = time.perf_counter() - began
    machine_busy = _machine_busy_seconds() - machine_before
    engine_cpu = _engine_cpu_seconds() - engine_before
    postgres_cpu = _cpu_delta(postgres_before, postgres.cpu_seconds())
    generator_cpu = _processes_cpu_seconds(generators) - generators_before  # exited: zombies
    storage_after = await _storage(probe)
    stages_after = app.engine.stages.snapshot()
    for proc in procs:
        proc.join()
    transfers = requests * step.batch * step.clients
    latency_ms = np.array(latencies) * 1000
    return StepResult(
        clients=step.clients, batch=step.batch, requests=requests * step.clients,
        transfers=transfers, ok=ok, seconds=elapsed, transfers_per_second=transfers / elapsed,
        mean_ms=float(latency_ms.mean()), p50_ms=float(np.percentile(latency_ms, 50)),
        p99_ms=float(np.percentile(latency_ms, 99)),
        engine_cpu_seconds=engine_cpu, postgres_cpu_seconds=postgres_cpu,
        generator_cpu_seconds=generator_cpu, machine_busy_seconds=machine_busy,
        cpus=psutil.cpu_count(),
        wal_bytes=storage_after["wal"] - storage_before["wal"],
        transfers_table_bytes=storage_after["transfers"] - storage_before["transfers"],
        database_bytes=storage_after["database"] - storage_before["database"],
        commits=stages_after["batches"] - stages_before["batches"],
        committed_items=stages_after["items"] - stages_before["items"],
    )


def plan_requests(step: Step, measured: list[StepResult], step_seconds: float,
                  min_requests: int) -> int:
    """Requests per client for about step_seconds, estimated from the steps so far: the
    lowest-latency guess (Little's law with the last step's latency), capped at 1.5x the best
    throughput seen, so a saturated step runs at most 1.5x longer than planned."""
    if not measured:
        return min_requests
    last = measured[-1]
    best = max(r.transfers_per_second for r in measured)
    estimate = min(step.in_flight / last.effective_latency_seconds, 1.5 * best)
    return max(min_requests, math.ceil(estimate * step_seconds / step.in_flight))


# -- the model ---------------------------------------------------------------------------------

@dataclasses.dataclass
class CostModel:
    """CPU seconds per transfer = fixed + per_unit/units (units: batch or items per commit)."""

    fixed: float
    per_unit: float

    @classmethod
    def fit(cls, units: list[float], cost: list[float]) -> CostModel:
        x = np.column_stack([np.ones(len(units)), 1 / np.array(units, float)])
        return cls(*_nonnegative_fit(x, np.array(cost)))

    def per_transfer(self, units: float) -> float:
        return self.fixed + self.per_unit / units


def _nonnegative_fit(x: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares with every coefficient >= 0: a negative cost has no physical meaning, so
    a column that would get one is dropped and the rest refitted."""
    active = list(range(x.shape[1]))
    while True:
        solution, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        negative = [a for a, s in zip(active, solution) if s < 0]
        if not negative or len(active) == 1:
            break
        active.remove(negative[0])
    coefficients = [0.0] * x.shape[1]
    for a, s in zip(active, solution):
        coefficients[a] = max(0.0, float(s))
    return coefficients


@dataclasses.dataclass
class Model:
    """Throughput and latency of a closed-loop load from its CPU demand.

    Every transfer costs D CPU seconds: engine e(B) + Postgres p(K) (+ the load generators'
    g(B) when they share the machine), with B transfers per request and K per commit. The
    commit path gets U cores: a share eta of the cores other work leaves free, at most
    cores_max (the engine's event loop and its writer's Postgres backend take turns on each
    batch, so the path cannot use many cores however many there are). With N transfers in
    flight, latency is L = alpha + N*D/U (alpha: time no CPU shortens, the fsync of COMMIT and
    round trips), throughput N/L and p99 rho*L.
    """

    engine_cpu: CostModel
    postgres_cpu: CostModel | None
    generator_cpu: CostModel
    commit_share: dict[int, float]  # items per commit / transfers per request, by clients
    eta: float
    cores_max: float
    alpha: float
    rho: float

    @classmethod
    def fit(cls, results: list[StepResult], postgres_measured: bool) -> Model:
        batch = [r.batch for r in results]
        model = cls(
            engine_cpu=CostModel.fit(batch, [r.engine_cpu_per_transfer for r in results]),
            postgres_cpu=CostModel.fit([r.items_per_commit for r in results],
                                       [r.postgres_cpu_per_transfer for r in results])
            if postgres_measured else None,
            generator_cpu=CostModel.fit(batch, [r.generator_cpu_seconds / r.transfers
                                                for r in results]),
            commit_share={c: float(np.median([r.items_per_commit / r.batch for r in results
                                              if r.clients == c]))
                          for c in sorted({r.clients for r in results})},
            # CPU times tick in 10 ms: a step too short to register any keeps the model finite.
            eta=max(MIN_CORES, float(np.median([r.used_cores / r.free_cores for r in results]))),
            cores_max=max(MIN_CORES, *(r.used_cores for r in results)),
            alpha=0.0, rho=1.0,
        )
        # alpha and rho from what the CPU demand does not explain.
        unexplained = [r.effective_latency_seconds - r.step.in_flight
                       * model.cpu_per_transfer(r.step, True, r.items_per_commit)
                       / model.cores(r.free_cores) for r in results]
        model.alpha = max(0.0, float(np.median(unexplained)))
        model.rho = float(np.median([r.p99_ms / 1000 / r.effective_latency_seconds
                                     for r in results]))
        return model

    def items_per_commit(self, step: Step) -> float:
        share = self.commit_share.get(step.clients, max(1.0, step.clients / 2))
        return min(step.batch * share, float(COMMIT_ITEMS_MAX))

    def cpu_per_transfer(self, step: Step, generators: bool,
                         items_per_commit: float | None = None) -> float:
        commit = items_per_commit or self.items_per_commit(step)
        cost = self.engine_cpu.per_transfer(step.batch)
        if self.postgres_cpu is not None:
            cost += self.postgres_cpu.per_transfer(commit)
        if generators:
            cost += self.generator_cpu.per_transfer(step.batch)
        return cost

    def cores(self, free_cores: float | None) -> float:
        """Cores of the commit path; None: a host with nothing else on it."""
        return self.cores_max if free_cores is None else min(self.eta * free_cores,
                                                             self.cores_max)

    def latency_seconds(self, step: Step, free_cores: float | None = None,
                        generators: bool = False) -> float:
        demand = step.in_flight * self.cpu_per_transfer(step, generators)
        return max(self.alpha + demand / self.cores(free_cores), 1e-9)

    def throughput(self, step: Step, free_cores: float | None = None,
                   generators: bool = False) -> float:
        return step.in_flight / self.latency_seconds(step, free_cores, generators)

    def p99_ms(self, step: Step, free_cores: float | None = None,
               generators: bool = False) -> float:
        return self.rho * self.latency_seconds(step, free_cores, generators) * 1000

    def as_measured(self, r: StepResult) -> tuple[float, float]:
        """(throughput, p99 ms) the model gives for a measured step: its load, its generators
        and the CPU other work left it."""
        return (self.throughput(r.step, r.free_cores, True),
                self.p99_ms(r.step, r.free_cores, True))

    def plan(self, p99_ms: float, batch: int) -> dict | None:
        """On a host of its own: the most concurrent requests of `batch` transfers whose p99
        meets the objective, and the throughput they give; None if even one request misses."""
        latency_max = p99_ms / 1000 / self.rho
        best = None
        for clients in range(1, 4097):
            step = Step(clients, batch)
            if self.latency_seconds(step) > latency_max:
                break
            best = step
        if best is None:
            return None
        return {"batch": batch, "clients": best.clients, "in_flight": best.in_flight,
                "transfers_per_second": self.throughput(best), "p99_ms": self.p99_ms(best),
                "items_per_commit": self.items_per_commit(best)}


def _error(predicted: float, measured: float) -> float:
    return (predicted - measured) / measured if measured else float("nan")


def holdout_check(results: list[StepResult], holdout: int, postgres_measured: bool) -> dict:
    """Fit without step `holdout`, then predict it from its load and the CPU it was left."""
    training = [r for i, r in enumerate(results) if i != holdout]
    model = Model.fit(training, postgres_measured)
    held = results[holdout]
    throughput, p99 = model.as_measured(held)
    check = {
        "step": held.step.label,
        "free_cores": held.free_cores,
        "throughput": {"predicted": throughput, "measured": held.transfers_per_second},
        "p99_ms": {"predicted": p99, "measured": held.p99_ms},
        "engine_cpu_us_per_transfer": {
            "predicted": model.engine_cpu.per_transfer(held.batch) * 1e6,
            "measured": held.engine_cpu_per_transfer * 1e6},
    }
    if model.postgres_cpu is not None:
        check["postgres_cpu_us_per_transfer"] = {
            "predicted": model.postgres_cpu.per_transfer(model.items_per_commit(held.step)) * 1e6,
            "measured": held.postgres_cpu_per_transfer * 1e6}
    for value in check.values():
        if isinstance(value, dict):
            value["error"] = _error(value["predicted"], value["measured"])
    return check


def leave_one_out(results: list[StepResult], postgres_measured: bool) -> dict:
    """Throughput error of every step predicted by a model fitted without it; the first and
    the last step are extrapolations, the others interpolations."""
    errors = {results[i].step.label: holdout_check(results, i, postgres_measured)
              ["throughput"]["error"] for i in range(len(results))}
    interior = [abs(e) for e in list(errors.values())[1:-1]]
    return {"errors": errors, "interior_median_abs_error": float(np.median(interior)),
            "interior_max_abs_error": float(np.max(interior))}


def find_knee(results: list[StepResult], p99_ms: float) -> StepResult | None:
    within = [r for r in results if r.p99_ms <= p99_ms]
    return max(within, key=lambda r: r.transfers_per_second) if within else None


# -- sizing ------------------------------------------------------------------------------------

def sizing(model: Model, results: list[StepResult], args: argparse.Namespace) -> dict:
    """What the target load needs, from the model fitted on every step, for engines that have
    their host to themselves: one engine's throughput within the objective at the batch size
    given (--plan-batch) or else the best of the measured ones, its CPU per transfer, and the
    engine count from the target and the headroom."""
    measured = sorted({r.batch for r in results})
    candidates = sorted(set(measured) | ({args.plan_batch} if args.plan_batch else set()))
    plans = {b: model.plan(args.p99_ms, b) for b in candidates}
    if args.plan_batch:
        plan = plans[args.plan_batch]
    else:
        plan = max((p for b, p in plans.items() if p is not None and b in measured),
                   key=lambda p: p["transfers_per_second"], default=None)
    batch = plan["batch"] if plan else (args.plan_batch or measured[-1])
    engine_tps = plan["transfers_per_second"] if plan else 0.0
    commit = plan["items_per_commit"] if plan else float(batch)
    engine_cpu = model.engine_cpu.per_transfer(batch)
    postgres_cpu = (model.postgres_cpu.per_transfer(commit)
                    if model.postgres_cpu is not None else None)
    target, headroom = args.target_tps, args.headroom
    engines = math.ceil(target / (engine_tps * headroom)) if engine_tps > 0 else None
    transfers = sum(r.transfers for r in results)
    wal_per_transfer = sum(r.wal_bytes for r in results) / transfers
    table_per_transfer = sum(r.transfers_table_bytes for r in results) / transfers
    average = args.average_tps if args.average_tps is not None else target
    return {
        "target_tps": target, "p99_ms": args.p99_ms, "headroom": headroom,
        "plan_batch": batch, "plan_clients": plan["clients"] if plan else 0,
        "plan_extrapolated": batch > measured[-1],
        "in_flight_transfers": plan["in_flight"] if plan else 0,
        "plan_p99_ms": plan["p99_ms"] if plan else None,
        "per_engine_tps_within_objective": engine_tps,
        "per_engine_tps_by_batch": {str(b): p["transfers_per_second"] if p else 0.0
                                    for b, p in plans.items()},
        "engines": engines,
        "engine_cores_total": target * engine_cpu / headroom,
        "engine_cores_per_engine": (target / engines) * engine_cpu / headroom if engines else None,
        "postgres_cores_total": target * postgres_cpu / headroom if postgres_cpu else None,
        "engine_tps_per_core": 1 / engine_cpu if engine_cpu else None,
        "postgres_tps_per_core": 1 / postgres_cpu if postgres_cpu else None,
        "wal_bytes_per_transfer": wal_per_transfer,
        "table_bytes_per_transfer": table_per_transfer,
        "average_tps": average,
        "table_bytes_per_month": average * SECONDS_PER_MONTH * table_per_transfer,
        "wal_bytes_per_month": average * SECONDS_PER_MONTH * wal_per_transfer,
        "wal_bytes_per_second_at_target": target * wal_per_transfer,
    }


# -- the report --------------------------------------------------------------------------------

def _si(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}".rstrip()
    return f"{value:.3g} {unit}".rstrip()


def _bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for factor, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {name}"
    return f"{value:.3g} B"


def _plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def _pct(error: float) -> str:
    return f"{error * 100:+.1f} %"


def headline(report: dict) -> list[str]:
    knee, check, size = report["knee"], report["holdout"], report["sizing"]
    lines = []
    if knee:
        lines.append(f"Knee: **{knee['transfers_per_second']:,.0f} transfers/s** at p99 "
                     f"{knee['p99_ms']:.1f} ms (step {knee['clients']}x{knee['batch']}; "
                     f"objective p99 <= {report['p99_ms']:g} ms).")
    else:
        lines.append(f"Knee: no step met p99 <= {report['p99_ms']:g} ms.")
    if knee:
        engine, postgres = (knee["transfers"] / knee[key] if knee[key] > 0 else None
                            for key in ("engine_cpu_seconds", "postgres_cpu_seconds"))
        lines.append(f"Per core at the knee (measured): engine {_count(engine)} transfers/s, "
                     f"Postgres {_count(postgres)} transfers/s.")
    lines.append(f"Per core in the sizing (model, {size['plan_batch']:,} transfers per request): "
                 f"engine {_count(size['engine_tps_per_core'])} transfers/s, Postgres "
                 f"{_count(size['postgres_tps_per_core'])} transfers/s.")
    lines.append(f"Storage: {size['table_bytes_per_transfer']:.0f} bytes/transfer in the "
                 f"transfers table and its indexes, {size['wal_bytes_per_transfer']:.0f} bytes/"
                 "transfer of WAL.")
    lines.append(f"Model check on held-out step {check['step']}: throughput predicted "
                 f"{check['throughput']['predicted']:,.0f}/s vs measured "
                 f"{check['throughput']['measured']:,.0f}/s "
                 f"({_pct(check['throughput']['error'])}); p99 predicted "
                 f"{check['p99_ms']['predicted']:.1f} ms vs {check['p99_ms']['measured']:.1f} ms "
                 f"({_pct(check['p99_ms']['error'])}).")
    return lines


def render_markdown(report: dict) -> str:
    size, model, env = report["sizing"], report["model"], report["environment"]
    out = ["# txengine capacity report", "",
           f"{env['generated']} on {env['host']}: {env['cpus']} CPUs, "
           f"{_bytes(env['memory_bytes'])} RAM, Postgres {env['postgres_version']}, "
           f"{env['shards']} shards, {env['accounts']:,} accounts. Objective: p99 <= "
           f"{report['p99_ms']:g} ms.", "", "## Headline", ""]
    out += [f"* {line}" for line in headline(report)]
    out += ["", f"## What {size['target_tps']:,.0f} transfers/s at p99 <= {size['p99_ms']:g} ms "
            "needs", ""]
    out += _sizing_lines(size)
    out += ["", "## Steps", "",
            "| step | requests | transfers | transfers/s | model transfers/s | p50 ms | p99 ms | "
            "items/commit | engine cores | Postgres cores | other load (cores) | "
            "engine µs CPU/transfer | Postgres µs CPU/transfer | WAL B/transfer | "
            "table B/transfer |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["steps"]:
        out.append(
            f"| {r['clients']}x{r['batch']}{' (held out)' if r['held_out'] else ''}"
            f"{' (knee)' if r['knee'] else ''} | {r['requests']:,} | {r['transfers']:,} | "
            f"{r['transfers_per_second']:,.0f} | {r['predicted_transfers_per_second']:,.0f} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
            f"{r['items_per_commit']:,.0f} | {r['engine_cpu_seconds'] / r['seconds']:.2f} | "
            f"{r['postgres_cpu_seconds'] / r['seconds']:.2f} | {r['others_cores']:.2f} | "
            f"{r['engine_cpu_seconds'] / r['transfers'] * 1e6:.1f} | "
            f"{r['postgres_cpu_seconds'] / r['transfers'] * 1e6:.1f} | "
            f"{r['wal_bytes'] / r['transfers']:.0f} | "
            f"{r['transfers_table_bytes'] / r['transfers']:.0f} |")
    out += ["", "## Model", "", *_model_lines(model, report["holdout"]),
            *_leave_one_out_lines(report["leave_one_out"]), "", "## Plots", ""]
    out += [f"![{title}]({name})" for name, title in PLOTS.items()]
    out += ["", "## Assumptions", ""] + [f"* {a}" for a in report["assumptions"]]
    return "\n".join(out) + "\n"


def _sizing_lines(size: dict) -> list[str]:
    lines = [
        f"* **Engines (one Postgres database each): {size['engines'] or 'n/a'}.** One engine "
        f"sustains about {size['per_engine_tps_within_objective']:,.0f} transfers/s within the "
        f"objective with {_plural(size['plan_clients'], 'concurrent request')} of "
        f"{size['plan_batch']:,} transfers"
        + (" (a batch size beyond the measured ones: extrapolated)"
           if size["plan_extrapolated"] else "")
        + f" (p99 {size['plan_p99_ms'] or 0:.0f} ms), planned at {size['headroom']:.0%} of "
        "that. An engine owns every shard of its database, so more throughput than one engine "
        "gives means more databases (ledgers partitioned across them), not more replicas.",
        f"* **Engine CPU: {size['engine_cores_total']:.1f} cores in total**"
        + (f", {size['engine_cores_per_engine']:.2f} per engine" if size["engines"] else "")
        + f" ({_count(size['engine_tps_per_core'])} transfers/s per core at this batch size).",
        "* **Postgres CPU: "
        + (f"{size['postgres_cores_total']:.1f} cores in total** "
           f"({size['postgres_tps_per_core']:,.0f} transfers/s per core)."
           if size["postgres_cores_total"] is not None else "not measured** (remote Postgres)."),
        f"* **Storage: {_bytes(size['table_bytes_per_month'])} per month** of transfers table "
        f"and indexes at an average of {size['average_tps']:,.0f} transfers/s "
        f"({size['table_bytes_per_transfer']:.0f} B/transfer); "
        f"**WAL {_bytes(size['wal_bytes_per_month'])} per month** to archive, "
        f"{_bytes(size['wal_bytes_per_second_at_target'])}/s of WAL writes at the target rate.",
        "* Per batch size, transfers/s one engine sustains within the objective (0: even one "
        "request misses it): "
        + ", ".join(f"{int(b):,}: {v:,.0f}" for b, v in size["per_engine_tps_by_batch"].items())
        + ".",
    ]
    return lines


def _model_lines(model: dict, check: dict) -> list[str]:
    lines = [
        f"* Engine CPU per transfer e(B) = {model['engine_cpu']['fixed'] * 1e6:.2f} µs + "
        f"{model['engine_cpu']['per_unit'] * 1e6:.1f} µs / B (B transfers per request).",
    ]
    if model["postgres_cpu"]:
        lines.append(f"* Postgres CPU per transfer p(K) = "
                     f"{model['postgres_cpu']['fixed'] * 1e6:.2f} µs + "
                     f"{model['postgres_cpu']['per_unit'] * 1e6:.1f} µs / K (K transfers per "
                     "commit; K / B measured per number of clients: "
                     + ", ".join(f"{_plural(c, 'client')} {v:.2f}"
                                 for c, v in model["commit_share"].items())
                     + ").")
    lines += [
        f"* Load generators (only on this machine) g(B) = "
        f"{model['generator_cpu']['fixed'] * 1e6:.2f} µs + "
        f"{model['generator_cpu']['per_unit'] * 1e6:.1f} µs / B.",
        f"* The commit path uses U = min({model['eta']:.2f} x free cores, "
        f"{model['cores_max']:.2f}) cores: the engine's event loop and its writer's Postgres "
        "backend take turns on each batch, so one engine cannot use more however many cores "
        "the host has.",
        f"* Latency with N transfers in flight: L = {model['alpha'] * 1000:.2f} ms + N x D / U "
        f"(D = e + p + g CPU seconds per transfer); throughput N / L; p99 = {model['rho']:.2f} "
        "x L.",
        f"* Held-out step {check['step']} (fitted without it; given the {check['free_cores']:.2f} "
        "cores other work left free while it ran):",
    ]
    for name, value in check.items():
        if isinstance(value, dict):
            lines.append(f"  * {name}: predicted {value['predicted']:,.2f}, measured "
                         f"{value['measured']:,.2f}, error {_pct(value['error'])}")
    return lines


def _leave_one_out_lines(check: dict) -> list[str]:
    return [
        "* Every step predicted by a model fitted without it (throughput error): "
        + ", ".join(f"{step} {_pct(error)}" for step, error in check["errors"].items())
        + f". Interior steps: median {check['interior_median_abs_error']:.0%}, worst "
        f"{check['interior_max_abs_error']:.0%}; the first and last steps are extrapolations.",
    ]


PLOTS = {
    "throughput_latency.png": "Throughput and latency per step, knee and objective",
    "batch_latency.png": "Batch size versus request latency",
    "cpu_per_transfer.png": "CPU per transfer: measured and model",
    "model_check.png": "Model-predicted versus measured throughput",
}


def write_plots(report: dict, model: Model, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = report["steps"]
    tps = [r["transfers_per_second"] for r in steps]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(tps, [r["p99_ms"] for r in steps], "o-", label="p99")
    ax.plot(tps, [r["p50_ms"] for r in steps], "s--", label="p50")
    for r in steps:
        ax.annotate(f"{r['clients']}x{r['batch']}", (r["transfers_per_second"], r["p99_ms"]),
                    fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(report["p99_ms"], color="red", lw=1, label=f"objective {report['p99_ms']:g} ms")
    if report["knee"]:
        ax.plot([report["knee"]["transfers_per_second"]], [report["knee"]["p99_ms"]], "r*",
                ms=14, label="knee")
    ax.set(xlabel="transfers/s", ylabel="request latency (ms)", yscale="log",
           title="Throughput and latency per step")
    ax.legend()
    _save(fig, out / "throughput_latency.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for clients in sorted({r["clients"] for r in steps}):
        rows = sorted((r for r in steps if r["clients"] == clients), key=lambda r: r["batch"])
        ax.plot([r["batch"] for r in rows], [r["p99_ms"] for r in rows], "o-",
                label=f"p99, {clients} clients")
        ax.plot([r["batch"] for r in rows], [r["p50_ms"] for r in rows], "x:",
                label=f"p50, {clients} clients")
    ax.set(xlabel="transfers per request", ylabel="request latency (ms)", xscale="log",
           yscale="log", title="Batch size versus latency")
    ax.legend(fontsize=8)
    _save(fig, out / "batch_latency.png")

    fig, ax = plt.subplots(figsize=(7, 4.5))
    batches = np.array([r["batch"] for r in steps], float)
    curve = np.geomspace(batches.min(), batches.max(), 50)
    ax.plot(batches, [r["engine_cpu_seconds"] / r["transfers"] * 1e6 for r in steps], "o",
            label="engine, measured")
    ax.plot(curve, [model.engine_cpu.per_transfer(b) * 1e6 for b in curve], "-",
            label="engine, model")
    if model.postgres_cpu is not None:
        commit = np.array([r["items_per_commit"] for r in steps])
        ax.plot(batches, [r["postgres_cpu_seconds"] / r["transfers"] * 1e6 for r in steps], "s",
                label="Postgres, measured")
        ax.plot(batches, [model.postgres_cpu.per_transfer(k) * 1e6 for k in commit], "--",
                label="Postgres, model (at the step's items/commit)")
    measured_cpu = any(r["engine_cpu_seconds"] > 0 for r in steps)
    ax.set(xlabel="transfers per request", ylabel="CPU µs per transfer", xscale="log",
           yscale="log" if measured_cpu else "linear", title="CPU per transfer")
    ax.legend(fontsize=8)
    _save(fig, out / "cpu_per_transfer.png")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    predicted = [r["predicted_transfers_per_second"] for r in steps]
    ax.plot(tps, predicted, "o", label="fitted steps")
    held = [r for r in steps if r["held_out"]]
    ax.plot([r["transfers_per_second"] for r in held],
            [report["holdout"]["throughput"]["predicted"]], "r*", ms=14,
            label="held-out step (fitted without it)")
    top = max(tps + predicted) * 1.1
    ax.plot([0, top], [0, top], "k:", lw=1)
    ax.fill_between([0, top], [0, top * 0.8], [0, top * 1.2], color="grey", alpha=0.15,
                    label="±20 %")
    ax.set(xlabel="measured transfers/s", ylabel="predicted transfers/s",
           title="Model versus measurement", xlim=(0, top), ylim=(0, top))
    ax.legend(fontsize=8)
    _save(fig, out / "model_check.png")


def _save(fig, path: pathlib.Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


ASSUMPTIONS = [
    "Transfers are single (not linked), between two accounts drawn uniformly from the account "
    "set; no hot accounts. A hot account or linked chains change the numbers.",
    "Load comes from closed-loop clients (each waits for its answer before sending the next "
    "request), on the same machine as the engine and Postgres, sharing their CPUs; "
    "coordinated omission is not corrected.",
    "Postgres runs on this machine's disk with fsync and synchronous_commit on: its commit "
    "(fsync) latency is part of every request's latency (alpha); another disk changes it.",
    "Throughput per core assumes CPU is what runs out; one engine process runs one event loop, "
    "so adding cores to one engine helps only up to about one core of Python work plus gRPC's "
    "threads. Postgres cores scale across databases, not within the single writer's "
    "transaction.",
    "Storage per month is the transfers table with its indexes at the stated average rate, "
    "before compression or retention; WAL is what an archive receives. Accounts grow with the "
    "number of accounts, not transfers, and their updates are reclaimed by vacuum.",
    "The model is fitted over the measured range: outside it (much larger batches or much "
    "more concurrency) it extrapolates. cores_max is the most the commit path used here; on "
    "a host where nothing else competes it may use more, so one engine's throughput in the "
    "sizing is a lower bound.",
    "The machine may be shared with other work while measuring. Each step measures the CPU "
    "that other processes used (system-wide busy time minus the engine's, Postgres's and the "
    "generators'), and the model takes the cores left free as an input; the sizing assumes "
    "an engine and a Postgres that have their hosts to themselves, without load generators.",
]


def build_report(results: list[StepResult], args: argparse.Namespace, environment: dict,
                 postgres_measured: bool) -> tuple[dict, Model]:
    holdout = args.holdout if args.holdout is not None else len(results) // 2
    assert 0 <= holdout < len(results), "--holdout must name a step"
    model = Model.fit(results, postgres_measured)
    knee = find_knee(results, args.p99_ms)
    steps = []
    for index, r in enumerate(results):
        row = dataclasses.asdict(r)
        row.update(held_out=index == holdout, knee=r is knee, items_per_commit=r.items_per_commit,
                   others_cores=r.others_cores, free_cores=r.free_cores,
                   used_cores=r.used_cores,
                   predicted_transfers_per_second=model.as_measured(r)[0],
                   predicted_p99_ms=model.as_measured(r)[1])
        steps.append(row)
    report = {
        "p99_ms": args.p99_ms,
        "environment": environment,
        "steps": steps,
        "knee": dataclasses.asdict(knee) if knee else None,
        "model": dataclasses.asdict(model),
        "holdout": holdout_check(results, holdout, postgres_measured),
        "leave_one_out": leave_one_out(results, postgres_measured),
        "sizing": sizing(model, results, args),
        "assumptions": ASSUMPTIONS,
    }
    return report, model


def write_report(report: dict, model: Model, out: pathlib.Path) -> pathlib.Path:
    out.mkdir(parents=True, exist_ok=True)
    write_plots(report, model, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    path = out / "report.md"
    path.write_text(render_markdown(report))
    return path


# -- the command -------------------------------------------------------------------------------

def parse_steps(text: str) -> list[Step]:
    steps = []
    for item in text.split(","):
        clients, _, batch = item.strip().partition("x")
        steps.append(Step(int(clients), int(batch)))
    assert len(steps) >= 4, "the model needs at least 4 steps (3 to fit, 1 held out)"
    return steps


async def _database(args: argparse.Namespace, data_dir: pathlib.Path):
    """(url, embedded server or None): a fresh database, so sizes start from empty."""
    if args.database_url:
        return args.database_url, None
    import pgserver

    server = await asyncio.to_thread(pgserver.get_server, data_dir / "postgres",
                                     cleanup_mode="stop")
    name = f"capacity_{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(server.psql, f"CREATE DATABASE {name};")
    return server.get_uri(name), server


async def run(args: argparse.Namespace) -> dict:
    from engine.config import Settings
    from engine.server import app as app_module
    from engine.storage.store import connect

    progress = Progress()
    steps = parse_steps(args.steps)
    temporary = args.data_dir is None
    data_dir = pathlib.Path(args.data_dir or tempfile.mkdtemp(prefix="txengine-capacity-"))
    url, server = await _database(args, data_dir)
    settings = Settings(listen="127.0.0.1:0", database_url=url, redis_url=args.redis_url,
                        data_dir=data_dir, shards=args.shards, log_level="warning",
                        metrics_listen=args.metrics_listen)
    app = await app_module.start(settings)
    probe = await connect(url)
    try:
        postgres = PostgresProcesses(await probe.fetchval("SELECT pg_backend_pid()"))
        environment = await _environment(probe, app, args)
        progress.say(f"engine on {app.address}"
                     + (f", metrics on {app.metrics.address}" if app.metrics else "")
                     + f"; creating {args.accounts:,} accounts")
        account_ids = await bench._create_accounts(app.address, args.accounts)
        clients, batch, requests = WARMUP
        await run_step(app, account_ids, Step(clients, batch), requests, probe, postgres,
                       progress, "warm-up")
        results: list[StepResult] = []
        for index, step in enumerate(steps, 1):
            requests = plan_requests(step, results, args.step_seconds, args.min_requests)
            label = f"[{index}/{len(steps)}] {step.clients} clients x {step.batch}"
            result = await run_step(app, account_ids, step, requests, probe, postgres,
                                    progress, label)
            results.append(result)
            progress.say(f"{label}: {result.transfers_per_second:>9,.0f} transfers/s  "
                         f"p50 {result.p50_ms:7.1f} ms  p99 {result.p99_ms:7.1f} ms  engine "
                         f"{result.engine_cpu_seconds / result.seconds:.2f} cores  Postgres "
                         f"{result.postgres_cpu_seconds / result.seconds:.2f} cores")
    finally:
        await probe.close()
        await app.stop(0)
        if server is not None and temporary:
            await asyncio.to_thread(server.cleanup)
            shutil.rmtree(data_dir, ignore_errors=True)
    report, model = build_report(results, args, environment, postgres.measured)
    path = write_report(report, model, pathlib.Path(args.out))
    progress.say("")
    for line in headline(report):
        progress.say(line.replace("**", ""))
    progress.say(f"report: {path}")
    return report


async def _environment(probe, app, args) -> dict:
    return {
        "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpus": psutil.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "postgres_version": await probe.fetchval("SHOW server_version"),
        "shards": app.engine.shard_count,
        "accounts": args.accounts,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", default=DEFAULT_STEPS,
                        help="load steps CLIENTSxBATCH, comma-separated, increasing load "
                             f"[{DEFAULT_STEPS}]")
    parser.add_argument("--step-seconds", type=float, default=8.0,
                        help="aimed duration of each step [8]")
    parser.add_argument("--min-requests", type=int, default=30,
                        help="requests per client per step, at least [30]")
    parser.add_argument("--p99-ms", type=float, default=100.0,
                        help="latency objective for the knee and the sizing [100]")
    parser.add_argument("--target-tps", type=float, default=50_000,
                        help="transfers/s to size for [50000]")
    parser.add_argument("--average-tps", type=float,
                        help="average transfers/s for storage per month [the target]")
    parser.add_argument("--plan-batch", type=int,
                        help="transfers per request assumed for the sizing [the best measured]")
    parser.add_argument("--headroom", type=float, default=0.7,
                        help="plan to run at this fraction of the modelled capacity [0.7]")
    parser.add_argument("--holdout", type=int,
                        help="index of the step left out of the fit and predicted [middle]")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--database-url", help="Postgres to use [a temporary embedded one]")
    parser.add_argument("--redis-url")
    parser.add_argument("--data-dir", help="embedded services' data [a temporary directory]")
    parser.add_argument("--metrics-listen",
                        help="also serve /metrics while measuring (watch it in Grafana)")
    parser.add_argument("--out", default="bench-results/capacity",
                        help="report directory [bench-results/capacity]")


def main(args: argparse.Namespace) -> int:
    import uvloop

    uvloop.run(run(args))
    return 0
