"""Plain-Python oracles of the compiled kernels, with the same signatures and semantics.

They are written to be read, not to be fast: every column is copied into a list of Python
ints, the rules are applied one item at a time in the documented order, and the outputs are
written back at the end. tests/property compares them with engine.kernels on random batches.
Anything indexable with integer items works as a column (numpy arrays, memoryviews, lists).
"""
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass, field

from engine.kernels import constants as c

_UINT64_MASK = 0xFFFFFFFFFFFFFFFF


def apply_transfers_reference(
    id_hi: Sequence[int], id_lo: Sequence[int],
    debit_hi: Sequence[int], debit_lo: Sequence[int],
    credit_hi: Sequence[int], credit_lo: Sequence[int],
    pending_hi: Sequence[int], pending_lo: Sequence[int],
    amount: Sequence[int],
    ledger: Sequence[int], code: Sequence[int], flags: Sequence[int],
    timeout_seconds: Sequence[int],
    user_data_key: Sequence[int],
    debit_slot: Sequence[int], credit_slot: Sequence[int],
    chain_break: Sequence[int],
    dup_prev: Sequence[int], exists_row: Sequence[int],
    existing_timestamp: Sequence[int],
    precheck: Sequence[int],
    timestamp_base: int,
    acc_ledger: Sequence[int], acc_flags: Sequence[int],
    acc_debits_pending: MutableSequence[int], acc_debits_posted: MutableSequence[int],
    acc_credits_pending: MutableSequence[int], acc_credits_posted: MutableSequence[int],
    result: MutableSequence[int], timestamp_out: MutableSequence[int],
) -> int:
    """Reference for engine.kernels.apply_transfers; see its docstring for the contract.

    Modified in place: acc_debits_posted, acc_credits_posted, result, timestamp_out.
    """
    n = len(debit_slot)
    rows = len(id_hi)
    accounts = len(acc_ledger)
    if rows < n:
        raise ValueError(f"id_hi has {rows} rows, fewer than the {n} batch items")
    _require_lengths(rows, id_lo=id_lo, debit_hi=debit_hi, debit_lo=debit_lo,
                     credit_hi=credit_hi, credit_lo=credit_lo, pending_hi=pending_hi,
                     pending_lo=pending_lo, amount=amount, ledger=ledger, code=code,
                     flags=flags, timeout_seconds=timeout_seconds, user_data_key=user_data_key)
    _require_lengths(n, credit_slot=credit_slot, chain_break=chain_break, dup_prev=dup_prev,
                     exists_row=exists_row, precheck=precheck, result=result,
                     timestamp_out=timestamp_out)
    _require_lengths(rows - n, existing_timestamp=existing_timestamp)
    _require_lengths(accounts, acc_flags=acc_flags, acc_debits_pending=acc_debits_pending,
                     acc_debits_posted=acc_debits_posted,
                     acc_credits_pending=acc_credits_pending,
                     acc_credits_posted=acc_credits_posted)
    for name, column in (("debit_slot", debit_slot), ("credit_slot", credit_slot)):
        for i, slot in enumerate(column):
            if not -1 <= slot < accounts:
                raise ValueError(f"{name}[{i}] is out of range")
    for i, row in enumerate(exists_row):
        if row != -1 and not n <= row < rows:
            raise ValueError(f"exists_row[{i}] is out of range")
    for i, prev in enumerate(dup_prev):
        if prev != -1 and not 0 <= prev < i:
            raise ValueError(f"dup_prev[{i}] is out of range")
    for i, decided in enumerate(precheck):
        # A precheck fails its item: OK, EXISTS and the chain states are the kernel's to decide.
        if decided != 0 and (not c.TRANSFER_TIMESTAMP_MUST_BE_ZERO <= decided
                             <= c.TRANSFER_EXCEEDS_DEBITS or decided == c.TRANSFER_EXISTS):
            raise ValueError(f"precheck[{i}] is out of range")

    batch = _Batch(
        id_hi=_ints(id_hi), id_lo=_ints(id_lo), debit_hi=_ints(debit_hi),
        debit_lo=_ints(debit_lo), credit_hi=_ints(credit_hi), credit_lo=_ints(credit_lo),
        pending_hi=_ints(pending_hi), pending_lo=_ints(pending_lo), amount=_ints(amount),
        ledger=_ints(ledger), code=_ints(code), flags=_ints(flags),
        timeout_seconds=_ints(timeout_seconds), user_data_key=_ints(user_data_key),
        debit_slot=_ints(debit_slot), credit_slot=_ints(credit_slot),
        chain_break=_ints(chain_break), dup_prev=_ints(dup_prev), exists_row=_ints(exists_row),
        existing_timestamp=_ints(existing_timestamp), precheck=_ints(precheck),
        timestamp_base=int(timestamp_base),
        acc_ledger=_ints(acc_ledger), acc_flags=_ints(acc_flags),
        debits_pending=_ints(acc_debits_pending), debits_posted=_ints(acc_debits_posted),
        credits_pending=_ints(acc_credits_pending), credits_posted=_ints(acc_credits_posted),
        n=n,
    )
    batch.run()

    for k in range(accounts):
        acc_debits_posted[k] = batch.debits_posted[k]
        acc_credits_posted[k] = batch.credits_posted[k]
    for i in range(n):
        result[i] = batch.result[i]
        timestamp_out[i] = batch.timestamp[i]
    return sum(1 for r in batch.result if r == c.TRANSFER_OK)


