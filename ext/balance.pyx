# cython: language_level=3
"""Data-plane kernel that applies a batch of transfers to account balances.

Single-phase, pending (two-phase, with an optional timeout), post and void of a pending
transfer, and balancing transfers, with TigerBeetle's semantics. The caller (engine/posting)
resolves account ids to slots, finds duplicates of transfer ids and the pending transfers that
posts and voids name, in the batch and among committed transfers, allocates the outputs, and
then calls apply_transfers once per batch. The kernel sees only columns of integers: no Python
objects cross the `with nogil:` boundary. engine/kernels/reference.py is the plain-Python oracle
with the same signature; tests/property compares the two.
"""
cimport cython
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from results cimport *


def apply_transfers(
    const uint64_t[:] id_hi,
    const uint64_t[:] id_lo,
    const uint64_t[:] debit_hi,
    const uint64_t[:] debit_lo,
    const uint64_t[:] credit_hi,
    const uint64_t[:] credit_lo,
    const uint64_t[:] pending_hi,
    const uint64_t[:] pending_lo,
    const uint64_t[:] amount,
    const uint32_t[:] ledger,
    const uint32_t[:] code,
    const uint32_t[:] flags,
    const uint32_t[:] timeout_seconds,
    const int64_t[:] user_data_key,
    const int64_t[:] debit_slot,
    const int64_t[:] credit_slot,
    const uint8_t[:] chain_break,
    const int64_t[:] dup_prev,
    const int64_t[:] exists_row,
    const int64_t[:] pending_prev,
    const int64_t[:] pending_row,
    const int64_t[:] existing_timestamp,
    const uint32_t[:] precheck,
    int64_t timestamp_base,
    const uint32_t[:] acc_ledger,
    const uint32_t[:] acc_flags,
    uint64_t[:] acc_debits_pending,
    uint64_t[:] acc_debits_posted,
    uint64_t[:] acc_credits_pending,
    uint64_t[:] acc_credits_posted,
    uint8_t[:] status,
    int64_t[:] expires_at,
    uint32_t[:] result,
    int64_t[:] timestamp_out,
    uint64_t[:] amount_out,
    int64_t[:] resolved_row,
    uint64_t[:, ::1] balances_after,
):
    """Apply n transfers in order, as if one at a time, and return how many are OK.

    Rows 0..n-1 of the row columns (id_hi .. credit_slot, status, expires_at) are the batch;
    rows n..n+m-1 are the m committed transfers the batch refers to: those with the id of a
    batch item (exists_row) and the pending transfers that posts and voids name (pending_row).
    For a committed row, amount is the amount it moved or holds, existing_timestamp[k] is the
    timestamp of row n+k, and a post or void stores its pending transfer's debit and credit
    account ids, ledger and code where the request left them zero. debit_slot and
    credit_slot index the account columns: -1 is an unknown account, allowed for batch items
    only. chain_break, dup_prev, exists_row, pending_prev, pending_row and precheck have one
    entry per batch item. dup_prev[i] is the previous batch item with item i's id and
    pending_prev[i] the last batch item before i whose id is item i's pending_id (-1: none).
    precheck[i] is a result the control plane has already decided for item i (e.g.
    TIMESTAMP_MUST_BE_ZERO), or 0: a nonzero precheck fails the item with that result ahead of
    every other rule but chain state. Item i's timestamp is timestamp_base + i.

    status is a PendingStatus per row: 0 for batch rows and for committed rows that are not
    pending transfers, 1..4 for committed pending transfers, whose expires_at is the
    nanosecond at which an open one stops accepting a post or void (0: never). The caller
    guarantees that every open pending transfer's amount is part of its accounts' pending
    balances, and that pending + posted of each side of each account is at most BALANCE_MAX.

    Modified in place, with every effect of a failed linked chain rolled back exactly:
    the four account balance columns; status (1 for a batch item that committed as a pending
    transfer, 2 or 3 for the pending transfer an OK post or void resolved); expires_at of a
    batch item that committed as a pending transfer (left as written if its chain is rolled
    back: its status says it does not exist); result[i] (a TransferResult number, never 0);
    timestamp_out[i] (timestamp_base + i for OK, the original's timestamp for EXISTS, 0
    otherwise); amount_out[i] (the amount moved or reserved by an OK item, else 0);
    resolved_row[i] (the pending transfer's row for an OK post or void, else -1);
    balances_after[i] (for an OK item, the debit account's debits_pending, debits_posted,
    credits_pending and credits_posted right after it applied, then the credit account's;
    for a post or void, those of the pending transfer's accounts; zeros otherwise).

    Raises ValueError, before touching anything, if a length or shape disagrees, if a slot,
    row or previous-item index points outside its range, if a precheck is not 0 or a failure
    result, if a status does not fit its row, or if an item timestamp would not fit int64.
    """
    cdef Py_ssize_t n = chain_break.shape[0]
    cdef Py_ssize_t rows = id_hi.shape[0]
    cdef Py_ssize_t accounts = acc_ledger.shape[0]
    cdef Py_ssize_t ok_count
    cdef _Batch batch
    if rows < n:
        raise ValueError(f"id_hi has {rows} rows, fewer than the {n} batch items")
    _require_lengths(rows, {
        "id_lo": id_lo.shape[0], "debit_hi": debit_hi.shape[0], "debit_lo": debit_lo.shape[0],
        "credit_hi": credit_hi.shape[0], "credit_lo": credit_lo.shape[0],
        "pending_hi": pending_hi.shape[0], "pending_lo": pending_lo.shape[0],
        "amount": amount.shape[0], "ledger": ledger.shape[0], "code": code.shape[0],
        "flags": flags.shape[0], "timeout_seconds": timeout_seconds.shape[0],
        "user_data_key": user_data_key.shape[0], "debit_slot": debit_slot.shape[0],
        "credit_slot": credit_slot.shape[0], "status": status.shape[0],
        "expires_at": expires_at.shape[0],
    })
    _require_lengths(n, {
        "dup_prev": dup_prev.shape[0], "exists_row": exists_row.shape[0],
        "pending_prev": pending_prev.shape[0], "pending_row": pending_row.shape[0],
        "precheck": precheck.shape[0], "result": result.shape[0],
        "timestamp_out": timestamp_out.shape[0], "amount_out": amount_out.shape[0],
        "resolved_row": resolved_row.shape[0], "balances_after": balances_after.shape[0],
    })
    if balances_after.shape[1] != BALANCES_AFTER_COLUMNS:
        raise ValueError(f"balances_after has {balances_after.shape[1]} columns, "
                         f"expected {BALANCES_AFTER_COLUMNS}")
    _require_lengths(rows - n, {"existing_timestamp": existing_timestamp.shape[0]})
    _require_lengths(accounts, {
        "acc_flags": acc_flags.shape[0],
        "acc_debits_pending": acc_debits_pending.shape[0],
        "acc_debits_posted": acc_debits_posted.shape[0],
        "acc_credits_pending": acc_credits_pending.shape[0],
        "acc_credits_posted": acc_credits_posted.shape[0],
    })
    _require_in_range("debit_slot", _first_bad_slot(debit_slot, n, accounts))
    _require_in_range("credit_slot", _first_bad_slot(credit_slot, n, accounts))
    _require_in_range("exists_row", _first_bad_committed_row(exists_row, n, rows))
    _require_in_range("pending_row", _first_bad_committed_row(pending_row, n, rows))
    _require_in_range("dup_prev", _first_bad_previous_item(dup_prev))
    _require_in_range("pending_prev", _first_bad_previous_item(pending_prev))
    _require_in_range("precheck", _first_bad_precheck(precheck))
    _require_in_range("status", _first_bad_status(status, flags, n))
    if timestamp_base < 0 or (n > 0 and timestamp_base > TIMESTAMP_MAX - (n - 1)):
        raise ValueError(f"timestamp_base {timestamp_base} leaves the item timestamps "
                         f"outside 0..{TIMESTAMP_MAX}")

    batch = _Batch.__new__(_Batch)
    batch.n = n
    batch.timestamp_base = timestamp_base
    batch.id_hi = id_hi
    batch.id_lo = id_lo
    batch.debit_hi = debit_hi
    batch.debit_lo = debit_lo
    batch.credit_hi = credit_hi
    batch.credit_lo = credit_lo
    batch.pending_hi = pending_hi
    batch.pending_lo = pending_lo
    batch.amount = amount
    batch.ledger = ledger
    batch.code = code
    batch.flags = flags
    batch.timeout_seconds = timeout_seconds
    batch.user_data_key = user_data_key
    batch.debit_slot = debit_slot
    batch.credit_slot = credit_slot
    batch.chain_break = chain_break
    batch.dup_prev = dup_prev
    batch.exists_row = exists_row
    batch.pending_prev = pending_prev
    batch.pending_row = pending_row
    batch.existing_timestamp = existing_timestamp
    batch.precheck = precheck
    batch.acc_ledger = acc_ledger
    batch.acc_flags = acc_flags
    batch.debits_pending = acc_debits_pending
    batch.debits_posted = acc_debits_posted
    batch.credits_pending = acc_credits_pending
    batch.credits_posted = acc_credits_posted
    batch.status = status
    batch.expires_at = expires_at
    batch.result = result
    batch.timestamp_out = timestamp_out
    batch.amount_out = amount_out
    batch.resolved_row = resolved_row
    batch.balances_after = balances_after
    with nogil:
        ok_count = batch.run()
    return ok_count


