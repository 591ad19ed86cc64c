# cython: language_level=3
"""Data-plane kernel that applies a batch of single-phase transfers to account balances.

The caller (engine/posting) resolves account ids to slots, finds duplicates of transfer ids in
the batch and among committed transfers, allocates the outputs, and then calls
apply_transfers once per batch. The kernel sees only columns of integers: no Python objects
cross the `with nogil:` boundary. engine/kernels/reference.py is the plain-Python oracle with
the same signature; tests/property/test_balance_kernel.py compares the two.
"""
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
    const int64_t[:] existing_timestamp,
    const uint32_t[:] precheck,
    int64_t timestamp_base,
    const uint32_t[:] acc_ledger,
    const uint32_t[:] acc_flags,
    uint64_t[:] acc_debits_pending,
    uint64_t[:] acc_debits_posted,
    uint64_t[:] acc_credits_pending,
    uint64_t[:] acc_credits_posted,
    uint32_t[:] result,
    int64_t[:] timestamp_out,
):
    """Apply n transfers in order, as if one at a time, and return how many are OK.

    Rows 0..n-1 of the transfer columns (id_hi .. user_data_key) are the batch; rows
    n..n+m-1 are the m committed transfers that batch items may duplicate (exists_row points
    at them, existing_timestamp[k] is the timestamp of row n+k). debit_slot, credit_slot,
    chain_break, dup_prev and exists_row have one entry per batch item; slots index the
    account columns (-1: account not found). precheck[i] is a result the control plane has
    already decided for item i (e.g. TIMESTAMP_MUST_BE_ZERO), or 0: a nonzero precheck fails
    the item with that result ahead of every other rule but chain state.

    Modified in place: acc_debits_posted and acc_credits_posted (by the OK items; items of a
    failed linked chain are rolled back exactly), result[i] (a TransferResult number, never
    0) and timestamp_out[i] (timestamp_base + i for OK, the original's timestamp for EXISTS,
    0 otherwise). acc_debits_pending and acc_credits_pending are read only in this version
    (no pending transfers), but are writable so that the signature does not change when
    two-phase transfers arrive.

    Raises ValueError, before touching anything, if a length disagrees, if a slot, exists_row
    or dup_prev points outside its range, or if a precheck is not 0 or a failure result.
    """
    cdef Py_ssize_t n = debit_slot.shape[0]
    cdef Py_ssize_t rows = id_hi.shape[0]
    cdef Py_ssize_t accounts = acc_ledger.shape[0]
    cdef Py_ssize_t ok_count
    if rows < n:
        raise ValueError(f"id_hi has {rows} rows, fewer than the {n} batch items")
    _require_lengths(rows, {
        "id_lo": id_lo.shape[0], "debit_hi": debit_hi.shape[0], "debit_lo": debit_lo.shape[0],
        "credit_hi": credit_hi.shape[0], "credit_lo": credit_lo.shape[0],
        "pending_hi": pending_hi.shape[0], "pending_lo": pending_lo.shape[0],
        "amount": amount.shape[0], "ledger": ledger.shape[0], "code": code.shape[0],
        "flags": flags.shape[0], "timeout_seconds": timeout_seconds.shape[0],
        "user_data_key": user_data_key.shape[0],
    })
    _require_lengths(n, {
        "credit_slot": credit_slot.shape[0], "chain_break": chain_break.shape[0],
        "dup_prev": dup_prev.shape[0], "exists_row": exists_row.shape[0],
        "precheck": precheck.shape[0], "result": result.shape[0],
        "timestamp_out": timestamp_out.shape[0],
    })
    _require_lengths(rows - n, {"existing_timestamp": existing_timestamp.shape[0]})
    _require_lengths(accounts, {
        "acc_flags": acc_flags.shape[0],
        "acc_debits_pending": acc_debits_pending.shape[0],
        "acc_debits_posted": acc_debits_posted.shape[0],
        "acc_credits_pending": acc_credits_pending.shape[0],
        "acc_credits_posted": acc_credits_posted.shape[0],
    })
    _require_in_range("debit_slot", _first_bad_slot(debit_slot, accounts))
    _require_in_range("credit_slot", _first_bad_slot(credit_slot, accounts))
    _require_in_range("exists_row", _first_bad_exists_row(exists_row, n, rows))
    _require_in_range("dup_prev", _first_bad_dup_prev(dup_prev))
    _require_in_range("precheck", _first_bad_precheck(precheck))

    with nogil:
        ok_count = _apply_batch(
            id_hi, id_lo, debit_hi, debit_lo, credit_hi, credit_lo, pending_hi, pending_lo,
            amount, ledger, code, flags, timeout_seconds, user_data_key,
            debit_slot, credit_slot, chain_break, dup_prev, exists_row, existing_timestamp,
            precheck, timestamp_base, acc_ledger, acc_flags, acc_debits_pending, acc_debits_posted,
            acc_credits_pending, acc_credits_posted, result, timestamp_out,
        )
    return ok_count


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


