"""`txengine capacity` in miniature: tiny steps against the session's Postgres, then the report
files and their headline numbers. No timing assertions: the model's fit is checked on
synthetic steps whose true parameters are known."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from engine import capacity
from engine.capacity import CostModel, Step, StepResult


def parse_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    capacity.add_arguments(parser)
    return parser.parse_args(list(argv))


async def test_capacity_writes_a_report_with_its_headline(database_url, redis_url, tmp_path):
    out = tmp_path / "report"
    args = parse_args("--steps", "1x4,1x16,2x16,2x64", "--step-seconds", "0.2",
                      "--min-requests", "5", "--accounts", "200", "--shards", "4",
                      "--target-tps", "20000", "--database-url", database_url,
                      "--redis-url", redis_url, "--data-dir", str(tmp_path), "--out", str(out))
    report = await capacity.run(args)

    for name in (*capacity.PLOTS, "report.md", "report.json"):
        assert (out / name).stat().st_size > 0, name
    markdown = (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["sizing"] == report["sizing"]
    assert len(report["steps"]) == 4 and sum(s["held_out"] for s in report["steps"]) == 1
    for step in report["steps"]:
        assert step["ok"] == step["transfers"] > 0
        assert step["wal_bytes"] > 0 and step["seconds"] > 0
    for line in capacity.headline(report):
        assert line in markdown
    knee = report["knee"]
    if knee is not None:
        assert f"{knee['transfers_per_second']:,.0f} transfers/s" in markdown
    size = report["sizing"]
    assert "## What 20,000 transfers/s at p99 <= 100 ms needs" in markdown
    assert f"{size['table_bytes_per_transfer']:.0f} bytes/transfer" in markdown
    assert size["table_bytes_per_transfer"] > 0 and size["wal_bytes_per_transfer"] > 0
    assert "per month" in markdown and "## Assumptions" in markdown
    assert report["holdout"]["step"] == "2x16"


E, P, G = (10e-6, 300e-6), (15e-6, 2e-3), (1e-6, 100e-6)  # CPU cost models, seconds
SHARE = {1: 1.0, 2: 1.0, 4: 2.0}  # items per commit / batch, by clients
ETA, CORES_MAX, RHO = 0.9, 1.1, 2.0


def synthetic(step: Step, free_cores: float) -> StepResult:
    """A step measured on an ideal machine that obeys the model exactly."""
    items_per_commit = step.batch * SHARE[step.clients]
    e = E[0] + E[1] / step.batch
    p = P[0] + P[1] / items_per_commit
    g = G[0] + G[1] / step.batch
    cores = min(ETA * free_cores, CORES_MAX)
    latency = step.in_flight * (e + p + g) / cores
    seconds, cpus = 5.0, 2
    tps = step.in_flight / latency
    transfers = tps * seconds
    return StepResult(
        clients=step.clients, batch=step.batch, requests=int(transfers / step.batch),
        transfers=transfers, ok=transfers, seconds=seconds, transfers_per_second=tps,
        mean_ms=latency * 1000, p50_ms=latency * 1000, p99_ms=RHO * latency * 1000,
        engine_cpu_seconds=transfers * e, postgres_cpu_seconds=transfers * p,
        generator_cpu_seconds=transfers * g,
        machine_busy_seconds=(cores + cpus - free_cores) * seconds, cpus=cpus,
        wal_bytes=transfers * 380, transfers_table_bytes=transfers * 230,
        database_bytes=transfers * 300, commits=transfers / items_per_commit,
        committed_items=transfers)


STEPS = [(Step(1, 16), 0.8), (Step(1, 64), 0.7), (Step(2, 128), 1.0), (Step(2, 512), 0.9),
         (Step(4, 512), 1.1), (Step(4, 2048), 1.9)]  # the last is capped at CORES_MAX


def test_model_recovers_known_parameters_and_predicts_a_held_out_step():
    results = [synthetic(step, free) for step, free in STEPS]
    model = capacity.Model.fit(results, postgres_measured=True)
    assert model.engine_cpu.fixed == pytest.approx(E[0], rel=1e-6)
    assert model.engine_cpu.per_unit == pytest.approx(E[1], rel=1e-6)
    assert model.postgres_cpu.per_unit == pytest.approx(P[1], rel=1e-6)
    assert model.commit_share == SHARE
    assert model.eta == pytest.approx(ETA) and model.cores_max == pytest.approx(CORES_MAX)
    assert model.alpha == pytest.approx(0, abs=1e-9) and model.rho == pytest.approx(RHO)
    check = capacity.holdout_check(results, 3, postgres_measured=True)
    assert check["step"] == "2x512"
    assert abs(check["throughput"]["error"]) < 1e-6
    assert abs(check["p99_ms"]["error"]) < 1e-6


def test_plan_meets_the_objective_on_a_host_of_its_own():
    model = capacity.Model.fit([synthetic(step, free) for step, free in STEPS], True)
    plan = model.plan(100.0, 512)
    assert plan["clients"] >= 1 and plan["p99_ms"] <= 100.0
    assert model.p99_ms(Step(plan["clients"] + 1, 512)) > 100.0  # the most that fit
    assert model.plan(100.0, 1_000_000) is None  # one request alone misses the objective


def test_a_report_survives_steps_too_short_to_register_cpu(tmp_path):
    results = [dataclasses.replace(synthetic(step, free), engine_cpu_seconds=0.0,
                                   postgres_cpu_seconds=0.0, generator_cpu_seconds=0.0)
               for step, free in STEPS]
    environment = {"generated": "now", "host": "test", "cpus": 2, "memory_bytes": 2**30,
                   "postgres_version": "16", "shards": 4, "accounts": 100}
    report, model = capacity.build_report(results, parse_args(), environment, True)
    capacity.write_report(report, model, tmp_path)
    assert "n/a" in (tmp_path / "report.md").read_text()


def test_nonnegative_fit_drops_a_column_that_would_go_negative():
    import numpy as np

    x = np.column_stack([np.ones(4), [1.0, 2.0, 3.0, 4.0]])
    y = np.array([4.0, 3.0, 2.0, 1.0])  # the slope would be negative: a cost cannot be
    fixed, slope = capacity._nonnegative_fit(x, y)
    assert slope == 0.0 and fixed == pytest.approx(2.5)


def test_cost_model():
    model = CostModel.fit([16, 64, 256, 1024], [10e-6 + 300e-6 / b for b in (16, 64, 256, 1024)])
    assert model.per_transfer(8_190) == pytest.approx(10e-6 + 300e-6 / 8_190, rel=1e-3)


def test_parse_steps():
    assert capacity.parse_steps("1x16, 2x512,4x2048,4x4096") == [
        Step(1, 16), Step(2, 512), Step(4, 2048), Step(4, 4096)]
    with pytest.raises(AssertionError):
        capacity.parse_steps("1x16,2x32")
