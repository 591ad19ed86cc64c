"""Prints the throughput of the compiled kernels against their plain-Python references.

Usage: .venv/bin/python scripts/bench_kernels.py [--seed N]

Each batch is random but realistic for the data plane: 10,000 accounts on one ledger (a fifth
of them with DEBITS_MUST_NOT_EXCEED_CREDITS), transfers of 1..1,000 units between two distinct
accounts, one in ten LINKED, a client request boundary every 8,190 items, and one item in a
hundred repeating an earlier id. Kernel and reference run on copies of the same batch, and
their results are checked to agree before any figure is printed. Prints figures only.
"""
import argparse
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.kernels import apply_transfers, results, shard_of  # noqa: E402
from engine.kernels.reference import (  # noqa: E402
    apply_transfers_reference,
    shard_of_reference,
)

ACCOUNTS = 10_000
BATCH_SIZES = (8_190, 100_000)
REQUEST_SIZE_MAX = 8_190
KERNEL_SECONDS_MIN = 1.0
REFERENCE_RUNS = 1


def random_batch(n: int, rng: np.random.Generator) -> dict[str, object]:
    ids = rng.permutation(np.arange(1, n + 1, dtype=np.uint64)) + np.uint64(1 << 40)
    repeats = rng.random(n) < 0.01
    repeats[0] = False
    earlier = (rng.random(n) * np.arange(n)).astype(np.int64)
    ids[repeats] = ids[earlier[repeats]]
    last_seen: dict[int, int] = {}
    dup_prev = np.full(n, -1, dtype=np.int64)
    for i, transfer_id in enumerate(ids.tolist()):
        dup_prev[i] = last_seen.get(transfer_id, -1)
        last_seen[transfer_id] = i

    debit_slot = rng.integers(0, ACCOUNTS, n, dtype=np.int64)
    credit_slot = (debit_slot + rng.integers(1, ACCOUNTS, n)) % ACCOUNTS
    account_lo = np.arange(1, ACCOUNTS + 1, dtype=np.uint64)
    flags = np.where(rng.random(n) < 0.1, results.TRANSFER_FLAG_LINKED, 0).astype(np.uint32)
    chain_break = np.zeros(n, dtype=np.uint8)
    chain_break[REQUEST_SIZE_MAX - 1::REQUEST_SIZE_MAX] = 1
    chain_break[-1] = 1
    guarded = rng.random(ACCOUNTS) < 0.2
    zeros_u64 = np.zeros(n, dtype=np.uint64)
    return {
        "id_hi": zeros_u64.copy(), "id_lo": ids,
        "debit_hi": zeros_u64.copy(), "debit_lo": account_lo[debit_slot],
        "credit_hi": zeros_u64.copy(), "credit_lo": account_lo[credit_slot],
        "pending_hi": zeros_u64.copy(), "pending_lo": zeros_u64.copy(),
        "amount": rng.integers(1, 1_001, n, dtype=np.uint64),
        "ledger": np.ones(n, dtype=np.uint32), "code": np.ones(n, dtype=np.uint32),
        "flags": flags, "timeout_seconds": np.zeros(n, dtype=np.uint32),
        "user_data_key": np.zeros(n, dtype=np.int64),
        "debit_slot": debit_slot, "credit_slot": credit_slot, "chain_break": chain_break,
        "dup_prev": dup_prev, "exists_row": np.full(n, -1, dtype=np.int64),
        "existing_timestamp": np.zeros(0, dtype=np.int64),
        "precheck": np.zeros(n, dtype=np.uint32),
        "timestamp_base": 1_700_000_000_000_000_000,
        "acc_ledger": np.ones(ACCOUNTS, dtype=np.uint32),
        "acc_flags": np.where(guarded, results.ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS,
                              0).astype(np.uint32),
        "acc_debits_pending": np.zeros(ACCOUNTS, dtype=np.uint64),
        "acc_debits_posted": np.zeros(ACCOUNTS, dtype=np.uint64),
        "acc_credits_pending": np.zeros(ACCOUNTS, dtype=np.uint64),
        "acc_credits_posted": rng.integers(0, 50_000, ACCOUNTS, dtype=np.uint64),
        "result": np.zeros(n, dtype=np.uint32),
        "timestamp_out": np.zeros(n, dtype=np.int64),
    }


def fresh_copy(batch: dict[str, object]) -> dict[str, object]:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in batch.items()}


def seconds_per_run(function, batch: dict[str, object], seconds_min: float,
                    runs_min: int) -> tuple[float, dict[str, object]]:
    """Best time of one call, each on a fresh copy (copying is not timed)."""
    best = float("inf")
    runs = 0
    started = time.perf_counter()
    while runs < runs_min or time.perf_counter() - started < seconds_min:
        columns = fresh_copy(batch)
        t0 = time.perf_counter()
        function(**columns)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return best, columns


def bench_apply_transfers(n: int, rng: np.random.Generator) -> None:
    batch = random_batch(n, rng)
    kernel_s, kernel_out = seconds_per_run(apply_transfers, batch, KERNEL_SECONDS_MIN, 5)
    reference_s, reference_out = seconds_per_run(apply_transfers_reference, batch, 0.0,
                                                 REFERENCE_RUNS)
    for name in ("result", "timestamp_out", "acc_debits_posted", "acc_credits_posted"):
        if not np.array_equal(kernel_out[name], reference_out[name]):
            raise SystemExit(f"kernel and reference disagree on {name}")
    outcome = np.bincount(kernel_out["result"], minlength=results.TRANSFER_EXCEEDS_DEBITS + 1)
    ok_share = outcome[results.TRANSFER_OK] / n
    print(f"apply_transfers  n={n:>7,}  accounts={ACCOUNTS:,}  ok={ok_share:6.1%}  "
          f"kernel {n / kernel_s / 1e6:8.2f} M transfers/s ({kernel_s * 1e3:8.3f} ms)  "
          f"reference {n / reference_s / 1e6:6.3f} M transfers/s ({reference_s * 1e3:8.1f} ms)  "
          f"ratio {reference_s / kernel_s:6.0f}x")


def bench_shard_of(n: int, rng: np.random.Generator) -> None:
    hi = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    lo = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    columns = {"hi": hi, "lo": lo, "shard_count": 16, "out": np.zeros(n, dtype=np.int32)}
    kernel_s, kernel_out = seconds_per_run(shard_of, columns, KERNEL_SECONDS_MIN, 5)
    reference_columns = dict(columns, out=[0] * n)
    reference_s, _ = seconds_per_run(shard_of_reference, reference_columns, 0.0, REFERENCE_RUNS)
    print(f"shard_of         n={n:>7,}  "
          f"kernel {n / kernel_s / 1e6:8.2f} M ids/s       ({kernel_s * 1e3:8.3f} ms)  "
          f"reference {n / reference_s / 1e6:6.3f} M ids/s       ({reference_s * 1e3:8.1f} ms)  "
          f"ratio {reference_s / kernel_s:6.0f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for n in BATCH_SIZES:
        bench_apply_transfers(n, rng)
    for n in BATCH_SIZES:
        bench_shard_of(n, rng)


if __name__ == "__main__":
    main()
