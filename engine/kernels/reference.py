"""Plain-Python oracles of the compiled kernels, with the same signatures and semantics.

They are written to be read, not to be fast: every column is copied into a list of Python
ints, the rules are applied one item at a time in the documented order, and the outputs are
written back at the end. tests/property compares them with engine.kernels on random batches.
Anything indexable with integer items works as a column (numpy arrays, memoryviews, lists).
"""
from collections.abc import MutableSequence, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from engine.kernels import constants as c

_UINT64_MASK = 0xFFFFFFFFFFFFFFFF

# Lifecycle of a pending transfer, as the status column of apply_transfers holds it. The same
# numbers are enum PendingStatus in ext/results.pxd (engine.kernels._balance.pending_statuses);
# tests/property/test_two_phase_kernel.py checks that the two agree.
PENDING_STATUS_NONE = 0  # not a pending transfer
PENDING_STATUS_PENDING = 1  # open: its amount is held in the pending balances
PENDING_STATUS_POSTED = 2
PENDING_STATUS_VOIDED = 3
PENDING_STATUS_EXPIRED = 4

# Columns of balances_after: the debit account's four balances, then the credit account's.
BALANCES_AFTER_COLUMNS = 8
NANOSECONDS_PER_SECOND = 1_000_000_000
# Timestamps and expiry times are nanoseconds in a signed 64-bit column.
TIMESTAMP_MAX = 2**63 - 1