def shard_of_reference(
    hi: Sequence[int], lo: Sequence[int], shard_count: int, out: MutableSequence[int]
) -> None:
    """Reference for engine.kernels.shard_of. Modified in place: out."""
    _require_shard_count(shard_count)
    if len(lo) != len(hi) or len(out) != len(hi):
        raise ValueError(
            f"hi, lo and out must have one length, got {len(hi)}, {len(lo)}, {len(out)}"
        )
    for i in range(len(hi)):
        out[i] = _shard(int(hi[i]), int(lo[i]), shard_count)


def shard_of_id(id_bytes: bytes, shard_count: int) -> int:
    """Shard of one 16-byte big-endian id; the control plane's scalar form of shard_of."""
    if len(id_bytes) != 16:
        raise ValueError(f"an id has 16 bytes, got {len(id_bytes)}")
    _require_shard_count(shard_count)
    hi = int.from_bytes(id_bytes[:8], "big")
    lo = int.from_bytes(id_bytes[8:], "big")
    return _shard(hi, lo, shard_count)


def splitmix64(x: int) -> int:
    """The splitmix64 finalizer, on Python ints masked to 64 bits at each step."""
    z = (x + 0x9E3779B97F4A7C15) & _UINT64_MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _UINT64_MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _UINT64_MASK
    return z ^ (z >> 31)


def _shard(hi: int, lo: int, shard_count: int) -> int:
    return splitmix64(hi ^ splitmix64(lo)) % shard_count


def _require_shard_count(shard_count: int) -> None:
    if not c.SHARD_COUNT_MIN <= shard_count <= c.SHARD_COUNT_MAX:
        raise ValueError(
            f"shard_count must be in {c.SHARD_COUNT_MIN}..{c.SHARD_COUNT_MAX}, got {shard_count}"
        )


def _require_lengths(expected: int, **columns: Sequence[int]) -> None:
    for name, column in columns.items():
        if len(column) != expected:
            raise ValueError(f"{name} has length {len(column)}, expected {expected}")


def _ints(column: Sequence[int]) -> list[int]:
    return [int(v) for v in column]