def pending_statuses():
    """Return the C-level PendingStatus numbers by name, for the contract test."""
    return {
        "PENDING_STATUS_NONE": PENDING_STATUS_NONE,
        "PENDING_STATUS_PENDING": PENDING_STATUS_PENDING,
        "PENDING_STATUS_POSTED": PENDING_STATUS_POSTED,
        "PENDING_STATUS_VOIDED": PENDING_STATUS_VOIDED,
        "PENDING_STATUS_EXPIRED": PENDING_STATUS_EXPIRED,
    }


def kernel_constants():
    """Return the C-level constants of results.pxd by name, for the contract test."""
    names = {
        "TRANSFER_RESULT_UNSPECIFIED": TRANSFER_RESULT_UNSPECIFIED,
        "TRANSFER_RESULT_OK": TRANSFER_RESULT_OK,
        "TRANSFER_RESULT_LINKED_EVENT_FAILED": TRANSFER_RESULT_LINKED_EVENT_FAILED,
        "TRANSFER_RESULT_LINKED_EVENT_CHAIN_OPEN": TRANSFER_RESULT_LINKED_EVENT_CHAIN_OPEN,
        "TRANSFER_RESULT_TIMESTAMP_MUST_BE_ZERO": TRANSFER_RESULT_TIMESTAMP_MUST_BE_ZERO,
        "TRANSFER_RESULT_RESERVED_FLAG": TRANSFER_RESULT_RESERVED_FLAG,
        "TRANSFER_RESULT_ID_MUST_NOT_BE_ZERO": TRANSFER_RESULT_ID_MUST_NOT_BE_ZERO,
        "TRANSFER_RESULT_DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO":
            TRANSFER_RESULT_DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO,
        "TRANSFER_RESULT_CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO":
            TRANSFER_RESULT_CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO,
        "TRANSFER_RESULT_ACCOUNTS_MUST_BE_DIFFERENT": TRANSFER_RESULT_ACCOUNTS_MUST_BE_DIFFERENT,
        "TRANSFER_RESULT_PENDING_ID_MUST_BE_ZERO": TRANSFER_RESULT_PENDING_ID_MUST_BE_ZERO,
        "TRANSFER_RESULT_PENDING_ID_MUST_NOT_BE_ZERO": TRANSFER_RESULT_PENDING_ID_MUST_NOT_BE_ZERO,
        "TRANSFER_RESULT_PENDING_ID_MUST_BE_DIFFERENT":
            TRANSFER_RESULT_PENDING_ID_MUST_BE_DIFFERENT,
        "TRANSFER_RESULT_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER":
            TRANSFER_RESULT_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER,
        "TRANSFER_RESULT_FLAGS_ARE_MUTUALLY_EXCLUSIVE":
            TRANSFER_RESULT_FLAGS_ARE_MUTUALLY_EXCLUSIVE,
        "TRANSFER_RESULT_LEDGER_MUST_NOT_BE_ZERO": TRANSFER_RESULT_LEDGER_MUST_NOT_BE_ZERO,
        "TRANSFER_RESULT_CODE_MUST_NOT_BE_ZERO": TRANSFER_RESULT_CODE_MUST_NOT_BE_ZERO,
        "TRANSFER_RESULT_AMOUNT_MUST_NOT_BE_ZERO": TRANSFER_RESULT_AMOUNT_MUST_NOT_BE_ZERO,
        "TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND": TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND,
        "TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND": TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND,
        "TRANSFER_RESULT_ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER":
            TRANSFER_RESULT_ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER,
        "TRANSFER_RESULT_TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS":
            TRANSFER_RESULT_TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS,
        "TRANSFER_RESULT_PENDING_TRANSFER_NOT_FOUND": TRANSFER_RESULT_PENDING_TRANSFER_NOT_FOUND,
        "TRANSFER_RESULT_PENDING_TRANSFER_NOT_PENDING":
            TRANSFER_RESULT_PENDING_TRANSFER_NOT_PENDING,
        "TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID":
            TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID,
        "TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID":
            TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID,
        "TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_LEDGER":
            TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_LEDGER,
        "TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_CODE":
            TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_CODE,
        "TRANSFER_RESULT_EXCEEDS_PENDING_TRANSFER_AMOUNT":
            TRANSFER_RESULT_EXCEEDS_PENDING_TRANSFER_AMOUNT,
        "TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT":
            TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT,
        "TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_POSTED":
            TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_POSTED,
        "TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_VOIDED":
            TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_VOIDED,
        "TRANSFER_RESULT_PENDING_TRANSFER_EXPIRED": TRANSFER_RESULT_PENDING_TRANSFER_EXPIRED,
        "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FLAGS": TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FLAGS,
        "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID":
            TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID,
        "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID":
            TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID,
        "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_AMOUNT":
            TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_AMOUNT,
        "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_PENDING_ID":
            TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_PENDING_ID,
        "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_USER_DATA":
            TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_USER_DATA,
        "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_TIMEOUT":
            TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_TIMEOUT,
        "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CODE": TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CODE,
        "TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_LEDGER":
            TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_LEDGER,
        "TRANSFER_RESULT_EXISTS": TRANSFER_RESULT_EXISTS,
        "TRANSFER_RESULT_DEBIT_ACCOUNT_CLOSED": TRANSFER_RESULT_DEBIT_ACCOUNT_CLOSED,
        "TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED": TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED,
        "TRANSFER_RESULT_OVERFLOWS_DEBITS_PENDING": TRANSFER_RESULT_OVERFLOWS_DEBITS_PENDING,
        "TRANSFER_RESULT_OVERFLOWS_CREDITS_PENDING": TRANSFER_RESULT_OVERFLOWS_CREDITS_PENDING,
        "TRANSFER_RESULT_OVERFLOWS_DEBITS_POSTED": TRANSFER_RESULT_OVERFLOWS_DEBITS_POSTED,
        "TRANSFER_RESULT_OVERFLOWS_CREDITS_POSTED": TRANSFER_RESULT_OVERFLOWS_CREDITS_POSTED,
        "TRANSFER_RESULT_OVERFLOWS_DEBITS": TRANSFER_RESULT_OVERFLOWS_DEBITS,
        "TRANSFER_RESULT_OVERFLOWS_CREDITS": TRANSFER_RESULT_OVERFLOWS_CREDITS,
        "TRANSFER_RESULT_OVERFLOWS_TIMEOUT": TRANSFER_RESULT_OVERFLOWS_TIMEOUT,
        "TRANSFER_RESULT_EXCEEDS_CREDITS": TRANSFER_RESULT_EXCEEDS_CREDITS,
        "TRANSFER_RESULT_EXCEEDS_DEBITS": TRANSFER_RESULT_EXCEEDS_DEBITS,
        "TRANSFER_RESULT_FEES_EXCEED_AMOUNT": TRANSFER_RESULT_FEES_EXCEED_AMOUNT,
        "TRANSFER_RESULT_FEE_SCHEDULE_NOT_FOUND": TRANSFER_RESULT_FEE_SCHEDULE_NOT_FOUND,
        "TRANSFER_RESULT_REFUND_ORIGINAL_NOT_FOUND": TRANSFER_RESULT_REFUND_ORIGINAL_NOT_FOUND,
        "TRANSFER_RESULT_EXCEEDS_REFUNDABLE_AMOUNT": TRANSFER_RESULT_EXCEEDS_REFUNDABLE_AMOUNT,
        "TRANSFER_FLAGS_LINKED": TRANSFER_FLAG_LINKED,
        "TRANSFER_FLAGS_PENDING": TRANSFER_FLAG_PENDING,
        "TRANSFER_FLAGS_POST_PENDING_TRANSFER": TRANSFER_FLAG_POST_PENDING_TRANSFER,
        "TRANSFER_FLAGS_VOID_PENDING_TRANSFER": TRANSFER_FLAG_VOID_PENDING_TRANSFER,
        "TRANSFER_FLAGS_BALANCING_DEBIT": TRANSFER_FLAG_BALANCING_DEBIT,
        "TRANSFER_FLAGS_BALANCING_CREDIT": TRANSFER_FLAG_BALANCING_CREDIT,
        "ACCOUNT_FLAGS_LINKED": ACCOUNT_FLAG_LINKED,
        "ACCOUNT_FLAGS_DEBITS_MUST_NOT_EXCEED_CREDITS": ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS,
        "ACCOUNT_FLAGS_CREDITS_MUST_NOT_EXCEED_DEBITS": ACCOUNT_FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS,
        "ACCOUNT_FLAGS_HISTORY": ACCOUNT_FLAG_HISTORY,
        "ACCOUNT_FLAGS_CLOSED": ACCOUNT_FLAG_CLOSED,
    }
    names["BALANCE_MAX"] = BALANCE_MAX
    return names