_RESOLVING = c.TRANSFER_FLAG_POST_PENDING_TRANSFER | c.TRANSFER_FLAG_VOID_PENDING_TRANSFER
_TWO_PHASE = c.TRANSFER_FLAG_PENDING | _RESOLVING
_BALANCING = c.TRANSFER_FLAG_BALANCING_DEBIT | c.TRANSFER_FLAG_BALANCING_CREDIT
_KNOWN_FLAGS = c.TRANSFER_FLAG_LINKED | _TWO_PHASE | _BALANCING


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
    pending_prev: Sequence[int], pending_row: Sequence[int],
    existing_timestamp: Sequence[int],
    precheck: Sequence[int],
    timestamp_base: int,
    acc_ledger: Sequence[int], acc_flags: Sequence[int],
    acc_debits_pending: MutableSequence[int], acc_debits_posted: MutableSequence[int],
    acc_credits_pending: MutableSequence[int], acc_credits_posted: MutableSequence[int],
    status: MutableSequence[int], expires_at: MutableSequence[int],
    result: MutableSequence[int], timestamp_out: MutableSequence[int],
    amount_out: MutableSequence[int], resolved_row: MutableSequence[int],
    balances_after: Sequence[MutableSequence[int]],
) -> int:
    """Reference for engine.kernels.apply_transfers; see its docstring for the contract.

    Modified in place: the four account balance columns, status, expires_at, result,
    timestamp_out, amount_out, resolved_row and balances_after.
    """
    n = len(chain_break)
    rows = len(id_hi)
    accounts = len(acc_ledger)
    if rows < n:
        raise ValueError(f"id_hi has {rows} rows, fewer than the {n} batch items")
    _require_lengths(rows, id_lo=id_lo, debit_hi=debit_hi, debit_lo=debit_lo,
                     credit_hi=credit_hi, credit_lo=credit_lo, pending_hi=pending_hi,
                     pending_lo=pending_lo, amount=amount, ledger=ledger, code=code,
                     flags=flags, timeout_seconds=timeout_seconds, user_data_key=user_data_key,
                     debit_slot=debit_slot, credit_slot=credit_slot, status=status,
                     expires_at=expires_at)
    _require_lengths(n, dup_prev=dup_prev, exists_row=exists_row, pending_prev=pending_prev,
                     pending_row=pending_row, precheck=precheck, result=result,
                     timestamp_out=timestamp_out, amount_out=amount_out,
                     resolved_row=resolved_row, balances_after=balances_after)
    for i, balances in enumerate(balances_after):
        if len(balances) != BALANCES_AFTER_COLUMNS:
            raise ValueError(f"balances_after[{i}] has length {len(balances)}, "
                             f"expected {BALANCES_AFTER_COLUMNS}")
    _require_lengths(rows - n, existing_timestamp=existing_timestamp)
    _require_lengths(accounts, acc_flags=acc_flags, acc_debits_pending=acc_debits_pending,
                     acc_debits_posted=acc_debits_posted,
                     acc_credits_pending=acc_credits_pending,
                     acc_credits_posted=acc_credits_posted)
    for name, column in (("debit_slot", debit_slot), ("credit_slot", credit_slot)):
        for row, slot in enumerate(column):
            # A batch item may name an unknown account; a committed transfer's accounts exist.
            lowest = -1 if row < n else 0
            if not lowest <= slot < accounts:
                raise ValueError(f"{name}[{row}] is out of range")
    for name, column in (("exists_row", exists_row), ("pending_row", pending_row)):
        for i, row in enumerate(column):
            if row != -1 and not n <= row < rows:
                raise ValueError(f"{name}[{i}] is out of range")
    for name, column in (("dup_prev", dup_prev), ("pending_prev", pending_prev)):
        for i, prev in enumerate(column):
            # They must point backwards: the kernel reads the result of the item they name.
            if prev != -1 and not 0 <= prev < i:
                raise ValueError(f"{name}[{i}] is out of range")
    for i, decided in enumerate(precheck):
        # A precheck fails its item: OK, EXISTS and the chain states are the kernel's to decide.
        if decided != 0 and (not c.TRANSFER_TIMESTAMP_MUST_BE_ZERO <= decided
                             <= c.TRANSFER_EXCEEDS_REFUNDABLE_AMOUNT or decided == c.TRANSFER_EXISTS):
            raise ValueError(f"precheck[{i}] is out of range")
    for row, state in enumerate(status):
        if not _status_fits_row(state, row < n, flags[row]):
            raise ValueError(f"status[{row}] is out of range")
    if not 0 <= timestamp_base <= TIMESTAMP_MAX - max(n - 1, 0):
        raise ValueError(f"timestamp_base {timestamp_base} leaves the item timestamps "
                         f"outside 0..{TIMESTAMP_MAX}")

    batch = _Batch(
        id=_ids(id_hi, id_lo), debit_id=_ids(debit_hi, debit_lo),
        credit_id=_ids(credit_hi, credit_lo), pending_id=_ids(pending_hi, pending_lo),
        amount=_ints(amount), ledger=_ints(ledger), code=_ints(code), flags=_ints(flags),
        timeout_seconds=_ints(timeout_seconds), user_data_key=_ints(user_data_key),
        debit_slot=_ints(debit_slot), credit_slot=_ints(credit_slot),
        chain_break=_ints(chain_break), dup_prev=_ints(dup_prev), exists_row=_ints(exists_row),
        pending_prev=_ints(pending_prev), pending_row=_ints(pending_row),
        existing_timestamp=_ints(existing_timestamp), precheck=_ints(precheck),
        timestamp_base=int(timestamp_base),
        acc_ledger=_ints(acc_ledger), acc_flags=_ints(acc_flags),
        debits_pending=_ints(acc_debits_pending), debits_posted=_ints(acc_debits_posted),
        credits_pending=_ints(acc_credits_pending), credits_posted=_ints(acc_credits_posted),
        status=_ints(status), expires_at=_ints(expires_at),
        n=n,
    )
    batch.run()

    for k in range(accounts):
        acc_debits_pending[k] = batch.debits_pending[k]
        acc_debits_posted[k] = batch.debits_posted[k]
        acc_credits_pending[k] = batch.credits_pending[k]
        acc_credits_posted[k] = batch.credits_posted[k]
    for row in range(rows):
        status[row] = batch.status[row]
        expires_at[row] = batch.expires_at[row]
    for i in range(n):
        result[i] = batch.result[i]
        timestamp_out[i] = batch.timestamp[i]
        amount_out[i] = batch.amount_out[i]
        resolved_row[i] = batch.resolved_row[i]
        for k in range(BALANCES_AFTER_COLUMNS):
            balances_after[i][k] = batch.balances_after[i][k]
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