@dataclass
class _Batch:
    """The columns as lists of Python ints, and the loop over chains and items."""

    id_hi: list[int]
    id_lo: list[int]
    debit_hi: list[int]
    debit_lo: list[int]
    credit_hi: list[int]
    credit_lo: list[int]
    pending_hi: list[int]
    pending_lo: list[int]
    amount: list[int]
    ledger: list[int]
    code: list[int]
    flags: list[int]
    timeout_seconds: list[int]
    user_data_key: list[int]
    debit_slot: list[int]
    credit_slot: list[int]
    chain_break: list[int]
    dup_prev: list[int]
    exists_row: list[int]
    existing_timestamp: list[int]
    precheck: list[int]
    timestamp_base: int
    acc_ledger: list[int]
    acc_flags: list[int]
    debits_pending: list[int]
    debits_posted: list[int]
    credits_pending: list[int]
    credits_posted: list[int]
    n: int
    result: list[int] = field(init=False)
    timestamp: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.result = [c.TRANSFER_UNSPECIFIED] * self.n
        self.timestamp = [0] * self.n

    def run(self) -> None:
        start = 0
        while start < self.n:
            end = self.chain_end(start)
            if self.flags[end] & c.TRANSFER_FLAG_LINKED:
                # The client's request ended inside the chain: nothing of it may apply.
                self.fail_chain(start, end, end, c.TRANSFER_LINKED_EVENT_CHAIN_OPEN)
            else:
                self.run_chain(start, end)
            start = end + 1

    def chain_end(self, start: int) -> int:
        end = start
        while (self.flags[end] & c.TRANSFER_FLAG_LINKED and not self.chain_break[end]
               and end + 1 < self.n):
            end += 1
        return end

    def run_chain(self, start: int, end: int) -> None:
        for i in range(start, end + 1):
            r, original_timestamp = self.evaluate(i)
            self.result[i] = r
            if r == c.TRANSFER_OK:
                self.debits_posted[self.debit_slot[i]] += self.amount[i]
                self.credits_posted[self.credit_slot[i]] += self.amount[i]
                self.timestamp[i] = self.timestamp_base + i
            elif r == c.TRANSFER_EXISTS:
                self.timestamp[i] = original_timestamp
            else:
                if start < end:
                    self.roll_back(start, i)
                    self.fail_chain(start, i, end, r)
                return

    def roll_back(self, start: int, failed: int) -> None:
        for k in reversed(range(start, failed)):
            if self.result[k] == c.TRANSFER_OK:
                self.debits_posted[self.debit_slot[k]] -= self.amount[k]
                self.credits_posted[self.credit_slot[k]] -= self.amount[k]

    def fail_chain(self, start: int, failed: int, end: int, failed_result: int) -> None:
        for k in range(start, end + 1):
            self.result[k] = c.TRANSFER_LINKED_EVENT_FAILED
            self.timestamp[k] = 0
        self.result[failed] = failed_result

    def evaluate(self, i: int) -> tuple[int, int]:
        """Result of item i and, for EXISTS, the original's timestamp (else 0)."""
        r = self.validate(i)
        if r != c.TRANSFER_OK:
            return r, 0
        r = self.check_ledgers(i)
        if r != c.TRANSFER_OK:
            return r, 0
        row = self.find_original(i)
        if row >= 0:
            r = self.compare_with_original(i, row)
            if r != c.TRANSFER_EXISTS:
                return r, 0
            if row < self.n:
                return r, self.timestamp[row]
            return r, self.existing_timestamp[row - self.n]
        return self.check_balances(i), 0

    def validate(self, i: int) -> int:
        if self.precheck[i] != 0:
            return self.precheck[i]
        if self.flags[i] & ~c.TRANSFER_FLAG_LINKED:
            return c.TRANSFER_RESERVED_FLAG
        if self.id_hi[i] == 0 and self.id_lo[i] == 0:
            return c.TRANSFER_ID_MUST_NOT_BE_ZERO
        if self.debit_hi[i] == 0 and self.debit_lo[i] == 0:
            return c.TRANSFER_DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if self.credit_hi[i] == 0 and self.credit_lo[i] == 0:
            return c.TRANSFER_CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if self.debit_hi[i] == self.credit_hi[i] and self.debit_lo[i] == self.credit_lo[i]:
            return c.TRANSFER_ACCOUNTS_MUST_BE_DIFFERENT
        if self.pending_hi[i] != 0 or self.pending_lo[i] != 0:
            return c.TRANSFER_PENDING_ID_MUST_BE_ZERO
        if self.timeout_seconds[i] != 0:
            return c.TRANSFER_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        if self.ledger[i] == 0:
            return c.TRANSFER_LEDGER_MUST_NOT_BE_ZERO
        if self.code[i] == 0:
            return c.TRANSFER_CODE_MUST_NOT_BE_ZERO
        if self.amount[i] == 0:
            return c.TRANSFER_AMOUNT_MUST_NOT_BE_ZERO
        if self.debit_slot[i] == -1:
            return c.TRANSFER_DEBIT_ACCOUNT_NOT_FOUND
        if self.credit_slot[i] == -1:
            return c.TRANSFER_CREDIT_ACCOUNT_NOT_FOUND
        return c.TRANSFER_OK

    def check_ledgers(self, i: int) -> int:
        debit_ledger = self.acc_ledger[self.debit_slot[i]]
        if debit_ledger != self.acc_ledger[self.credit_slot[i]]:
            return c.TRANSFER_ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
        if self.ledger[i] != debit_ledger:
            return c.TRANSFER_TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS
        return c.TRANSFER_OK

    def find_original(self, i: int) -> int:
        # Only an earlier batch item that committed left a transfer behind.
        j = self.dup_prev[i]
        while j >= 0 and self.result[j] != c.TRANSFER_OK:
            j = self.dup_prev[j]
        if j >= 0:
            return j
        return self.exists_row[i]

    def compare_with_original(self, i: int, row: int) -> int:
        checks = (
            (self.flags, c.TRANSFER_EXISTS_WITH_DIFFERENT_FLAGS),
            (self.debit_hi, c.TRANSFER_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID),
            (self.debit_lo, c.TRANSFER_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID),
            (self.credit_hi, c.TRANSFER_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID),
            (self.credit_lo, c.TRANSFER_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID),
            (self.amount, c.TRANSFER_EXISTS_WITH_DIFFERENT_AMOUNT),
            (self.pending_hi, c.TRANSFER_EXISTS_WITH_DIFFERENT_PENDING_ID),
            (self.pending_lo, c.TRANSFER_EXISTS_WITH_DIFFERENT_PENDING_ID),
            (self.user_data_key, c.TRANSFER_EXISTS_WITH_DIFFERENT_USER_DATA),
            (self.timeout_seconds, c.TRANSFER_EXISTS_WITH_DIFFERENT_TIMEOUT),
            (self.code, c.TRANSFER_EXISTS_WITH_DIFFERENT_CODE),
            (self.ledger, c.TRANSFER_EXISTS_WITH_DIFFERENT_LEDGER),
        )
        for column, different in checks:
            if column[i] != column[row]:
                return different
        return c.TRANSFER_EXISTS

    def check_balances(self, i: int) -> int:
        dr = self.debit_slot[i]
        cr = self.credit_slot[i]
        amount = self.amount[i]
        debit_flags = self.acc_flags[dr]
        credit_flags = self.acc_flags[cr]
        if debit_flags & c.ACCOUNT_FLAG_CLOSED:
            return c.TRANSFER_DEBIT_ACCOUNT_CLOSED
        if credit_flags & c.ACCOUNT_FLAG_CLOSED:
            return c.TRANSFER_CREDIT_ACCOUNT_CLOSED
        # Python ints do not wrap, so the sums are written as the rule reads.
        if self.debits_posted[dr] + amount > c.BALANCE_MAX:
            return c.TRANSFER_OVERFLOWS_DEBITS_POSTED
        if self.credits_posted[cr] + amount > c.BALANCE_MAX:
            return c.TRANSFER_OVERFLOWS_CREDITS_POSTED
        debits = self.debits_pending[dr] + self.debits_posted[dr] + amount
        credits = self.credits_pending[cr] + self.credits_posted[cr] + amount
        if debits > c.BALANCE_MAX:
            return c.TRANSFER_OVERFLOWS_DEBITS
        if credits > c.BALANCE_MAX:
            return c.TRANSFER_OVERFLOWS_CREDITS
        if (debit_flags & c.ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
                and debits > self.credits_posted[dr]):
            return c.TRANSFER_EXCEEDS_CREDITS
        if (credit_flags & c.ACCOUNT_FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS
                and credits > self.debits_posted[cr]):
            return c.TRANSFER_EXCEEDS_DEBITS
        return c.TRANSFER_OK