# ---------------------------------------------------------------------------------------------
# Argument checks: run with the GIL, before anything is modified.

def _require_lengths(Py_ssize_t expected, dict lengths):
    for name, length in lengths.items():
        if length != expected:
            raise ValueError(f"{name} has length {length}, expected {expected}")


def _require_in_range(str name, Py_ssize_t bad_index):
    if bad_index >= 0:
        raise ValueError(f"{name}[{bad_index}] is out of range")


cdef Py_ssize_t _first_bad_slot(
    const int64_t[:] slot, Py_ssize_t n, Py_ssize_t accounts
) noexcept nogil:
    # A batch item may name an unknown account; a committed transfer's accounts exist.
    cdef Py_ssize_t row
    for row in range(slot.shape[0]):
        if slot[row] < (-1 if row < n else 0) or slot[row] >= accounts:
            return row
    return -1


cdef Py_ssize_t _first_bad_committed_row(
    const int64_t[:] committed_row, Py_ssize_t n, Py_ssize_t rows
) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(committed_row.shape[0]):
        if committed_row[i] != -1 and not (n <= committed_row[i] < rows):
            return i
    return -1


cdef Py_ssize_t _first_bad_precheck(const uint32_t[:] precheck) noexcept nogil:
    # A precheck fails its item: OK, EXISTS and the chain states are the kernel's to decide.
    cdef Py_ssize_t i
    for i in range(precheck.shape[0]):
        if precheck[i] != 0 and not (
            TRANSFER_RESULT_TIMESTAMP_MUST_BE_ZERO <= precheck[i]
            <= TRANSFER_RESULT_EXCEEDS_REFUNDABLE_AMOUNT
            and precheck[i] != TRANSFER_RESULT_EXISTS
        ):
            return i
    return -1


