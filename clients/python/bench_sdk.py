"""Throughput of the SDK's single-transfer path against a running engine.

    make run                                  # in another shell: the engine on 127.0.0.1:50051
    .venv/bin/python clients/python/bench_sdk.py [--address HOST:PORT] [--callers 256]

Prints, for `AsyncClient.create_transfer` (one transfer per call):
* one caller awaiting each call before the next (no concurrency: every call waits out its
  batching window and a whole commit);
* N concurrent callers (default 256) doing the same, which auto-batching coalesces into few
  CreateTransfers requests;
with transfers/s, per-call latency p50/p99 and the mean auto-batch size. A figure, never a test.
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from txengine_client import Account, AsyncClient, ClientOptions, Transfer


def quantile_ms(latencies_s: list[float], q: float) -> float:
    ordered = sorted(latencies_s)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_callers(client: AsyncClient, accounts: list[Account], callers: int,
                      transfers_per_caller: int) -> tuple[float, list[float]]:
    rng = random.Random(callers)
    latencies: list[float] = []

    async def caller() -> None:
        for _ in range(transfers_per_caller):
            debit, credit = rng.sample(accounts, 2)
            transfer = Transfer(debit_account_id=debit.id, credit_account_id=credit.id,
                                amount=rng.randint(1, 100), ledger=1, code=1)
            started = time.perf_counter()
            result = await client.create_transfer(transfer)
            latencies.append(time.perf_counter() - started)
            assert result.ok, result

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return time.perf_counter() - started, latencies


def report(label: str, count: int, elapsed_s: float, latencies: list[float],
           requests: int) -> None:
    print(f"{label:<34} {count / elapsed_s:>10,.0f} transfers/s   "
          f"p50 {quantile_ms(latencies, 0.5):7.2f} ms   p99 {quantile_ms(latencies, 0.99):7.2f} ms"
          f"   {count / max(requests, 1):7.1f} transfers/request")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--single", type=int, default=1_000, help="transfers, one caller")
    parser.add_argument("--callers", type=int, default=256)
    parser.add_argument("--per-caller", type=int, default=200, help="transfers per caller")
    parser.add_argument("--window-ms", type=float, default=1.0,
                        help="auto-batching window (0: calls made in the same loop tick)")
    args = parser.parse_args()

    options = ClientOptions(batch_window_s=args.window_ms / 1000)
    async with AsyncClient(args.address, options=options) as client:
        accounts = [Account(ledger=1, code=1) for _ in range(args.accounts)]
        results = await client.create_accounts(accounts)
        assert all(r.ok for r in results)
        await run_callers(client, accounts, 8, 20)  # warm-up: connections, account cache

        before = client.auto_batching_stats[0]
        elapsed, latencies = await run_callers(client, accounts, 1, args.single)
        report("1 caller, sequential awaits", args.single, elapsed, latencies,
               client.auto_batching_stats[0] - before)

        before = client.auto_batching_stats[0]
        elapsed, latencies = await run_callers(client, accounts, args.callers, args.per_caller)
        total = args.callers * args.per_caller
        report(f"{args.callers} callers, auto-batched", total, elapsed, latencies,
               client.auto_batching_stats[0] - before)
        print(f"(mean latency {1000 * statistics.fmean(latencies):.2f} ms; "
              f"batch window {1000 * client.options.batch_window_s:g} ms)")


if __name__ == "__main__":
    asyncio.run(main())
