"""`txengine bench`: the request encoding and account mixes it relies on, and one whole `--quick`
run through the CLI (embedded Postgres, every scenario and baseline). No timing assertions:
only that everything ran, answered OK and has a positive throughput."""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from engine import bench
from engine.gen.txengine.v1 import ledger_pb2 as pb
from tests.conftest import ROOT

ENGINE_SCENARIOS = {"batched-1", "batched-2", "batched-4", "batched-8", "unary-64", "unary-256",
                    "unary-512", "sdk-256", "stream", "hot-10%", "cross-50%", "chains-3"}


def test_prebuilt_requests_parse_as_the_protobuf_messages():
    n = 7
    ids, debit, credit = bench.new_ids(n), bench.new_ids(n), bench.new_ids(n)
    amount = np.array([1, 2, 63, 64, 100, 126, 127])
    flags = np.array([0, pb.TRANSFER_FLAGS_LINKED, 0, 0, pb.TRANSFER_FLAGS_LINKED, 0, 0])
    rows = bench.encode_transfers(ids, debit, credit, amount, flags)
    expected = pb.CreateTransfersRequest(transfers=[
        pb.Transfer(id=bytes(ids[i]), debit_account_id=bytes(debit[i]),
                    credit_account_id=bytes(credit[i]), amount=int(amount[i]), ledger=1, code=1,
                    flags=int(flags[i])) for i in range(n)])
    assert pb.CreateTransfersRequest.FromString(rows.tobytes()) == expected
    assert pb.StreamTransfersRequest.FromString(rows[2:5].tobytes()).transfers == \
        expected.transfers[2:5]
    assert len({bytes(i) for i in ids}) == n and [bytes(i) for i in ids] == sorted(
        bytes(i) for i in ids)


@pytest.mark.parametrize("mix", ["uniform", "hot", "cross", "chains"])
def test_account_pairs_follow_their_mix(mix):
    rng = np.random.default_rng(7)
    shards = rng.integers(0, 8, 2_000).astype(np.int32)
    debit, credit = bench.pick_pairs(rng, 100_000, shards, mix, hot=5)
    assert np.all(debit != credit)
    assert debit.min() >= 0 and max(debit.max(), credit.max()) < len(shards)
    on_hot = np.mean((debit == 5) | (credit == 5))
    cross = np.mean(shards[debit] != shards[credit])
    if mix == "hot":
        assert 0.09 < on_hot < 0.12
    else:
        assert on_hot < 0.01
    if mix == "cross":
        assert cross == 0.5
    else:
        assert 0.8 < cross < 0.95


def test_chain_requests_link_items_in_threes():
    accounts = bench.new_ids(50)
    job = {"accounts": accounts.tobytes(), "shards": np.zeros(50, np.int32).tobytes(),
           "seed": 1, "callers": 2, "requests_per_caller": 2, "batch": 9, "mix": "chains"}
    requests = bench.build_requests(job)
    assert [len(r) for r in requests] == [2, 2]
    for payload in (p for r in requests for p in r):
        transfers = pb.CreateTransfersRequest.FromString(payload).transfers
        assert [t.flags for t in transfers] == [1, 1, 0] * 3
        assert all(t.debit_account_id != t.credit_account_id for t in transfers)


def test_mixes_run_right_after_their_uniform_reference():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    plan = bench.scenarios(args)
    assert {s.name for s in plan} == ENGINE_SCENARIOS
    order = [s.name for s in bench.run_order(plan, args.mix_streams)]
    assert order[order.index("batched-4") + 1:][:3] == ["hot-10%", "cross-50%", "chains-3"]
    assert sorted(order) == sorted(s.name for s in plan)


def test_quick_bench_reports_every_scenario_and_baseline(tmp_path):
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "engine", "bench", "--quick", "--seconds", "1", "--accounts",
         "1000", "--pgbench-clients", "1,4", "--out", str(out)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)  # stops the engine and its embedded Postgres
        try:
            stdout, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        pytest.fail(f"txengine bench --quick did not finish:\n{stdout}\n{stderr[-4000:]}")
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    assert (out / "bench.png").stat().st_size > 0

    rows = {r["name"]: r for r in report["scenarios"]}
    assert set(rows) == ENGINE_SCENARIOS
    for row in rows.values():
        assert row["transfers_per_second"] > 0, row["name"]
        assert row["ok"] == row["transfers"] > 0 and not row["errors"], row["name"]
        assert row["request_latency_ms"]["p99"] > 0
        assert row["cpu_seconds_per_1000"]["app"] > 0
        assert row["commits"] > 0 and row["microseconds_per_transfer"]["write"] > 0
        expected = {"x_pgbench", "x_naive_ledger", "share_of_raw_copy"}
        if row["transfers_per_request"] == 1:
            expected.add("share_of_grpc_empty")
        assert set(row["ratios"]) == expected, row["name"]
    baselines = report["baselines"]
    floor = baselines["grpc_empty"]  # the same unary generator against an empty handler
    assert floor["ok"] == floor["transfers"] > 0 and not floor["errors"]
    assert floor["cpu_seconds_per_1000"]["app"] > 0
    assert [r["clients"] for r in baselines["pgbench"]["runs"]] == [1, 4]
    for row in (baselines["pgbench"]["best"], baselines["naive_ledger"], baselines["raw_copy"]):
        assert row["transfers_per_second"] > 0 and row["transfers"] > 0, row["name"]
        assert row["cpu_seconds_per_1000"]["postgres"] > 0, row["name"]
    assert {t["target"] for t in report["targets"]} >= {
        "batched throughput", "batched vs pgbench", "batched vs raw COPY", "batched p99",
        "unary vs pgbench", "unary p99", "hot account"}
    for t in report["targets"]:
        assert t["met"] in ((None,) if t["target"] == "unary vs empty gRPC" else (True, False))
    for name in ENGINE_SCENARIOS | {"pgbench", "naive-ledger", "raw-copy", "grpc-empty"}:
        assert name in done.stdout
    assert "DESIGN section 6 targets" in done.stdout
