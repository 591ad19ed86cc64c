"""`txengine bench-fees`: the fee kernel against its Fraction oracle, and fee transfers end to end.

Printed, never asserted:

* the fee kernel (ext/fee.pyx) in legs per second over random amounts, against
  engine.fees.reference on a smaller sample of the same batch (both produce the same legs,
  checked on that sample), for a three-leg schedule (net, fee, tax on the fee) and a five-leg
  one (with a partner commission and a rolling reserve);
* batched CreateTransfers through the real server and an embedded Postgres (fsync and
  synchronous_commit on), plain transfers and transfers with the three-leg schedule (asking for
  the latest version, which looks up whether each id was applied before, and pinning version 1,
  which does not), in the same run, alternating, from a separate load-generator process that
  serializes every request before the clock starts. A fee transfer writes three transfer rows,
  so the ratio shows what the legs cost beyond the plain path.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pathlib
import shutil
import tempfile
import time

import numpy as np

from engine.fees import reference
from engine.fees.schedule import LEGS_MAX, Fee, FeeSchedule, tables
from engine.ids import new_id
from engine.kernels import _fee

ACCOUNT = bytes(15) + b"\x01"


def three_leg(schedule_id: bytes, platform: bytes, tax: bytes) -> FeeSchedule:
    """2.9 % + 0.30 to the platform, 20 % tax on the fee: legs net, fee and tax."""
    return FeeSchedule(id=schedule_id, fees=(Fee(platform, rate_ppm=29_000, fixed_amount=30,
                                                 tax_account_id=tax, tax_ppm=200_000),))


def five_leg() -> FeeSchedule:
    return FeeSchedule(id=ACCOUNT, fees=(Fee(ACCOUNT, rate_ppm=29_000, fixed_amount=30,
                                             commission_account_id=ACCOUNT, commission_ppm=200_000,
                                             tax_account_id=ACCOUNT, tax_ppm=200_000),),
                       reserve_ppm=100_000, reserve_account_id=ACCOUNT, reserve_timeout_seconds=60)


def kernel_figures(schedule: FeeSchedule, items: int, sample: int, repeats: int = 5) -> dict:
    rng = np.random.default_rng(7)
    amount = rng.integers(1_000, 10_000_000, items, dtype=np.uint64)
    which = np.zeros(items, np.int32)
    t = tables([schedule])
    legs = np.zeros((items, LEGS_MAX), np.uint64)
    result = np.zeros(items, np.uint32)
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        _fee.expand_fees(amount, which, t.schedules, t.fees, t.tiers, t.split_weights, legs, result)
        best = min(best, time.perf_counter() - began)
    leg_count = int(np.count_nonzero(legs))
    ref_legs = [[0] * LEGS_MAX for _ in range(sample)]
    ref_result = [0] * sample
    began = time.perf_counter()
    reference.expand_fees_reference(amount[:sample], which[:sample], t.schedules, t.fees, t.tiers,
                                    t.split_weights, ref_legs, ref_result)
    ref_seconds = time.perf_counter() - began
    assert legs[:sample].tolist() == ref_legs, "the kernel and its oracle disagree"
    ref_leg_count = sum(1 for row in ref_legs for v in row if v)
    kernel_rate, ref_rate = leg_count / best, ref_leg_count / ref_seconds
    return {"legs_per_transfer": leg_count / items, "kernel_legs_per_second": kernel_rate,
            "reference_legs_per_second": ref_rate, "speedup": kernel_rate / ref_rate,
            "kernel_transfers_per_second": items / best}


def _send(address: str, payloads: list[bytes], streams: int) -> tuple[float, int, int]:
    """Load generator (its own process): send every payload, `streams` at a time; returns
    (seconds, transfers answered OK, transfers answered otherwise)."""
    import grpc

    from engine.gen.txengine.v1 import ledger_pb2 as pb

    async def run() -> tuple[float, int, int]:
        ok = failed = 0
        async with grpc.aio.insecure_channel(address, options=[
                ("grpc.max_receive_message_length", 64 << 20)]) as channel:
            call = channel.unary_unary("/txengine.v1.LedgerService/CreateTransfers")
            queue = list(reversed(payloads))

            async def stream() -> None:
                nonlocal ok, failed
                while queue:
                    response = pb.CreateTransfersResponse.FromString(await call(queue.pop()))
                    good = sum(1 for r in response.results if r.result == pb.TRANSFER_RESULT_OK)
                    ok += good
                    failed += len(response.results) - good

            began = time.perf_counter()
            await asyncio.gather(*(stream() for _ in range(streams)))
            return time.perf_counter() - began, ok, failed

    return asyncio.run(run())


def _requests(payers: list[bytes], merchants: list[bytes], requests: int, batch: int,
              schedule_id: bytes | None, version: int, seed: int) -> list[bytes]:
    from engine.gen.txengine.v1 import ledger_pb2 as pb

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(requests):
        p = rng.integers(0, len(payers), batch)
        m = rng.integers(0, len(merchants), batch)
        amounts = rng.integers(1_000, 100_000, batch)
        out.append(pb.CreateTransfersRequest(transfers=[
            pb.Transfer(id=new_id(), debit_account_id=payers[i], credit_account_id=merchants[j],
                        amount=int(a), ledger=1, code=1, fee_schedule_id=schedule_id or b"",
                        fee_schedule_version=version)
            for i, j, a in zip(p.tolist(), m.tolist(), amounts.tolist())]).SerializeToString())
    return out


async def end_to_end(args: argparse.Namespace) -> list[dict]:
    from engine import bench
    from engine.config import Settings
    from engine.gen.txengine.v1 import ledger_pb2 as pb
    from engine.gen.txengine.v1 import ledger_pb2_grpc
    from engine.server import app as app_module
    from engine.storage.embedded import EmbeddedPostgres

    import grpc

    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="txengine-bench-fees-"))
    server = await asyncio.to_thread(EmbeddedPostgres, data_dir)
    rows = []
    try:
        probe = await bench._connect(server._server.get_uri("postgres"))
        url = await bench._create_database(probe, server._server.get_uri("postgres"), "fees")
        await probe.close()
        settings = Settings(listen="127.0.0.1:0", database_url=url, redis_url=args.redis_url,
                            data_dir=data_dir, shards=8, log_level="warning")
        app = await app_module.start(settings)
        try:
            ids = await bench._create_accounts(app.address, 2 * args.accounts + 2)
            payers, merchants = ids[:args.accounts], ids[args.accounts:2 * args.accounts]
            platform, tax = ids[-2:]
            schedule_id = new_id()
            async with grpc.aio.insecure_channel(app.address) as channel:
                stub = ledger_pb2_grpc.LedgerServiceStub(channel)
                schedule = three_leg(schedule_id, platform, tax)
                await stub.CreateFeeSchedule(pb.CreateFeeScheduleRequest(schedule=pb.FeeSchedule(
                    id=schedule_id, fees=[pb.Fee(account_id=platform, rate_ppm=29_000,
                                                 fixed_amount=30, tax_account_id=tax,
                                                 tax_ppm=schedule.fees[0].tax_ppm)])))
            spawn = multiprocessing.get_context("spawn")
            with spawn.Pool(1) as pool:
                plan = [("warm-up", None, 0)] + [
                    ("plain", None, 0), ("fees", schedule_id, 0), ("fees-v1", schedule_id, 1),
                ] * args.rounds
                for round_index, (label, sid, version) in enumerate(plan):
                    payloads = _requests(payers, merchants, args.requests, args.batch, sid,
                                         version, seed=round_index)
                    before = app.engine.stages.snapshot()["seconds"]
                    seconds, ok, failed = await asyncio.to_thread(
                        pool.apply, _send, (app.address, payloads, args.streams))
                    after = app.engine.stages.snapshot()["seconds"]
                    rate = ok / seconds
                    stages = ", ".join(f"{name} {after[name] - before[name]:.2f}"
                                       for name in after if after[name] > before[name])
                    print(f"  {label:8s} {ok:>9,} transfers OK ({failed} not) in {seconds:6.2f} s: "
                          f"{rate:>9,.0f} transfers/s  [engine seconds: {stages}]", flush=True)
                    if label != "warm-up":
                        rows.append({"scenario": label, "transfers_per_second": rate})
        finally:
            await app.stop(0)
    finally:
        await asyncio.to_thread(server._server.cleanup)
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=1_000_000, help="kernel batch [1,000,000]")
    parser.add_argument("--sample", type=int, default=20_000, help="reference sample [20,000]")
    parser.add_argument("--requests", type=int, default=12,
                        help="CreateTransfers requests per end-to-end round [12]")
    parser.add_argument("--batch", type=int, default=8_190, help="transfers per request [8,190]")
    parser.add_argument("--streams", type=int, default=2, help="concurrent requests [2]")
    parser.add_argument("--rounds", type=int, default=2,
                        help="plain/fees rounds, alternating [2]")
    parser.add_argument("--accounts", type=int, default=1_000, help="payers and merchants each")
    parser.add_argument("--redis-url")
    parser.add_argument("--no-end-to-end", action="store_true", help="kernel figures only")


def main(args: argparse.Namespace) -> int:
    import uvloop

    print("fee kernel (one call, nogil) vs engine.fees.reference (fractions.Fraction):")
    for label, schedule in (("three-leg", three_leg(ACCOUNT, ACCOUNT, ACCOUNT)),
                            ("five-leg", five_leg())):
        f = kernel_figures(schedule, args.items, args.sample)
        print(f"  {label}: kernel {f['kernel_legs_per_second']:>13,.0f} legs/s "
              f"({f['kernel_transfers_per_second']:,.0f} transfers/s), reference "
              f"{f['reference_legs_per_second']:>9,.0f} legs/s: {f['speedup']:,.0f}x", flush=True)
    if args.no_end_to_end:
        return 0
    print(f"end to end: batched CreateTransfers ({args.batch:,} per request, {args.streams} "
          f"concurrent), embedded Postgres, fsync and synchronous_commit on:", flush=True)
    rows = uvloop.run(end_to_end(args))
    def mean(label: str) -> float:
        return float(np.mean([r["transfers_per_second"] for r in rows if r["scenario"] == label]))

    plain = mean("plain")
    print(f"  mean: plain {plain:,.0f} transfers/s")
    for label, what in (("fees", "latest version"), ("fees-v1", "version pinned")):
        fees = mean(label)
        print(f"  mean: three-leg fees, {what}: {fees:,.0f} transfers/s ({3 * fees:,.0f} legs/s), "
              f"{fees / plain:.0%} of plain")
    return 0