cdef Py_ssize_t _first_bad_previous_item(const int64_t[:] previous) noexcept nogil:
    # It must point backwards: the kernel reads the result of the item it names.
    cdef Py_ssize_t i
    for i in range(previous.shape[0]):
        if previous[i] != -1 and not (0 <= previous[i] < i):
            return i
    return -1


cdef Py_ssize_t _first_bad_status(
    const uint8_t[:] status, const uint32_t[:] flags, Py_ssize_t n
) noexcept nogil:
    # Batch rows start as no pending transfer; a committed row has a status iff it is pending.
    # Rollback relies on this: it restores a resolved pending transfer to PENDING, and an
    # item that committed as a pending transfer to NONE.
    cdef Py_ssize_t row
    for row in range(status.shape[0]):
        if row < n or not flags[row] & TRANSFER_FLAG_PENDING:
            if status[row] != PENDING_STATUS_NONE:
                return row
        elif not (PENDING_STATUS_PENDING <= status[row] <= PENDING_STATUS_EXPIRED):
            return row
    return -1


# ---------------------------------------------------------------------------------------------
# The batch: its columns, the loop over chains and items, and the rules for one item. Method
# by method it mirrors _Batch in engine/kernels/reference.py.

cdef enum:
    _RESOLVING = TRANSFER_FLAG_POST_PENDING_TRANSFER | TRANSFER_FLAG_VOID_PENDING_TRANSFER
    _TWO_PHASE = TRANSFER_FLAG_PENDING | _RESOLVING
    _BALANCING = TRANSFER_FLAG_BALANCING_DEBIT | TRANSFER_FLAG_BALANCING_CREDIT
    _KNOWN_FLAGS = TRANSFER_FLAG_LINKED | _TWO_PHASE | _BALANCING


cdef struct Decision:
    # What evaluating one item decided, before anything is applied.
    uint32_t result
    Py_ssize_t original_row  # for EXISTS: the row of the transfer the item repeats
    uint64_t moved  # for OK: the amount that moves
    Py_ssize_t pending_row  # for an OK post or void: the row of the pending transfer


cdef inline Decision _decision(
    uint32_t result, Py_ssize_t original_row, uint64_t moved, Py_ssize_t pending_row
) noexcept nogil:
    cdef Decision decision
    decision.result = result
    decision.original_row = original_row
    decision.moved = moved
    decision.pending_row = pending_row
    return decision


cdef inline Decision _failed(uint32_t result) noexcept nogil:
    return _decision(result, -1, 0, -1)