cdef Py_ssize_t _first_bad_slot(const int64_t[:] slot, Py_ssize_t accounts) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(slot.shape[0]):
        if slot[i] < -1 or slot[i] >= accounts:
            return i
    return -1


cdef Py_ssize_t _first_bad_exists_row(
    const int64_t[:] exists_row, Py_ssize_t n, Py_ssize_t rows
) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(exists_row.shape[0]):
        if exists_row[i] != -1 and not (n <= exists_row[i] < rows):
            return i
    return -1


cdef Py_ssize_t _first_bad_precheck(const uint32_t[:] precheck) noexcept nogil:
    # A precheck fails its item: OK, EXISTS and the chain states are the kernel's to decide.
    cdef Py_ssize_t i
    for i in range(precheck.shape[0]):
        if precheck[i] != 0 and not (
            TRANSFER_RESULT_TIMESTAMP_MUST_BE_ZERO <= precheck[i] <= TRANSFER_RESULT_EXCEEDS_DEBITS
            and precheck[i] != TRANSFER_RESULT_EXISTS
        ):
            return i
    return -1


cdef Py_ssize_t _first_bad_dup_prev(const int64_t[:] dup_prev) noexcept nogil:
    # dup_prev must point backwards: the kernel reads the result of the item it names.
    cdef Py_ssize_t i
    for i in range(dup_prev.shape[0]):
        if dup_prev[i] != -1 and not (0 <= dup_prev[i] < i):
            return i
    return -1


# ---------------------------------------------------------------------------------------------
# The batch loop: chains in order, items of a chain in order, rollback on failure.