def _status_fits_row(state: int, in_batch: bool, flags: int) -> bool:
    """Batch rows start as no pending transfer; a committed row has a status iff it is pending."""
    if in_batch:
        return state == PENDING_STATUS_NONE
    if flags & c.TRANSFER_FLAG_PENDING:
        return PENDING_STATUS_PENDING <= state <= PENDING_STATUS_EXPIRED
    return state == PENDING_STATUS_NONE


def _ints(column: Sequence[int]) -> list[int]:
    return [int(v) for v in column]


def _ids(hi: Sequence[int], lo: Sequence[int]) -> list[int]:
    """128-bit ids as single Python ints, so that an id compares in one step."""
    return [int(high) << 64 | int(low) for high, low in zip(hi, lo)]


class _Decision(NamedTuple):
    """What evaluating one item decided, before anything is applied."""

    result: int
    original_row: int = -1  # for EXISTS: the row of the transfer the item repeats
    moved: int = 0  # for OK: the amount that moves
    pending_row: int = -1  # for an OK post or void: the row of the pending transfer


@dataclass
class _Batch:
    """The columns as lists of Python ints, and the loop over chains and items."""

    id: list[int]
    debit_id: list[int]
    credit_id: list[int]
    pending_id: list[int]
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
    pending_prev: list[int]
    pending_row: list[int]
    existing_timestamp: list[int]
    precheck: list[int]
    timestamp_base: int
    acc_ledger: list[int]
    acc_flags: list[int]
    debits_pending: list[int]
    debits_posted: list[int]
    credits_pending: list[int]
    credits_posted: list[int]
    status: list[int]
    expires_at: list[int]
    n: int
    result: list[int] = field(init=False)
    timestamp: list[int] = field(init=False)
    amount_out: list[int] = field(init=False)
    resolved_row: list[int] = field(init=False)
    balances_after: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.result = [c.TRANSFER_UNSPECIFIED] * self.n
        self.timestamp = [0] * self.n
        self.amount_out = [0] * self.n
        self.resolved_row = [-1] * self.n
        self.balances_after = [[0] * BALANCES_AFTER_COLUMNS for _ in range(self.n)]

    # -- Chains ---------------------------------------------------------------------------

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
            decision = self.evaluate(i)
            self.result[i] = decision.result
            if decision.result == c.TRANSFER_OK:
                self.commit(i, decision.moved, decision.pending_row)
            elif decision.result == c.TRANSFER_EXISTS:
                self.timestamp[i] = self.timestamp_of(decision.original_row)
            else:
                if start < end:
                    self.roll_back(start, i)
                    self.fail_chain(start, i, end, decision.result)
                return

    def commit(self, i: int, moved: int, pending_row: int) -> None:
        flags = self.flags[i]
        if flags & _RESOLVING:
            dr, cr = self.debit_slot[pending_row], self.credit_slot[pending_row]
            # The whole reservation is released, also when only part of it is posted.
            held = self.stored_amount(pending_row)
            self.debits_pending[dr] -= held
            self.credits_pending[cr] -= held
            if flags & c.TRANSFER_FLAG_POST_PENDING_TRANSFER:
                self.debits_posted[dr] += moved
                self.credits_posted[cr] += moved
                self.status[pending_row] = PENDING_STATUS_POSTED
            else:
                self.status[pending_row] = PENDING_STATUS_VOIDED
            self.resolved_row[i] = pending_row
        else:
            dr, cr = self.debit_slot[i], self.credit_slot[i]
            if flags & c.TRANSFER_FLAG_PENDING:
                self.debits_pending[dr] += moved
                self.credits_pending[cr] += moved
                self.status[i] = PENDING_STATUS_PENDING
                self.expires_at[i] = self.expiry(i)
            else:
                self.debits_posted[dr] += moved
                self.credits_posted[cr] += moved
        self.amount_out[i] = moved
        self.timestamp[i] = self.timestamp_base + i
        self.balances_after[i] = [
            self.debits_pending[dr], self.debits_posted[dr],
            self.credits_pending[dr], self.credits_posted[dr],
            self.debits_pending[cr], self.debits_posted[cr],
            self.credits_pending[cr], self.credits_posted[cr],
        ]

    def roll_back(self, start: int, failed: int) -> None:
        # In reverse, so that a post is undone before the pending transfer it resolved.
        for k in reversed(range(start, failed)):
            if self.result[k] == c.TRANSFER_OK:
                self.undo(k)

    def undo(self, k: int) -> None:
        flags = self.flags[k]
        moved = self.amount_out[k]
        if flags & _RESOLVING:
            pending_row = self.resolved_row[k]
            dr, cr = self.debit_slot[pending_row], self.credit_slot[pending_row]
            held = self.stored_amount(pending_row)
            self.debits_pending[dr] += held
            self.credits_pending[cr] += held
            if flags & c.TRANSFER_FLAG_POST_PENDING_TRANSFER:
                self.debits_posted[dr] -= moved
                self.credits_posted[cr] -= moved
            self.status[pending_row] = PENDING_STATUS_PENDING
        else:
            dr, cr = self.debit_slot[k], self.credit_slot[k]
            if flags & c.TRANSFER_FLAG_PENDING:
                self.debits_pending[dr] -= moved
                self.credits_pending[cr] -= moved
                self.status[k] = PENDING_STATUS_NONE
            else:
                self.debits_posted[dr] -= moved
                self.credits_posted[cr] -= moved

    def fail_chain(self, start: int, failed: int, end: int, failed_result: int) -> None:
        for k in range(start, end + 1):
            self.result[k] = c.TRANSFER_LINKED_EVENT_FAILED
            self.timestamp[k] = 0
            self.amount_out[k] = 0
            self.resolved_row[k] = -1
            self.balances_after[k] = [0] * BALANCES_AFTER_COLUMNS
        self.result[failed] = failed_result

    # -- One item -------------------------------------------------------------------------

    def evaluate(self, i: int) -> _Decision:
        r = self.validate(i)
        if r != c.TRANSFER_OK:
            return _Decision(r)
        if self.flags[i] & _RESOLVING:
            return self.evaluate_post_or_void(i)
        return self.evaluate_create(i)

    def validate(self, i: int) -> int:
        """Steps 1-4, shared by every kind of transfer."""
        flags = self.flags[i]
        if self.precheck[i] != 0:
            return self.precheck[i]
        if flags & ~_KNOWN_FLAGS:
            return c.TRANSFER_RESERVED_FLAG
        if self.id[i] == 0:
            return c.TRANSFER_ID_MUST_NOT_BE_ZERO
        if (bin(flags & _TWO_PHASE).count("1") > 1
                or (flags & _RESOLVING and flags & _BALANCING)):
            return c.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE
        return c.TRANSFER_OK

    # -- Plain, pending and balancing transfers -----------------------------------------------

    def evaluate_create(self, i: int) -> _Decision:
        r = self.validate_create(i)
        if r != c.TRANSFER_OK:
            return _Decision(r)
        row = self.find_original(i)
        if row >= 0:
            return _Decision(self.compare_create(i, row), original_row=row)
        if self.acc_flags[self.debit_slot[i]] & c.ACCOUNT_FLAG_CLOSED:
            return _Decision(c.TRANSFER_DEBIT_ACCOUNT_CLOSED)
        if self.acc_flags[self.credit_slot[i]] & c.ACCOUNT_FLAG_CLOSED:
            return _Decision(c.TRANSFER_CREDIT_ACCOUNT_CLOSED)
        moved = self.balancing_amount(i)
        r = self.check_create_balances(i, moved)
        if r != c.TRANSFER_OK:
            return _Decision(r)
        return _Decision(c.TRANSFER_OK, moved=moved)

    def validate_create(self, i: int) -> int:
        """Step 6 up to the existence check: the fields, the accounts and their ledgers."""
        if self.debit_id[i] == 0:
            return c.TRANSFER_DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if self.credit_id[i] == 0:
            return c.TRANSFER_CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if self.debit_id[i] == self.credit_id[i]:
            return c.TRANSFER_ACCOUNTS_MUST_BE_DIFFERENT
        if self.pending_id[i] != 0:
            return c.TRANSFER_PENDING_ID_MUST_BE_ZERO
        if self.timeout_seconds[i] != 0 and not self.flags[i] & c.TRANSFER_FLAG_PENDING:
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
        debit_ledger = self.acc_ledger[self.debit_slot[i]]
        if debit_ledger != self.acc_ledger[self.credit_slot[i]]:
            return c.TRANSFER_ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
        if self.ledger[i] != debit_ledger:
            return c.TRANSFER_TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS
        return c.TRANSFER_OK

    def compare_create(self, i: int, row: int) -> int:
        """The first field in which item i differs from the original at row, or EXISTS."""
        if self.flags[i] != self.flags[row]:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_FLAGS
        if self.debit_id[i] != self.debit_id[row]:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if self.credit_id[i] != self.credit_id[row]:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        stored = self.stored_amount(row)
        if self.flags[i] & _BALANCING:
            # The original moved at most what it asked for: any request at least that large
            # may have been the one that moved it.
            if self.amount[i] < stored:
                return c.TRANSFER_EXISTS_WITH_DIFFERENT_AMOUNT
        elif self.amount[i] != stored:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_AMOUNT
        r = self.compare_exactly_matched(i, row)
        if r != c.TRANSFER_EXISTS:
            return r
        if self.code[i] != self.code[row]:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_CODE
        if self.ledger[i] != self.ledger[row]:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_LEDGER
        return c.TRANSFER_EXISTS

    def compare_exactly_matched(self, i: int, row: int) -> int:
        """The fields between amount and code, which every kind of transfer matches exactly."""
        if self.pending_id[i] != self.pending_id[row]:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_PENDING_ID
        if self.user_data_key[i] != self.user_data_key[row]:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_USER_DATA
        if self.timeout_seconds[i] != self.timeout_seconds[row]:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_TIMEOUT
        return c.TRANSFER_EXISTS

    def balancing_amount(self, i: int) -> int:
        """The requested amount, capped so that a balancing side ends at most at its limit."""
        moved = self.amount[i]
        dr, cr = self.debit_slot[i], self.credit_slot[i]
        if self.flags[i] & c.TRANSFER_FLAG_BALANCING_DEBIT:
            room = self.credits_posted[dr] - self.debits_posted[dr] - self.debits_pending[dr]
            moved = min(moved, max(0, room))
        if self.flags[i] & c.TRANSFER_FLAG_BALANCING_CREDIT:
            room = self.debits_posted[cr] - self.credits_posted[cr] - self.credits_pending[cr]
            moved = min(moved, max(0, room))
        return moved

    def check_create_balances(self, i: int, moved: int) -> int:
        """Overflow beyond BALANCE_MAX or the timestamp range, then the balance limits."""
        dr, cr = self.debit_slot[i], self.credit_slot[i]
        pending = self.flags[i] & c.TRANSFER_FLAG_PENDING
        # Python ints do not wrap, so the sums are written as the rules read.
        if pending:
            if self.debits_pending[dr] + moved > c.BALANCE_MAX:
                return c.TRANSFER_OVERFLOWS_DEBITS_PENDING
            if self.credits_pending[cr] + moved > c.BALANCE_MAX:
                return c.TRANSFER_OVERFLOWS_CREDITS_PENDING
        else:
            if self.debits_posted[dr] + moved > c.BALANCE_MAX:
                return c.TRANSFER_OVERFLOWS_DEBITS_POSTED
            if self.credits_posted[cr] + moved > c.BALANCE_MAX:
                return c.TRANSFER_OVERFLOWS_CREDITS_POSTED
        debits = self.debits_pending[dr] + self.debits_posted[dr] + moved
        credits = self.credits_pending[cr] + self.credits_posted[cr] + moved
        if debits > c.BALANCE_MAX:
            return c.TRANSFER_OVERFLOWS_DEBITS
        if credits > c.BALANCE_MAX:
            return c.TRANSFER_OVERFLOWS_CREDITS
        if pending and self.expiry(i) > TIMESTAMP_MAX:
            return c.TRANSFER_OVERFLOWS_TIMEOUT
        if (self.acc_flags[dr] & c.ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
                and debits > self.credits_posted[dr]):
            return c.TRANSFER_EXCEEDS_CREDITS
        if (self.acc_flags[cr] & c.ACCOUNT_FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS
                and credits > self.debits_posted[cr]):
            return c.TRANSFER_EXCEEDS_DEBITS
        return c.TRANSFER_OK

    # -- Post and void ----------------------------------------------------------------------

    def evaluate_post_or_void(self, i: int) -> _Decision:
        r = self.validate_post_or_void(i)
        if r != c.TRANSFER_OK:
            return _Decision(r)
        p = self.find_pending(i)
        if p < 0:
            return _Decision(c.TRANSFER_PENDING_TRANSFER_NOT_FOUND)
        r = self.compare_with_pending(i, p)
        if r != c.TRANSFER_OK:
            return _Decision(r)
        row = self.find_original(i)
        if row >= 0:
            return _Decision(self.compare_post_or_void(i, row), original_row=row)
        held = self.stored_amount(p)
        r = self.check_pending_state(i, p, held)
        if r != c.TRANSFER_OK:
            return _Decision(r)
        if not self.flags[i] & c.TRANSFER_FLAG_POST_PENDING_TRANSFER:
            return _Decision(c.TRANSFER_OK, moved=held, pending_row=p)
        # Posting 0 means posting the whole reservation.
        moved = self.amount[i] or held
        if self.debits_posted[self.debit_slot[p]] + moved > c.BALANCE_MAX:
            return _Decision(c.TRANSFER_OVERFLOWS_DEBITS_POSTED)
        if self.credits_posted[self.credit_slot[p]] + moved > c.BALANCE_MAX:
            return _Decision(c.TRANSFER_OVERFLOWS_CREDITS_POSTED)
        return _Decision(c.TRANSFER_OK, moved=moved, pending_row=p)

    def validate_post_or_void(self, i: int) -> int:
        """Step 5: the fields a post or void must have; its other fields may be zero."""
        if self.pending_id[i] == 0:
            return c.TRANSFER_PENDING_ID_MUST_NOT_BE_ZERO
        if self.pending_id[i] == self.id[i]:
            return c.TRANSFER_PENDING_ID_MUST_BE_DIFFERENT
        if self.timeout_seconds[i] != 0:
            return c.TRANSFER_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        return c.TRANSFER_OK

    def find_pending(self, i: int) -> int:
        """The row of the transfer named by item i's pending_id, or -1; like find_original."""
        j = self.pending_prev[i]
        while j >= 0 and self.result[j] != c.TRANSFER_OK:
            j = self.dup_prev[j]
        if j >= 0:
            return j
        return self.pending_row[i]

    def compare_with_pending(self, i: int, p: int) -> int:
        """Whether row p is a pending transfer that item i's nonzero fields agree with."""
        if not self.flags[p] & c.TRANSFER_FLAG_PENDING:
            return c.TRANSFER_PENDING_TRANSFER_NOT_PENDING
        if self.debit_id[i] != 0 and self.debit_id[i] != self.debit_id[p]:
            return c.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID
        if self.credit_id[i] != 0 and self.credit_id[i] != self.credit_id[p]:
            return c.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID
        if self.ledger[i] != 0 and self.ledger[i] != self.ledger[p]:
            return c.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_LEDGER
        if self.code[i] != 0 and self.code[i] != self.code[p]:
            return c.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_CODE
        return c.TRANSFER_OK

    def compare_post_or_void(self, i: int, row: int) -> int:
        """Like compare_create, but a zero debit, credit, amount, code or ledger matches."""
        if self.flags[i] != self.flags[row]:
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_FLAGS
        if self.debit_id[i] != 0 and self.debit_id[i] != self.filled(self.debit_id, row):
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if self.credit_id[i] != 0 and self.credit_id[i] != self.filled(self.credit_id, row):
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        if self.amount[i] != 0 and self.amount[i] != self.stored_amount(row):
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_AMOUNT
        r = self.compare_exactly_matched(i, row)
        if r != c.TRANSFER_EXISTS:
            return r
        if self.code[i] != 0 and self.code[i] != self.filled(self.code, row):
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_CODE
        if self.ledger[i] != 0 and self.ledger[i] != self.filled(self.ledger, row):
            return c.TRANSFER_EXISTS_WITH_DIFFERENT_LEDGER
        return c.TRANSFER_EXISTS

    def check_pending_state(self, i: int, p: int, held: int) -> int:
        """The amount against the reservation, then whether the reservation is still open."""
        amount = self.amount[i]
        if self.flags[i] & c.TRANSFER_FLAG_POST_PENDING_TRANSFER:
            if amount > held:
                return c.TRANSFER_EXCEEDS_PENDING_TRANSFER_AMOUNT
        elif amount != 0 and amount != held:
            return c.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT
        status = self.status[p]
        if status == PENDING_STATUS_POSTED:
            return c.TRANSFER_PENDING_TRANSFER_ALREADY_POSTED
        if status == PENDING_STATUS_VOIDED:
            return c.TRANSFER_PENDING_TRANSFER_ALREADY_VOIDED
        if status == PENDING_STATUS_EXPIRED:
            return c.TRANSFER_PENDING_TRANSFER_EXPIRED
        expires_at = self.expires_at[p]
        if expires_at != 0 and self.timestamp_base + i >= expires_at:
            return c.TRANSFER_PENDING_TRANSFER_EXPIRED
        return c.TRANSFER_OK

    # -- Rows -------------------------------------------------------------------------------

    def find_original(self, i: int) -> int:
        # Only an earlier batch item that committed left a transfer behind.
        j = self.dup_prev[i]
        while j >= 0 and self.result[j] != c.TRANSFER_OK:
            j = self.dup_prev[j]
        if j >= 0:
            return j
        return self.exists_row[i]

    def stored_amount(self, row: int) -> int:
        """The amount a committed transfer moved (or holds): what a committed row stores."""
        return self.amount_out[row] if row < self.n else self.amount[row]

    def filled(self, column: list[int], row: int) -> int:
        """A field of a post or void as stored: its pending transfer's where it was left 0.

        Committed rows are stored that way by the caller; a batch item is filled here, from
        the pending transfer it resolved.
        """
        if row < self.n and column[row] == 0:
            return column[self.resolved_row[row]]
        return column[row]

    def timestamp_of(self, row: int) -> int:
        if row < self.n:
            return self.timestamp[row]
        return self.existing_timestamp[row - self.n]

    def expiry(self, i: int) -> int:
        """When the reservation of pending item i expires, or 0 for never."""
        if self.timeout_seconds[i] == 0:
            return 0
        return self.timestamp_base + i + self.timeout_seconds[i] * NANOSECONDS_PER_SECOND