@cython.final
cdef class _Batch:
    """The columns of one apply_transfers call; see its docstring for their meaning."""

    cdef Py_ssize_t n
    cdef int64_t timestamp_base
    cdef const uint64_t[:] id_hi
    cdef const uint64_t[:] id_lo
    cdef const uint64_t[:] debit_hi
    cdef const uint64_t[:] debit_lo
    cdef const uint64_t[:] credit_hi
    cdef const uint64_t[:] credit_lo
    cdef const uint64_t[:] pending_hi
    cdef const uint64_t[:] pending_lo
    cdef const uint64_t[:] amount
    cdef const uint32_t[:] ledger
    cdef const uint32_t[:] code
    cdef const uint32_t[:] flags
    cdef const uint32_t[:] timeout_seconds
    cdef const int64_t[:] user_data_key
    cdef const int64_t[:] debit_slot
    cdef const int64_t[:] credit_slot
    cdef const uint8_t[:] chain_break
    cdef const int64_t[:] dup_prev
    cdef const int64_t[:] exists_row
    cdef const int64_t[:] pending_prev
    cdef const int64_t[:] pending_row
    cdef const int64_t[:] existing_timestamp
    cdef const uint32_t[:] precheck
    cdef const uint32_t[:] acc_ledger
    cdef const uint32_t[:] acc_flags
    cdef uint64_t[:] debits_pending
    cdef uint64_t[:] debits_posted
    cdef uint64_t[:] credits_pending
    cdef uint64_t[:] credits_posted
    cdef uint8_t[:] status
    cdef int64_t[:] expires_at
    cdef uint32_t[:] result
    cdef int64_t[:] timestamp_out
    cdef uint64_t[:] amount_out
    cdef int64_t[:] resolved_row
    cdef uint64_t[:, ::1] balances_after

    # -- Chains -------------------------------------------------------------------------------

    cdef Py_ssize_t run(self) noexcept nogil:
        cdef Py_ssize_t start = 0
        cdef Py_ssize_t end
        while start < self.n:
            end = self.chain_end(start)
            if self.flags[end] & TRANSFER_FLAG_LINKED:
                # The client's request ended inside the chain: nothing of it may apply.
                self.fail_chain(start, end, end, TRANSFER_RESULT_LINKED_EVENT_CHAIN_OPEN)
            else:
                self.run_chain(start, end)
            start = end + 1
        return self.count_ok()

    cdef inline Py_ssize_t chain_end(self, Py_ssize_t start) noexcept nogil:
        """The last item of the chain starting at start (start itself when not linked)."""
        cdef Py_ssize_t end = start
        while (self.flags[end] & TRANSFER_FLAG_LINKED and not self.chain_break[end]
               and end + 1 < self.n):
            end += 1
        return end

    cdef inline void run_chain(self, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
        cdef Py_ssize_t i
        cdef Decision decision
        for i in range(start, end + 1):
            decision = self.evaluate(i)
            self.result[i] = decision.result
            if decision.result == TRANSFER_RESULT_OK:
                self.commit(i, decision.moved, decision.pending_row)
            elif decision.result == TRANSFER_RESULT_EXISTS:
                # EXISTS does not fail a chain: the transfer is there, as the client asked.
                self.clear_outputs(i, self.timestamp_of(decision.original_row))
            else:
                self.clear_outputs(i, 0)
                if start < end:
                    self.roll_back(start, i)
                    self.fail_chain(start, i, end, decision.result)
                return

    cdef inline void commit(self, Py_ssize_t i, uint64_t moved, Py_ssize_t p) noexcept nogil:
        """Apply OK item i: moved is its amount, p the pending transfer it resolves or -1."""
        cdef uint32_t flags = self.flags[i]
        cdef Py_ssize_t dr, cr
        cdef uint64_t held
        if flags & _RESOLVING:
            dr = self.debit_slot[p]
            cr = self.credit_slot[p]
            # The whole reservation is released, also when only part of it is posted.
            held = self.stored_amount(p)
            self.debits_pending[dr] -= held
            self.credits_pending[cr] -= held
            if flags & TRANSFER_FLAG_POST_PENDING_TRANSFER:
                self.debits_posted[dr] += moved
                self.credits_posted[cr] += moved
                self.status[p] = PENDING_STATUS_POSTED
            else:
                self.status[p] = PENDING_STATUS_VOIDED
        else:
            dr = self.debit_slot[i]
            cr = self.credit_slot[i]
            if flags & TRANSFER_FLAG_PENDING:
                self.debits_pending[dr] += moved
                self.credits_pending[cr] += moved
                self.status[i] = PENDING_STATUS_PENDING
                self.expires_at[i] = self.expiry(i)
            else:
                self.debits_posted[dr] += moved
                self.credits_posted[cr] += moved
        self.timestamp_out[i] = self.timestamp_base + i
        self.amount_out[i] = moved
        self.resolved_row[i] = p
        self.record_balances(i, dr, cr)

    cdef inline void record_balances(
        self, Py_ssize_t i, Py_ssize_t dr, Py_ssize_t cr
    ) noexcept nogil:
        self.balances_after[i, 0] = self.debits_pending[dr]
        self.balances_after[i, 1] = self.debits_posted[dr]
        self.balances_after[i, 2] = self.credits_pending[dr]
        self.balances_after[i, 3] = self.credits_posted[dr]
        self.balances_after[i, 4] = self.debits_pending[cr]
        self.balances_after[i, 5] = self.debits_posted[cr]
        self.balances_after[i, 6] = self.credits_pending[cr]
        self.balances_after[i, 7] = self.credits_posted[cr]

    cdef inline void clear_outputs(self, Py_ssize_t i, int64_t timestamp) noexcept nogil:
        """The outputs of an item that did not commit (result[i] is written separately)."""
        cdef Py_ssize_t k
        self.timestamp_out[i] = timestamp
        self.amount_out[i] = 0
        self.resolved_row[i] = -1
        for k in range(BALANCES_AFTER_COLUMNS):
            self.balances_after[i, k] = 0

    cdef void roll_back(self, Py_ssize_t start, Py_ssize_t failed) noexcept nogil:
        """Undo the OK items of start..failed-1, so every balance and status is as before.

        In reverse order, so that a post or void is undone before the pending transfer it
        resolved, while that one's amount_out still holds its amount.
        """
        cdef Py_ssize_t k
        for k in range(failed - 1, start - 1, -1):
            if self.result[k] == TRANSFER_RESULT_OK:
                self.undo(k)

    cdef void undo(self, Py_ssize_t k) noexcept nogil:
        cdef uint32_t flags = self.flags[k]
        cdef uint64_t moved = self.amount_out[k]
        cdef Py_ssize_t dr, cr, p
        cdef uint64_t held
        if flags & _RESOLVING:
            p = self.resolved_row[k]
            dr = self.debit_slot[p]
            cr = self.credit_slot[p]
            held = self.stored_amount(p)
            self.debits_pending[dr] += held
            self.credits_pending[cr] += held
            if flags & TRANSFER_FLAG_POST_PENDING_TRANSFER:
                self.debits_posted[dr] -= moved
                self.credits_posted[cr] -= moved
            self.status[p] = PENDING_STATUS_PENDING
        else:
            dr = self.debit_slot[k]
            cr = self.credit_slot[k]
            if flags & TRANSFER_FLAG_PENDING:
                self.debits_pending[dr] -= moved
                self.credits_pending[cr] -= moved
                self.status[k] = PENDING_STATUS_NONE
            else:
                self.debits_posted[dr] -= moved
                self.credits_posted[cr] -= moved

    cdef void fail_chain(
        self, Py_ssize_t start, Py_ssize_t failed, Py_ssize_t end, uint32_t failed_result
    ) noexcept nogil:
        """Mark every item of start..end as LINKED_EVENT_FAILED except failed itself."""
        cdef Py_ssize_t k
        for k in range(start, end + 1):
            self.result[k] = TRANSFER_RESULT_LINKED_EVENT_FAILED
            self.clear_outputs(k, 0)
        self.result[failed] = failed_result

    cdef inline Py_ssize_t count_ok(self) noexcept nogil:
        cdef Py_ssize_t k, ok_count = 0
        for k in range(self.n):
            ok_count += self.result[k] == TRANSFER_RESULT_OK
        return ok_count

    # -- One item -----------------------------------------------------------------------------

    cdef inline Decision evaluate(self, Py_ssize_t i) noexcept nogil:
        cdef uint32_t r = self.validate(i)
        if r != TRANSFER_RESULT_OK:
            return _failed(r)
        if self.flags[i] & _RESOLVING:
            return self.evaluate_post_or_void(i)
        return self.evaluate_create(i)

    cdef inline uint32_t validate(self, Py_ssize_t i) noexcept nogil:
        """Steps 1-4, shared by every kind of transfer."""
        cdef uint32_t flags = self.flags[i]
        cdef uint32_t two_phase = flags & _TWO_PHASE
        if self.precheck[i] != 0:
            return self.precheck[i]
        if flags & ~(<uint32_t>_KNOWN_FLAGS):
            return TRANSFER_RESULT_RESERVED_FLAG
        if self.id_hi[i] == 0 and self.id_lo[i] == 0:
            return TRANSFER_RESULT_ID_MUST_NOT_BE_ZERO
        # x & (x - 1) clears the lowest bit set in x: it is nonzero iff two or more are set.
        if two_phase & (two_phase - 1) or (flags & _RESOLVING and flags & _BALANCING):
            return TRANSFER_RESULT_FLAGS_ARE_MUTUALLY_EXCLUSIVE
        return TRANSFER_RESULT_OK

    # -- Plain, pending and balancing transfers -----------------------------------------------

    cdef inline Decision evaluate_create(self, Py_ssize_t i) noexcept nogil:
        cdef uint32_t r = self.validate_create(i)
        cdef Py_ssize_t row, dr, cr
        cdef uint64_t moved
        if r != TRANSFER_RESULT_OK:
            return _failed(r)
        row = self.find_original(i)
        if row >= 0:
            return _decision(self.compare_create(i, row), row, 0, -1)
        dr = self.debit_slot[i]
        cr = self.credit_slot[i]
        if self.acc_flags[dr] & ACCOUNT_FLAG_CLOSED:
            return _failed(TRANSFER_RESULT_DEBIT_ACCOUNT_CLOSED)
        if self.acc_flags[cr] & ACCOUNT_FLAG_CLOSED:
            return _failed(TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED)
        moved = self.balancing_amount(i, dr, cr)
        r = self.check_create_balances(i, dr, cr, moved)
        if r != TRANSFER_RESULT_OK:
            return _failed(r)
        return _decision(TRANSFER_RESULT_OK, -1, moved, -1)

    cdef inline uint32_t validate_create(self, Py_ssize_t i) noexcept nogil:
        """Step 6 up to the existence check: the fields, the accounts and their ledgers."""
        cdef int64_t dr = self.debit_slot[i]
        cdef int64_t cr = self.credit_slot[i]
        if not self.has_debit(i):
            return TRANSFER_RESULT_DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if not self.has_credit(i):
            return TRANSFER_RESULT_CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if self.debit_hi[i] == self.credit_hi[i] and self.debit_lo[i] == self.credit_lo[i]:
            return TRANSFER_RESULT_ACCOUNTS_MUST_BE_DIFFERENT
        if self.has_pending_id(i):
            return TRANSFER_RESULT_PENDING_ID_MUST_BE_ZERO
        if self.timeout_seconds[i] != 0 and not self.flags[i] & TRANSFER_FLAG_PENDING:
            return TRANSFER_RESULT_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        if self.ledger[i] == 0:
            return TRANSFER_RESULT_LEDGER_MUST_NOT_BE_ZERO
        if self.code[i] == 0:
            return TRANSFER_RESULT_CODE_MUST_NOT_BE_ZERO
        if self.amount[i] == 0:
            return TRANSFER_RESULT_AMOUNT_MUST_NOT_BE_ZERO
        if dr == -1:
            return TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND
        if cr == -1:
            return TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND
        if self.acc_ledger[dr] != self.acc_ledger[cr]:
            return TRANSFER_RESULT_ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
        if self.ledger[i] != self.acc_ledger[dr]:
            return TRANSFER_RESULT_TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS
        return TRANSFER_RESULT_OK

    cdef uint32_t compare_create(self, Py_ssize_t i, Py_ssize_t row) noexcept nogil:
        """The first field in which item i differs from the original at row, or EXISTS."""
        cdef uint32_t r
        cdef uint64_t stored = self.stored_amount(row)
        if self.flags[i] != self.flags[row]:
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FLAGS
        if not self.same_debit(i, row):
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if not self.same_credit(i, row):
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        if self.flags[i] & _BALANCING:
            # The original moved at most what it asked for: any request at least that large
            # may have been the one that moved it.
            if self.amount[i] < stored:
                return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_AMOUNT
        elif self.amount[i] != stored:
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_AMOUNT
        r = self.compare_exactly_matched(i, row)
        if r != TRANSFER_RESULT_EXISTS:
            return r
        if self.code[i] != self.code[row]:
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CODE
        if self.ledger[i] != self.ledger[row]:
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_LEDGER
        return TRANSFER_RESULT_EXISTS

    cdef inline uint32_t compare_exactly_matched(
        self, Py_ssize_t i, Py_ssize_t row
    ) noexcept nogil:
        """The fields between amount and code, which every kind of transfer matches exactly."""
        if self.pending_hi[i] != self.pending_hi[row] or self.pending_lo[i] != self.pending_lo[row]:
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_PENDING_ID
        if self.user_data_key[i] != self.user_data_key[row]:
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_USER_DATA
        if self.timeout_seconds[i] != self.timeout_seconds[row]:
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_TIMEOUT
        return TRANSFER_RESULT_EXISTS

    cdef inline uint64_t balancing_amount(
        self, Py_ssize_t i, Py_ssize_t dr, Py_ssize_t cr
    ) noexcept nogil:
        """The requested amount, capped so that a balancing side ends at most at its limit."""
        cdef uint64_t moved = self.amount[i]
        cdef uint64_t used, room
        if self.flags[i] & TRANSFER_FLAG_BALANCING_DEBIT:
            used = self.debits_pending[dr] + self.debits_posted[dr]
            room = self.credits_posted[dr] - used if self.credits_posted[dr] > used else 0
            moved = room if room < moved else moved
        if self.flags[i] & TRANSFER_FLAG_BALANCING_CREDIT:
            used = self.credits_pending[cr] + self.credits_posted[cr]
            room = self.debits_posted[cr] - used if self.debits_posted[cr] > used else 0
            moved = room if room < moved else moved
        return moved

    cdef inline uint32_t check_create_balances(
        self, Py_ssize_t i, Py_ssize_t dr, Py_ssize_t cr, uint64_t moved
    ) noexcept nogil:
        """Overflow beyond BALANCE_MAX or the timestamp range, then the balance limits.

        Overflow is tested as `moved > BALANCE_MAX - x` rather than `x + moved > BALANCE_MAX`
        so that nothing wraps: the amount may be up to 2**64 - 1, while the caller guarantees
        that pending + posted of each side is at most BALANCE_MAX. Once the overflow tests
        pass, the sums in the limit tests are at most BALANCE_MAX and cannot wrap either.
        """
        cdef bint pending = self.flags[i] & TRANSFER_FLAG_PENDING
        cdef uint64_t debits = self.debits_pending[dr] + self.debits_posted[dr]
        cdef uint64_t credits = self.credits_pending[cr] + self.credits_posted[cr]
        if pending:
            if moved > BALANCE_MAX - self.debits_pending[dr]:
                return TRANSFER_RESULT_OVERFLOWS_DEBITS_PENDING
            if moved > BALANCE_MAX - self.credits_pending[cr]:
                return TRANSFER_RESULT_OVERFLOWS_CREDITS_PENDING
        else:
            if moved > BALANCE_MAX - self.debits_posted[dr]:
                return TRANSFER_RESULT_OVERFLOWS_DEBITS_POSTED
            if moved > BALANCE_MAX - self.credits_posted[cr]:
                return TRANSFER_RESULT_OVERFLOWS_CREDITS_POSTED
        if moved > BALANCE_MAX - debits:
            return TRANSFER_RESULT_OVERFLOWS_DEBITS
        if moved > BALANCE_MAX - credits:
            return TRANSFER_RESULT_OVERFLOWS_CREDITS
        # timeout_seconds < 2**32, so the product is below 2**62 and fits int64.
        if pending and (<int64_t>self.timeout_seconds[i] * NANOSECONDS_PER_SECOND
                        > TIMESTAMP_MAX - (self.timestamp_base + i)):
            return TRANSFER_RESULT_OVERFLOWS_TIMEOUT
        if (self.acc_flags[dr] & ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
                and debits + moved > self.credits_posted[dr]):
            return TRANSFER_RESULT_EXCEEDS_CREDITS
        if (self.acc_flags[cr] & ACCOUNT_FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS
                and credits + moved > self.debits_posted[cr]):
            return TRANSFER_RESULT_EXCEEDS_DEBITS
        return TRANSFER_RESULT_OK

    # -- Post and void ------------------------------------------------------------------------

    cdef Decision evaluate_post_or_void(self, Py_ssize_t i) noexcept nogil:
        cdef uint32_t r = self.validate_post_or_void(i)
        cdef Py_ssize_t p, row
        cdef uint64_t held, moved
        if r != TRANSFER_RESULT_OK:
            return _failed(r)
        p = self.find_pending(i)
        if p < 0:
            return _failed(TRANSFER_RESULT_PENDING_TRANSFER_NOT_FOUND)
        r = self.compare_with_pending(i, p)
        if r != TRANSFER_RESULT_OK:
            return _failed(r)
        row = self.find_original(i)
        if row >= 0:
            return _decision(self.compare_post_or_void(i, row), row, 0, -1)
        held = self.stored_amount(p)
        r = self.check_pending_state(i, p, held)
        if r != TRANSFER_RESULT_OK:
            return _failed(r)
        if not self.flags[i] & TRANSFER_FLAG_POST_PENDING_TRANSFER:
            return _decision(TRANSFER_RESULT_OK, -1, held, p)
        # Posting 0 means posting the whole reservation.
        moved = self.amount[i] if self.amount[i] != 0 else held
        if moved > BALANCE_MAX - self.debits_posted[self.debit_slot[p]]:
            return _failed(TRANSFER_RESULT_OVERFLOWS_DEBITS_POSTED)
        if moved > BALANCE_MAX - self.credits_posted[self.credit_slot[p]]:
            return _failed(TRANSFER_RESULT_OVERFLOWS_CREDITS_POSTED)
        return _decision(TRANSFER_RESULT_OK, -1, moved, p)

    cdef inline uint32_t validate_post_or_void(self, Py_ssize_t i) noexcept nogil:
        """Step 5: the fields a post or void must have; its other fields may be zero."""
        if not self.has_pending_id(i):
            return TRANSFER_RESULT_PENDING_ID_MUST_NOT_BE_ZERO
        if self.pending_hi[i] == self.id_hi[i] and self.pending_lo[i] == self.id_lo[i]:
            return TRANSFER_RESULT_PENDING_ID_MUST_BE_DIFFERENT
        if self.timeout_seconds[i] != 0:
            return TRANSFER_RESULT_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        return TRANSFER_RESULT_OK

    cdef inline Py_ssize_t find_pending(self, Py_ssize_t i) noexcept nogil:
        """The row of the transfer named by item i's pending_id, or -1; like find_original."""
        cdef int64_t j = self.pending_prev[i]
        while j >= 0 and self.result[j] != TRANSFER_RESULT_OK:
            j = self.dup_prev[j]
        if j >= 0:
            return j
        return self.pending_row[i]

    cdef inline uint32_t compare_with_pending(self, Py_ssize_t i, Py_ssize_t p) noexcept nogil:
        """Whether row p is a pending transfer that item i's nonzero fields agree with."""
        if not self.flags[p] & TRANSFER_FLAG_PENDING:
            return TRANSFER_RESULT_PENDING_TRANSFER_NOT_PENDING
        if self.has_debit(i) and not self.same_debit(i, p):
            return TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID
        if self.has_credit(i) and not self.same_credit(i, p):
            return TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID
        if self.ledger[i] != 0 and self.ledger[i] != self.ledger[p]:
            return TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_LEDGER
        if self.code[i] != 0 and self.code[i] != self.code[p]:
            return TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_CODE
        return TRANSFER_RESULT_OK

    cdef uint32_t compare_post_or_void(self, Py_ssize_t i, Py_ssize_t row) noexcept nogil:
        """Like compare_create, but a zero debit, credit, amount, code or ledger matches."""
        cdef uint32_t r
        if self.flags[i] != self.flags[row]:
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FLAGS
        if (self.has_debit(i)
                and not self.same_debit(i, self.filled(row, not self.has_debit(row)))):
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
        if (self.has_credit(i)
                and not self.same_credit(i, self.filled(row, not self.has_credit(row)))):
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
        if self.amount[i] != 0 and self.amount[i] != self.stored_amount(row):
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_AMOUNT
        r = self.compare_exactly_matched(i, row)
        if r != TRANSFER_RESULT_EXISTS:
            return r
        if self.code[i] != 0 and self.code[i] != self.code[self.filled(row, self.code[row] == 0)]:
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CODE
        if (self.ledger[i] != 0
                and self.ledger[i] != self.ledger[self.filled(row, self.ledger[row] == 0)]):
            return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_LEDGER
        return TRANSFER_RESULT_EXISTS

    cdef inline uint32_t check_pending_state(
        self, Py_ssize_t i, Py_ssize_t p, uint64_t held
    ) noexcept nogil:
        """The amount against the reservation, then whether the reservation is still open."""
        cdef uint64_t amount = self.amount[i]
        cdef uint8_t status = self.status[p]
        if self.flags[i] & TRANSFER_FLAG_POST_PENDING_TRANSFER:
            if amount > held:
                return TRANSFER_RESULT_EXCEEDS_PENDING_TRANSFER_AMOUNT
        elif amount != 0 and amount != held:
            return TRANSFER_RESULT_PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT
        if status == PENDING_STATUS_POSTED:
            return TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_POSTED
        if status == PENDING_STATUS_VOIDED:
            return TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_VOIDED
        if status == PENDING_STATUS_EXPIRED:
            return TRANSFER_RESULT_PENDING_TRANSFER_EXPIRED
        if self.expires_at[p] != 0 and self.timestamp_base + i >= self.expires_at[p]:
            return TRANSFER_RESULT_PENDING_TRANSFER_EXPIRED
        return TRANSFER_RESULT_OK

    # -- Rows ---------------------------------------------------------------------------------

    cdef inline Py_ssize_t find_original(self, Py_ssize_t i) noexcept nogil:
        """The row of the transfer that item i would duplicate, or -1.

        An earlier batch item with the same id counts only if it committed (OK); one that
        failed or was rolled back left no transfer behind, so the walk goes on to the one
        before it.
        """
        cdef int64_t j = self.dup_prev[i]
        while j >= 0 and self.result[j] != TRANSFER_RESULT_OK:
            j = self.dup_prev[j]
        if j >= 0:
            return j
        return self.exists_row[i]

    cdef inline bint has_debit(self, Py_ssize_t row) noexcept nogil:
        return self.debit_hi[row] != 0 or self.debit_lo[row] != 0

    cdef inline bint has_credit(self, Py_ssize_t row) noexcept nogil:
        return self.credit_hi[row] != 0 or self.credit_lo[row] != 0

    cdef inline bint has_pending_id(self, Py_ssize_t row) noexcept nogil:
        return self.pending_hi[row] != 0 or self.pending_lo[row] != 0

    cdef inline bint same_debit(self, Py_ssize_t row, Py_ssize_t other) noexcept nogil:
        return (self.debit_hi[row] == self.debit_hi[other]
                and self.debit_lo[row] == self.debit_lo[other])

    cdef inline bint same_credit(self, Py_ssize_t row, Py_ssize_t other) noexcept nogil:
        return (self.credit_hi[row] == self.credit_hi[other]
                and self.credit_lo[row] == self.credit_lo[other])

    cdef inline uint64_t stored_amount(self, Py_ssize_t row) noexcept nogil:
        """The amount a committed transfer moved (or holds): what a committed row stores."""
        return self.amount_out[row] if row < self.n else self.amount[row]

    cdef inline Py_ssize_t filled(self, Py_ssize_t row, bint left_zero) noexcept nogil:
        """The row holding a field of the post or void at row as stored.

        Where a post or void of this batch left the field zero, that is its pending transfer's
        row; committed rows are stored filled in by the caller.
        """
        if row < self.n and left_zero:
            return self.resolved_row[row]
        return row

    cdef inline int64_t timestamp_of(self, Py_ssize_t row) noexcept nogil:
        if row < self.n:
            return self.timestamp_out[row]
        return self.existing_timestamp[row - self.n]

    cdef inline int64_t expiry(self, Py_ssize_t i) noexcept nogil:
        """When the reservation of pending item i expires, or 0 for never."""
        if self.timeout_seconds[i] == 0:
            return 0
        return (self.timestamp_base + i
                + <int64_t>self.timeout_seconds[i] * NANOSECONDS_PER_SECOND)