cdef Py_ssize_t _apply_batch(
    const uint64_t[:] id_hi, const uint64_t[:] id_lo,
    const uint64_t[:] debit_hi, const uint64_t[:] debit_lo,
    const uint64_t[:] credit_hi, const uint64_t[:] credit_lo,
    const uint64_t[:] pending_hi, const uint64_t[:] pending_lo,
    const uint64_t[:] amount, const uint32_t[:] ledger, const uint32_t[:] code,
    const uint32_t[:] flags, const uint32_t[:] timeout_seconds,
    const int64_t[:] user_data_key,
    const int64_t[:] debit_slot, const int64_t[:] credit_slot, const uint8_t[:] chain_break,
    const int64_t[:] dup_prev, const int64_t[:] exists_row,
    const int64_t[:] existing_timestamp, const uint32_t[:] precheck, int64_t timestamp_base,
    const uint32_t[:] acc_ledger, const uint32_t[:] acc_flags,
    uint64_t[:] acc_debits_pending, uint64_t[:] acc_debits_posted,
    uint64_t[:] acc_credits_pending, uint64_t[:] acc_credits_posted,
    uint32_t[:] result, int64_t[:] timestamp_out,
) noexcept nogil:
    cdef Py_ssize_t n = debit_slot.shape[0]
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t end, i, row
    cdef Py_ssize_t dr, cr
    cdef uint32_t r
    while start < n:
        end = _chain_end(flags, chain_break, start, n)
        if flags[end] & TRANSFER_FLAG_LINKED:
            # The client's request ended inside the chain: nothing of it may apply.
            _fail_chain(result, timestamp_out, start, end, end,
                        TRANSFER_RESULT_LINKED_EVENT_CHAIN_OPEN)
            start = end + 1
            continue
        for i in range(start, end + 1):
            dr = debit_slot[i]
            cr = credit_slot[i]
            row = -1
            r = _validate(
                precheck[i], flags[i], id_hi[i], id_lo[i], debit_hi[i], debit_lo[i],
                credit_hi[i], credit_lo[i], pending_hi[i], pending_lo[i], timeout_seconds[i],
                ledger[i], code[i], amount[i], dr, cr,
            )
            if r == TRANSFER_RESULT_OK:
                r = _check_ledgers(ledger[i], acc_ledger[dr], acc_ledger[cr])
            if r == TRANSFER_RESULT_OK:
                row = _find_original(i, dup_prev, exists_row, result)
                if row >= 0:
                    r = _compare_with_original(
                        i, row, debit_hi, debit_lo, credit_hi, credit_lo, pending_hi,
                        pending_lo, amount, ledger, code, flags, timeout_seconds,
                        user_data_key,
                    )
                else:
                    r = _check_balances(
                        amount[i], acc_flags[dr], acc_flags[cr],
                        acc_debits_pending[dr], acc_debits_posted[dr], acc_credits_posted[dr],
                        acc_credits_pending[cr], acc_credits_posted[cr], acc_debits_posted[cr],
                    )
            result[i] = r
            if r == TRANSFER_RESULT_OK:
                acc_debits_posted[dr] += amount[i]
                acc_credits_posted[cr] += amount[i]
                timestamp_out[i] = timestamp_base + i
            elif r == TRANSFER_RESULT_EXISTS:
                # EXISTS does not fail a chain: the transfer is there, as the client asked.
                timestamp_out[i] = (timestamp_out[row] if row < n
                                    else existing_timestamp[row - n])
            else:
                timestamp_out[i] = 0
                _fail_linked(start, i, end, debit_slot, credit_slot, amount, result,
                             timestamp_out, acc_debits_posted, acc_credits_posted)
                break
        start = end + 1
    return _count_ok(result)


cdef inline Py_ssize_t _chain_end(
    const uint32_t[:] flags, const uint8_t[:] chain_break, Py_ssize_t start, Py_ssize_t n
) noexcept nogil:
    """Return the last item of the chain starting at start (start itself when not linked)."""
    cdef Py_ssize_t end = start
    while flags[end] & TRANSFER_FLAG_LINKED and not chain_break[end] and end + 1 < n:
        end += 1
    return end


cdef inline void _fail_chain(
    uint32_t[:] result, int64_t[:] timestamp_out,
    Py_ssize_t start, Py_ssize_t failed, Py_ssize_t end, uint32_t failed_result,
) noexcept nogil:
    """Mark every item of start..end as LINKED_EVENT_FAILED except failed itself."""
    cdef Py_ssize_t k
    for k in range(start, end + 1):
        result[k] = TRANSFER_RESULT_LINKED_EVENT_FAILED
        timestamp_out[k] = 0
    result[failed] = failed_result


cdef inline void _fail_linked(
    Py_ssize_t start, Py_ssize_t failed, Py_ssize_t end,
    const int64_t[:] debit_slot, const int64_t[:] credit_slot, const uint64_t[:] amount,
    uint32_t[:] result, int64_t[:] timestamp_out,
    uint64_t[:] acc_debits_posted, uint64_t[:] acc_credits_posted,
) noexcept nogil:
    """Item failed (its result already written) ended its chain: undo and mark the rest.

    A chain of one item has nothing to undo. Undoing in reverse order subtracts exactly
    what was added, so the balances return to their values before the chain.
    """
    cdef Py_ssize_t k
    if start == end:
        return
    for k in range(failed - 1, start - 1, -1):
        if result[k] == TRANSFER_RESULT_OK:
            acc_debits_posted[debit_slot[k]] -= amount[k]
            acc_credits_posted[credit_slot[k]] -= amount[k]
    _fail_chain(result, timestamp_out, start, failed, end, result[failed])


