"""`txengine bench`: batched CreateTransfers throughput, latency, and where the time goes.

The engine runs in this process on a loopback port over its own embedded Postgres (or
--database-url); load generators are separate processes that build and serialize every
request before the clock starts, so the generator is not what is measured.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import pathlib
import random
import tempfile
import time
import uuid

import grpc
import numpy as np

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id

CREATE_TRANSFERS = "/txengine.v1.LedgerService/CreateTransfers"


def _generator(address: str, account_ids: list[bytes], requests: int, batch: int, seed: int,
               start, results) -> None:
    """One load-generator process: prebuild, wait for the start signal, send, report."""
    rng = random.Random(seed)
    payloads = []
    for _ in range(requests):
        transfers = []
        for _ in range(batch):
            debit, credit = rng.sample(account_ids, 2)
            transfers.append(pb.Transfer(id=new_id(), debit_account_id=debit,
                                         credit_account_id=credit, amount=rng.randint(1, 1000),
                                         ledger=1, code=1))
        payloads.append(pb.CreateTransfersRequest(transfers=transfers).SerializeToString())
    options = [("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary(CREATE_TRANSFERS)
        results.put(("ready", seed))
        start.wait()
        latencies, responses = [], []
        for payload in payloads:
            began = time.perf_counter()
            responses.append(call(payload, timeout=120))
            latencies.append(time.perf_counter() - began)
    ok = sum(r.result == pb.TRANSFER_RESULT_OK
             for raw in responses for r in pb.CreateTransfersResponse.FromString(raw).results)
    results.put(("done", latencies, ok))


async def _create_accounts(address: str, count: int) -> list[bytes]:
    ids = [new_id() for _ in range(count)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        for start in range(0, count, 8_000):
            chunk = ids[start:start + 8_000]
            response = await stub.CreateAccounts(pb.CreateAccountsRequest(
                accounts=[pb.Account(id=i, ledger=1, code=1) for i in chunk]))
            assert all(r.result == pb.ACCOUNT_RESULT_OK for r in response.results)
    return ids


def _percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q) * 1000) if values else 0.0


async def run(args: argparse.Namespace) -> dict:
    from engine.config import Settings
    from engine.server import app as app_module

    data_dir = pathlib.Path(args.data_dir or tempfile.mkdtemp(prefix="txengine-bench-"))
    database_url = args.database_url
    if database_url is None:
        from engine.storage.embedded import EmbeddedPostgres

        postgres = await asyncio.to_thread(EmbeddedPostgres, data_dir)
        name = f"bench_{uuid.uuid4().hex[:8]}"
        await asyncio.to_thread(postgres._server.psql, f"CREATE DATABASE {name};")
        database_url = postgres._server.get_uri(name)
    settings = Settings(listen="127.0.0.1:0", database_url=database_url,
                        redis_url=args.redis_url, data_dir=data_dir, shards=args.shards,
                        log_level="warning")
    app = await app_module.start(settings)
    try:
        print(f"engine on {app.address}; creating {args.accounts} accounts", flush=True)
        account_ids = await _create_accounts(app.address, args.accounts)
        requests = max(1, args.transfers // (args.batch * args.clients))
        context = multiprocessing.get_context("spawn")
        start, results = context.Event(), context.Queue()
        procs = [context.Process(target=_generator, args=(
            app.address, account_ids, requests, args.batch, seed, start, results))
            for seed in range(args.clients)]
        for proc in procs:
            proc.start()
        print(f"{args.clients} generators building {requests} requests of {args.batch}", flush=True)
        for _ in procs:
            while True:
                try:
                    results.get_nowait()
                    break
                except Exception:
                    await asyncio.sleep(0.05)
        before = app.engine.stages.snapshot()
        began = time.perf_counter()
        start.set()
        latencies, ok = [], 0
        for _ in procs:
            while True:
                try:
                    message = results.get_nowait()
                    break
                except Exception:
                    await asyncio.sleep(0.01)
            latencies.extend(message[1])
            ok += message[2]
        elapsed = time.perf_counter() - began
        for proc in procs:
            proc.join()
        after = app.engine.stages.snapshot()
    finally:
        await app.stop(0)
    return _report(args, requests, elapsed, latencies, ok, before, after)


def _report(args, requests, elapsed, latencies, ok, before, after) -> dict:
    total = requests * args.batch * args.clients
    seconds = {k: after["seconds"][k] - before["seconds"][k] for k in after["seconds"]}
    seconds["prepare"] -= seconds["kernel"]  # prepare encloses the kernel call
    items = max(1, after["items"] - before["items"])
    batches = after["batches"] - before["batches"]
    return {
        "scenario": f"CreateTransfers batch={args.batch} clients={args.clients}",
        "transfers": total, "ok": ok, "seconds": round(elapsed, 3),
        "transfers_per_second": round(total / elapsed),
        "request_latency_ms": {"p50": round(_percentile_ms(latencies, 50), 2),
                               "p99": round(_percentile_ms(latencies, 99), 2),
                               "p999": round(_percentile_ms(latencies, 99.9), 2)},
        "commits": batches, "transfers_per_commit": round(items / max(1, batches)),
        "microseconds_per_transfer": {k: round(v / items * 1e6, 2) for k, v in seconds.items()},
    }


def print_report(report: dict) -> None:
    print()
    print(report["scenario"])
    print(f"  transfers       {report['transfers']:>10,}  (OK {report['ok']:,})")
    print(f"  throughput      {report['transfers_per_second']:>10,} transfers/s")
    lat = report["request_latency_ms"]
    print(f"  request latency p50 {lat['p50']} ms  p99 {lat['p99']} ms  p999 {lat['p999']} ms")
    print(f"  commits         {report['commits']:>10,}  ({report['transfers_per_commit']:,} transfers each)")
    print("  where the time goes (engine wall time per transfer, in microseconds):")
    for stage, value in report["microseconds_per_transfer"].items():
        print(f"    {stage:<16}{value:>8.2f}")
    print(f"    {'total':<16}{sum(report['microseconds_per_transfer'].values()):>8.2f}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--transfers", type=int, default=400_000)
    parser.add_argument("--batch", type=int, default=8_190)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--database-url")
    parser.add_argument("--redis-url")
    parser.add_argument("--data-dir")
    parser.add_argument("--json", help="also write the report as JSON to this file")


def main(args: argparse.Namespace) -> int:
    import uvloop

    report = uvloop.run(run(args))
    print_report(report)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return 0

