"""Prints the throughput of the compiled kernels against their plain-Python references.

Usage: .venv/bin/python scripts/bench_kernels.py [--seed N]

apply_transfers runs on two kinds of random batch, both over 10,000 accounts on one ledger
(a fifth of them with DEBITS_MUST_NOT_EXCEED_CREDITS), with transfers of 1..1,000 units
between two distinct accounts, one in ten LINKED, a client request boundary every 8,190 items
and one item in a hundred repeating an earlier id:

* single-phase: plain transfers only;
* mixed: 45% plain, 20% pending (half of them with a timeout), 15% posts (full, partial, or
  of amount 0) and 10% voids, 10% balancing debit or credit. Seven in ten posts and voids
  resolve a pending transfer earlier in the batch, each at most once; the others one of the
  committed pending transfers (5% of the batch size; one in twenty of those already posted,
  voided or expired), so some resolve the same one twice.

Kernel and reference run on copies of the same batch, and every output is checked to agree
before any figure is printed. Prints figures only.
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
    BALANCES_AFTER_COLUMNS,
    NANOSECONDS_PER_SECOND,
    PENDING_STATUS_PENDING,
    apply_transfers_reference,
    shard_of_reference,
)

ACCOUNTS = 10_000
BATCH_SIZES = (8_190, 100_000)
REQUEST_SIZE_MAX = 8_190
KERNEL_SECONDS_MIN = 1.0
REFERENCE_RUNS = 1
TIMESTAMP_BASE = 1_700_000_000_000_000_000
# Committed pending transfers loaded for a mixed batch, per batch item.
COMMITTED_PENDING_SHARE = 0.05

PLAIN, PENDING, POST, VOID, BALANCING = range(5)
MIXED_SHARES = {PLAIN: 0.45, PENDING: 0.20, POST: 0.15, VOID: 0.10, BALANCING: 0.10}
OUTPUTS = ("result", "timestamp_out", "amount_out", "resolved_row", "balances_after", "status",
           "expires_at", "acc_debits_pending", "acc_debits_posted", "acc_credits_pending",
           "acc_credits_posted")


def previous_same(keys: list[int], lookups: list[int]) -> np.ndarray:
    """For each i, the last j < i with keys[j] == lookups[i], or -1 (dup_prev, pending_prev)."""
    last_seen: dict[int, int] = {}
    out = np.full(len(keys), -1, dtype=np.int64)
    for i, (key, lookup) in enumerate(zip(keys, lookups)):
        out[i] = last_seen.get(lookup, -1)
        last_seen[key] = i
    return out


def single_phase_batch(n: int, rng: np.random.Generator) -> dict[str, object]:
    ids = rng.permutation(np.arange(1, n + 1, dtype=np.uint64)) + np.uint64(1 << 40)
    repeats = rng.random(n) < 0.01
    repeats[0] = False
    earlier = (rng.random(n) * np.arange(n)).astype(np.int64)
    ids[repeats] = ids[earlier[repeats]]
    id_list = ids.tolist()

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
        "dup_prev": previous_same(id_list, id_list), "exists_row": np.full(n, -1, np.int64),
        "pending_prev": np.full(n, -1, np.int64), "pending_row": np.full(n, -1, np.int64),
        "existing_timestamp": np.zeros(0, dtype=np.int64),
        "precheck": np.zeros(n, dtype=np.uint32),
        "timestamp_base": TIMESTAMP_BASE,
        "acc_ledger": np.ones(ACCOUNTS, dtype=np.uint32),
        "acc_flags": np.where(guarded, results.ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS,
                              0).astype(np.uint32),
        "acc_debits_pending": np.zeros(ACCOUNTS, dtype=np.uint64),
        "acc_debits_posted": np.zeros(ACCOUNTS, dtype=np.uint64),
        "acc_credits_pending": np.zeros(ACCOUNTS, dtype=np.uint64),
        "acc_credits_posted": rng.integers(0, 50_000, ACCOUNTS, dtype=np.uint64),
        "status": np.zeros(n, dtype=np.uint8), "expires_at": np.zeros(n, dtype=np.int64),
        "result": np.zeros(n, dtype=np.uint32),
        "timestamp_out": np.zeros(n, dtype=np.int64),
        "amount_out": np.zeros(n, dtype=np.uint64),
        "resolved_row": np.zeros(n, dtype=np.int64),
        "balances_after": np.zeros((n, BALANCES_AFTER_COLUMNS), dtype=np.uint64),
    }


def mixed_batch(n: int, rng: np.random.Generator) -> dict[str, object]:
    """A single-phase batch with the kinds of MIXED_SHARES, and committed pending rows."""
    batch = single_phase_batch(n, rng)
    m = int(n * COMMITTED_PENDING_SHARE)
    rows = n + m
    batch["acc_debits_posted"] = rng.integers(0, 25_000, ACCOUNTS, dtype=np.uint64)
    kind = rng.choice(list(MIXED_SHARES), n, p=list(MIXED_SHARES.values()))
    committed_ids = np.arange(1, m + 1, dtype=np.uint64) + np.uint64(1 << 50)
    committed_slots = rng.integers(0, ACCOUNTS, (2, m), dtype=np.int64)
    committed_slots[1] = (committed_slots[0] + rng.integers(1, ACCOUNTS, m)) % ACCOUNTS
    committed_amount = rng.integers(1, 1_001, m, dtype=np.uint64)
    # One in twenty committed pending transfers is already posted (2), voided (3) or expired
    # (4), by status or by an expiry time before the batch; the rest are open.
    committed_status = np.where(rng.random(m) < 0.05, rng.integers(2, 5, m),
                                PENDING_STATUS_PENDING).astype(np.uint8)
    committed_expires = np.where(rng.random(m) < 0.02, TIMESTAMP_BASE - 1, 0).astype(np.int64)
    open_rows = committed_status == PENDING_STATUS_PENDING
    np.add.at(batch["acc_debits_pending"], committed_slots[0][open_rows],
              committed_amount[open_rows])
    np.add.at(batch["acc_credits_pending"], committed_slots[1][open_rows],
              committed_amount[open_rows])

    flags = batch["flags"]
    amount = batch["amount"]
    pending_lo = batch["pending_lo"]
    debit_lo, credit_lo = batch["debit_lo"], batch["credit_lo"]
    pending_row = batch["pending_row"]
    timeout = batch["timeout_seconds"]
    ids = batch["id_lo"]
    pending_items: list[int] = []
    resolving = (kind == POST) | (kind == VOID)
    for i in range(n):
        if kind[i] == PENDING:
            flags[i] |= results.TRANSFER_FLAG_PENDING
            timeout[i] = rng.integers(1, 3_600) if rng.random() < 0.5 else 0
            pending_items.append(i)
        elif kind[i] == BALANCING:
            flags[i] |= rng.choice([results.TRANSFER_FLAG_BALANCING_DEBIT,
                                    results.TRANSFER_FLAG_BALANCING_CREDIT])
            amount[i] = rng.integers(1, 5_001)
        elif resolving[i]:
            flags[i] |= (results.TRANSFER_FLAG_POST_PENDING_TRANSFER if kind[i] == POST
                         else results.TRANSFER_FLAG_VOID_PENDING_TRANSFER)
            if pending_items and rng.random() < 0.7:
                # Each pending transfer of the batch is resolved at most once.
                pick = int(rng.integers(len(pending_items)))
                pending_items[pick], pending_items[-1] = pending_items[-1], pending_items[pick]
                j = pending_items.pop()
                pending_lo[i] = ids[j]
                held = int(amount[j])
            else:
                k = int(rng.integers(m))
                pending_lo[i] = committed_ids[k]
                pending_row[i] = n + k
                held = int(committed_amount[k])
            # Posts of 0 post the whole reservation; others part of it or all of it.
            amount[i] = 0 if kind[i] == VOID or rng.random() < 0.3 else rng.integers(1, held + 1)
            debit_lo[i] = credit_lo[i] = 0
            batch["ledger"][i] = batch["code"][i] = 0
    batch["debit_slot"][resolving] = -1
    batch["credit_slot"][resolving] = -1
    batch["pending_prev"] = previous_same(ids.tolist(), pending_lo.tolist())
    batch["pending_prev"][~resolving] = -1

    def extend(name: str, committed: np.ndarray) -> None:
        batch[name] = np.concatenate([batch[name], committed.astype(batch[name].dtype)])

    account_lo = np.arange(1, ACCOUNTS + 1, dtype=np.uint64)
    zeros = np.zeros(m, dtype=np.uint64)
    for name, committed in (
        ("id_hi", zeros), ("id_lo", committed_ids), ("debit_hi", zeros),
        ("debit_lo", account_lo[committed_slots[0]]), ("credit_hi", zeros),
        ("credit_lo", account_lo[committed_slots[1]]), ("pending_hi", zeros),
        ("pending_lo", zeros), ("amount", committed_amount), ("ledger", zeros + 1),
        ("code", zeros + 1), ("flags", zeros + results.TRANSFER_FLAG_PENDING),
        ("timeout_seconds", zeros), ("user_data_key", zeros),
        ("debit_slot", committed_slots[0]), ("credit_slot", committed_slots[1]),
        ("status", committed_status), ("expires_at", committed_expires),
    ):
        extend(name, committed)
    batch["existing_timestamp"] = np.arange(m, dtype=np.int64) + TIMESTAMP_BASE - 10**12
    assert len(batch["id_hi"]) == rows
    return batch


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


def bench_apply_transfers(label: str, n: int, batch: dict[str, object]) -> None:
    kernel_s, kernel_out = seconds_per_run(apply_transfers, batch, KERNEL_SECONDS_MIN, 5)
    reference_s, reference_out = seconds_per_run(apply_transfers_reference, batch, 0.0,
                                                 REFERENCE_RUNS)
    for name in OUTPUTS:
        if not np.array_equal(kernel_out[name], reference_out[name]):
            raise SystemExit(f"kernel and reference disagree on {name}")
    outcome = np.bincount(kernel_out["result"], minlength=results.TRANSFER_EXCEEDS_DEBITS + 1)
    ok_share = outcome[results.TRANSFER_OK] / n
    print(f"apply_transfers  {label:<12} n={n:>7,}  ok={ok_share:6.1%}  "
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
    print(f"accounts={ACCOUNTS:,}  timeouts of up to {3_600 * NANOSECONDS_PER_SECOND:,} ns")
    for n in BATCH_SIZES:
        bench_apply_transfers("single-phase", n, single_phase_batch(n, rng))
    for n in BATCH_SIZES:
        bench_apply_transfers("mixed", n, mixed_batch(n, rng))
    for n in BATCH_SIZES:
        bench_shard_of(n, rng)


if __name__ == "__main__":
    main()