cdef inline Py_ssize_t _count_ok(const uint32_t[:] result) noexcept nogil:
    cdef Py_ssize_t k, ok_count = 0
    for k in range(result.shape[0]):
        ok_count += result[k] == TRANSFER_RESULT_OK
    return ok_count


# ---------------------------------------------------------------------------------------------
# Evaluation of one item, in the documented precedence. Each step returns OK to go on.

cdef inline uint32_t _validate(
    uint32_t precheck, uint32_t flags, uint64_t id_hi, uint64_t id_lo,
    uint64_t debit_hi, uint64_t debit_lo, uint64_t credit_hi, uint64_t credit_lo,
    uint64_t pending_hi, uint64_t pending_lo,
    uint32_t timeout_seconds, uint32_t ledger, uint32_t code, uint64_t amount,
    int64_t debit_slot, int64_t credit_slot,
) noexcept nogil:
    """Steps 0-12: the control plane's result, the fields alone, whether both accounts exist."""
    if precheck != 0:
        return precheck
    # The server filters two-phase and balancing transfers out before the kernel, so any bit
    # but LINKED reaching it is one this version does not implement.
    if flags & ~(<uint32_t>TRANSFER_FLAG_LINKED):
        return TRANSFER_RESULT_RESERVED_FLAG
    if id_hi == 0 and id_lo == 0:
        return TRANSFER_RESULT_ID_MUST_NOT_BE_ZERO
    if debit_hi == 0 and debit_lo == 0:
        return TRANSFER_RESULT_DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
    if credit_hi == 0 and credit_lo == 0:
        return TRANSFER_RESULT_CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
    if debit_hi == credit_hi and debit_lo == credit_lo:
        return TRANSFER_RESULT_ACCOUNTS_MUST_BE_DIFFERENT
    if pending_hi != 0 or pending_lo != 0:
        return TRANSFER_RESULT_PENDING_ID_MUST_BE_ZERO
    if timeout_seconds != 0:
        return TRANSFER_RESULT_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
    if ledger == 0:
        return TRANSFER_RESULT_LEDGER_MUST_NOT_BE_ZERO
    if code == 0:
        return TRANSFER_RESULT_CODE_MUST_NOT_BE_ZERO
    if amount == 0:
        return TRANSFER_RESULT_AMOUNT_MUST_NOT_BE_ZERO
    if debit_slot == -1:
        return TRANSFER_RESULT_DEBIT_ACCOUNT_NOT_FOUND
    if credit_slot == -1:
        return TRANSFER_RESULT_CREDIT_ACCOUNT_NOT_FOUND
    return TRANSFER_RESULT_OK


cdef inline uint32_t _check_ledgers(
    uint32_t ledger, uint32_t debit_ledger, uint32_t credit_ledger
) noexcept nogil:
    """Steps 13-14."""
    if debit_ledger != credit_ledger:
        return TRANSFER_RESULT_ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER
    if ledger != debit_ledger:
        return TRANSFER_RESULT_TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS
    return TRANSFER_RESULT_OK


cdef inline Py_ssize_t _find_original(
    Py_ssize_t i, const int64_t[:] dup_prev, const int64_t[:] exists_row,
    const uint32_t[:] result,
) noexcept nogil:
    """Step 15a: the row of the transfer that item i would duplicate, or -1.

    An earlier batch item with the same id counts only if it committed (OK); one that failed
    or was rolled back left no transfer behind, so the walk goes on to the one before it.
    """
    cdef int64_t j = dup_prev[i]
    while j >= 0 and result[j] != TRANSFER_RESULT_OK:
        j = dup_prev[j]
    if j >= 0:
        return j
    return exists_row[i]


cdef inline uint32_t _compare_with_original(
    Py_ssize_t i, Py_ssize_t row,
    const uint64_t[:] debit_hi, const uint64_t[:] debit_lo,
    const uint64_t[:] credit_hi, const uint64_t[:] credit_lo,
    const uint64_t[:] pending_hi, const uint64_t[:] pending_lo,
    const uint64_t[:] amount, const uint32_t[:] ledger, const uint32_t[:] code,
    const uint32_t[:] flags, const uint32_t[:] timeout_seconds,
    const int64_t[:] user_data_key,
) noexcept nogil:
    """Step 15b: the first field in which item i differs from the original at row, or EXISTS."""
    if flags[i] != flags[row]:
        return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_FLAGS
    if debit_hi[i] != debit_hi[row] or debit_lo[i] != debit_lo[row]:
        return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID
    if credit_hi[i] != credit_hi[row] or credit_lo[i] != credit_lo[row]:
        return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID
    if amount[i] != amount[row]:
        return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_AMOUNT
    if pending_hi[i] != pending_hi[row] or pending_lo[i] != pending_lo[row]:
        return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_PENDING_ID
    if user_data_key[i] != user_data_key[row]:
        return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_USER_DATA
    if timeout_seconds[i] != timeout_seconds[row]:
        return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_TIMEOUT
    if code[i] != code[row]:
        return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_CODE
    if ledger[i] != ledger[row]:
        return TRANSFER_RESULT_EXISTS_WITH_DIFFERENT_LEDGER
    return TRANSFER_RESULT_EXISTS


cdef inline uint32_t _check_balances(
    uint64_t amount, uint32_t debit_flags, uint32_t credit_flags,
    uint64_t dr_debits_pending, uint64_t dr_debits_posted, uint64_t dr_credits_posted,
    uint64_t cr_credits_pending, uint64_t cr_credits_posted, uint64_t cr_debits_posted,
) noexcept nogil:
    """Steps 16-18: closed accounts, overflow beyond BALANCE_MAX, then balance limits.

    Overflow is tested as `amount > BALANCE_MAX - x` rather than `x + amount > BALANCE_MAX`
    so that nothing wraps: amount may be up to 2**64 - 1, while the caller guarantees every
    balance, and pending + posted of each side, is at most BALANCE_MAX. Once the overflow
    tests pass, the sums in the limit tests are at most BALANCE_MAX and cannot wrap either.
    """
    if debit_flags & ACCOUNT_FLAG_CLOSED:
        return TRANSFER_RESULT_DEBIT_ACCOUNT_CLOSED
    if credit_flags & ACCOUNT_FLAG_CLOSED:
        return TRANSFER_RESULT_CREDIT_ACCOUNT_CLOSED
    if amount > BALANCE_MAX - dr_debits_posted:
        return TRANSFER_RESULT_OVERFLOWS_DEBITS_POSTED
    if amount > BALANCE_MAX - cr_credits_posted:
        return TRANSFER_RESULT_OVERFLOWS_CREDITS_POSTED
    if amount > BALANCE_MAX - (dr_debits_pending + dr_debits_posted):
        return TRANSFER_RESULT_OVERFLOWS_DEBITS
    if amount > BALANCE_MAX - (cr_credits_pending + cr_credits_posted):
        return TRANSFER_RESULT_OVERFLOWS_CREDITS
    if (debit_flags & ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
            and dr_debits_pending + dr_debits_posted + amount > dr_credits_posted):
        return TRANSFER_RESULT_EXCEEDS_CREDITS
    if (credit_flags & ACCOUNT_FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS
            and cr_credits_pending + cr_credits_posted + amount > cr_debits_posted):
        return TRANSFER_RESULT_EXCEEDS_DEBITS
    return TRANSFER_RESULT_OK
