# cython: language_level=3
"""Data-plane kernel that splits amounts into fee, commission, tax, split and reserve legs.

A fee schedule is flattened by engine/fees/schedule.py into four integer tables (schedules,
fees, tiers, split weights); expand_fees turns a batch of gross amounts into one row of leg
amounts per item, in the fixed slot layout below, and allocate_refunds spreads a batch of
refund amounts over the legs of the originals. Integer arithmetic only: every product of an
amount and a rate is taken in 128 bits, and every rounding is explicit. The plain-Python
oracle, with fractions.Fraction, is engine/fees/reference.py; tests/property compares them.
"""
from libc.stdint cimport int32_t, uint32_t, uint64_t

from results cimport TRANSFER_RESULT_EXCEEDS_REFUNDABLE_AMOUNT, TRANSFER_RESULT_FEES_EXCEED_AMOUNT

cdef extern from *:
    ctypedef unsigned long long u128 "unsigned __int128"

# Slot layout of one item's legs: the net amount to the credit account, the split parties,
# then per fee its fee (less commission), commission and tax, and last the reserve.
DEF SPLITS_MAX = 8
DEF FEES_MAX = 4
DEF TIERS_MAX = 8
DEF SLOT_NET = 0
DEF SLOT_SPLIT = 1
DEF SLOT_FEE = SLOT_SPLIT + SPLITS_MAX
DEF SLOT_RESERVE = SLOT_FEE + 3 * FEES_MAX
DEF LEGS_MAX = SLOT_RESERVE + 1
DEF PPM = 1000000
DEF AMOUNT_MAX = 0x7FFFFFFFFFFFFFFF

# Columns of the schedule, fee and tier tables.
DEF S_ROUNDING = 0
DEF S_FEE_START = 1
DEF S_FEE_COUNT = 2
DEF S_SPLIT_START = 3
DEF S_SPLIT_COUNT = 4
DEF S_NET_WEIGHT = 5
DEF S_RESERVE_PPM = 6
DEF SCHEDULE_COLUMNS = 7
DEF F_RATE_PPM = 0
DEF F_FIXED = 1
DEF F_MINIMUM = 2
DEF F_MAXIMUM = 3
DEF F_COMMISSION_PPM = 4
DEF F_TAX_PPM = 5
DEF F_TIER_START = 6
DEF F_TIER_COUNT = 7
DEF FEE_COLUMNS = 8
DEF T_AMOUNT_MIN = 0
DEF T_RATE_PPM = 1
DEF T_FIXED = 2
DEF TIER_COLUMNS = 3

# Rounding modes: the numbers of enum FeeRounding in proto/txengine/v1/ledger.proto.
DEF ROUND_HALF_EVEN = 1
DEF ROUND_HALF_UP = 2
DEF ROUND_DOWN = 3
DEF ROUND_UP = 4


def layout():
    """The slot layout and table shapes, for engine/fees/schedule.py to check against."""
    return {
        "SPLITS_MAX": SPLITS_MAX, "FEES_MAX": FEES_MAX, "TIERS_MAX": TIERS_MAX,
        "SLOT_NET": SLOT_NET, "SLOT_SPLIT": SLOT_SPLIT, "SLOT_FEE": SLOT_FEE,
        "SLOT_RESERVE": SLOT_RESERVE, "LEGS_MAX": LEGS_MAX, "PPM": PPM,
        "SCHEDULE_COLUMNS": SCHEDULE_COLUMNS, "FEE_COLUMNS": FEE_COLUMNS,
        "TIER_COLUMNS": TIER_COLUMNS,
    }


def expand_fees(
    const uint64_t[:] amount,
    const int32_t[:] schedule,
    const uint64_t[:, ::1] schedules,
    const uint64_t[:, ::1] fees,
    const uint64_t[:, ::1] tiers,
    const uint64_t[:] split_weights,
    uint64_t[:, ::1] legs,
    uint32_t[:] result,
):
    """Split each amount[i] by schedules[schedule[i]] into legs[i, :]; return how many failed.

    For each fee of the schedule: the last tier whose amount_min <= amount (else the fee's own
    rate and fixed amount) gives fee = round(amount * rate_ppm / 10^6) + fixed, clamped to the
    fee's minimum and (if not 0) maximum; commission = round(fee * commission_ppm / 10^6) and
    tax = round(fee * tax_ppm / 10^6). The net amount, amount - sum(fee + tax), is shared by
    largest remainder among the credit account (net_weight) and the split parties; the reserve
    is round(net share * reserve_ppm / 10^6). round() is the schedule's rounding mode. The legs
    that leave the debit account (every slot but SLOT_RESERVE) sum exactly to amount[i].

    Modified in place: legs (n x LEGS_MAX, zero where a slot has no leg) and result (0, or
    FEES_EXCEED_AMOUNT when the fees and taxes leave nothing for the credit account, in which
    case the item's legs are all zero). Raises ValueError on inconsistent shapes or tables.
    """
    cdef Py_ssize_t n = amount.shape[0]
    cdef Py_ssize_t i
    cdef Py_ssize_t failed = 0
    if schedule.shape[0] != n or legs.shape[0] != n or result.shape[0] != n:
        raise ValueError("amount, schedule, legs and result must have one length")
    if legs.shape[1] != LEGS_MAX:
        raise ValueError(f"legs must have {LEGS_MAX} columns")
    _check_tables(schedules, fees, tiers, split_weights)
    for i in range(n):
        if not 0 <= schedule[i] < schedules.shape[0]:
            raise ValueError(f"schedule[{i}] is out of range")
        if amount[i] > AMOUNT_MAX:
            raise ValueError(f"amount[{i}] exceeds 2^63-1")
    with nogil:
        for i in range(n):
            result[i] = _expand_one(amount[i], schedules[schedule[i]], fees, tiers,
                                    split_weights, legs[i])
            if result[i] != 0:
                failed += 1
    return failed


def allocate_refunds(
    const uint64_t[:, ::1] original,
    const uint64_t[:, ::1] refunded,
    const uint64_t[:] amount,
    uint64_t[:, ::1] out,
    uint32_t[:] result,
):
    """Spread each refund amount[i] over the legs original[i, :] in proportion to them.

    refunded[i, k] is what earlier refunds already reversed of leg k. Each leg first gets
    floor(amount * leg / total) and the units left over go, one each, to the legs with the
    largest remainders (lowest slot first on ties); a leg is then capped at what is left of it
    and any excess goes to the other legs with room, lowest slot first. So each refund's legs
    sum exactly to amount[i] and no leg is ever reversed beyond its original amount; a refund
    of everything that is left reverses exactly what is left of every leg.

    Modified in place: out (n x LEGS_MAX) and result (0, or EXCEEDS_REFUNDABLE_AMOUNT when
    amount[i] exceeds what is left, and then out[i, :] is zero). Returns how many failed.
    Raises ValueError on inconsistent shapes or if refunded exceeds original anywhere.
    """
    cdef Py_ssize_t n = amount.shape[0]
    cdef Py_ssize_t i, k
    cdef Py_ssize_t failed = 0
    if refunded.shape[0] != n or original.shape[0] != n or out.shape[0] != n \
            or result.shape[0] != n:
        raise ValueError("original, refunded, amount, out and result must have one length")
    if original.shape[1] != LEGS_MAX or refunded.shape[1] != LEGS_MAX or out.shape[1] != LEGS_MAX:
        raise ValueError(f"original, refunded and out must have {LEGS_MAX} columns")
    for i in range(n):
        if amount[i] > AMOUNT_MAX:
            raise ValueError(f"amount[{i}] exceeds 2^63-1")
        for k in range(LEGS_MAX):
            if refunded[i, k] > original[i, k] or original[i, k] > AMOUNT_MAX:
                raise ValueError(f"refunded[{i}, {k}] exceeds original[{i}, {k}]")
    with nogil:
        for i in range(n):
            result[i] = _refund_one(original[i], refunded[i], amount[i], out[i])
            if result[i] != 0:
                failed += 1
    return failed


def _check_tables(const uint64_t[:, ::1] schedules, const uint64_t[:, ::1] fees,
                  const uint64_t[:, ::1] tiers, const uint64_t[:] split_weights):
    cdef Py_ssize_t s, f, t
    cdef const uint64_t[:] row
    if schedules.shape[1] != SCHEDULE_COLUMNS or fees.shape[1] != FEE_COLUMNS \
            or tiers.shape[1] != TIER_COLUMNS:
        raise ValueError("schedule, fee or tier table has the wrong number of columns")
    for s in range(schedules.shape[0]):
        row = schedules[s]
        if not ROUND_HALF_EVEN <= row[S_ROUNDING] <= ROUND_UP:
            raise ValueError(f"schedules[{s}]: unknown rounding mode")
        if row[S_FEE_COUNT] > FEES_MAX or row[S_FEE_START] + row[S_FEE_COUNT] > <uint64_t>fees.shape[0]:
            raise ValueError(f"schedules[{s}]: fees out of range")
        if row[S_SPLIT_COUNT] > SPLITS_MAX \
                or row[S_SPLIT_START] + row[S_SPLIT_COUNT] > <uint64_t>split_weights.shape[0]:
            raise ValueError(f"schedules[{s}]: splits out of range")
        if row[S_RESERVE_PPM] > PPM or row[S_NET_WEIGHT] > 0xFFFFFFFF:
            raise ValueError(f"schedules[{s}]: reserve_ppm or net_weight out of range")
        if row[S_SPLIT_COUNT] and row[S_NET_WEIGHT] == 0:
            raise ValueError(f"schedules[{s}]: net_weight must be at least 1 with splits")
    for f in range(fees.shape[0]):
        row = fees[f]
        if row[F_RATE_PPM] > PPM or row[F_COMMISSION_PPM] > PPM or row[F_TAX_PPM] > PPM:
            raise ValueError(f"fees[{f}]: a rate exceeds 10^6 ppm")
        if row[F_FIXED] > AMOUNT_MAX or row[F_MINIMUM] > AMOUNT_MAX or row[F_MAXIMUM] > AMOUNT_MAX:
            raise ValueError(f"fees[{f}]: an amount exceeds 2^63-1")
        if row[F_MAXIMUM] and row[F_MINIMUM] > row[F_MAXIMUM]:
            raise ValueError(f"fees[{f}]: minimum exceeds maximum")
        if row[F_TIER_COUNT] > TIERS_MAX \
                or row[F_TIER_START] + row[F_TIER_COUNT] > <uint64_t>tiers.shape[0]:
            raise ValueError(f"fees[{f}]: tiers out of range")
    for t in range(tiers.shape[0]):
        if tiers[t, T_RATE_PPM] > PPM or tiers[t, T_FIXED] > AMOUNT_MAX:
            raise ValueError(f"tiers[{t}]: rate or fixed amount out of range")
    for t in range(split_weights.shape[0]):
        if split_weights[t] > 0xFFFFFFFF:
            raise ValueError(f"split_weights[{t}] exceeds 2^32-1")


cdef inline u128 _round_div(u128 numerator, u128 denominator, uint64_t mode) noexcept nogil:
    cdef u128 q = numerator // denominator
    cdef u128 r = numerator % denominator
    if mode == ROUND_DOWN or r == 0:
        return q
    if mode == ROUND_UP:
        return q + 1
    if 2 * r > denominator:
        return q + 1
    if 2 * r == denominator and (mode == ROUND_HALF_UP or q & 1):
        return q + 1
    return q


cdef uint32_t _expand_one(
    uint64_t amount, const uint64_t[:] sched, const uint64_t[:, ::1] fees,
    const uint64_t[:, ::1] tiers, const uint64_t[:] split_weights, uint64_t[:] legs,
) noexcept nogil:
    cdef uint64_t mode = sched[S_ROUNDING]
    cdef Py_ssize_t j, t, k, p
    cdef Py_ssize_t fee_count = <Py_ssize_t>sched[S_FEE_COUNT]
    cdef Py_ssize_t split_count = <Py_ssize_t>sched[S_SPLIT_COUNT]
    cdef uint64_t rate, fixed
    cdef u128 fee, commission, tax
    # amount <= 2^63-1 and each fee and tax is checked against it, so this cannot wrap.
    cdef u128 deductions = 0
    cdef u128 net, weight_sum, share, given
    cdef u128 remainders[SPLITS_MAX + 1]
    cdef bint chosen[SPLITS_MAX + 1]
    cdef Py_ssize_t best
    cdef const uint64_t[:] row
    for k in range(LEGS_MAX):
        legs[k] = 0
    for j in range(fee_count):
        row = fees[sched[S_FEE_START] + j]
        rate = row[F_RATE_PPM]
        fixed = row[F_FIXED]
        for t in range(<Py_ssize_t>row[F_TIER_COUNT]):
            if amount >= tiers[row[F_TIER_START] + t, T_AMOUNT_MIN]:
                rate = tiers[row[F_TIER_START] + t, T_RATE_PPM]
                fixed = tiers[row[F_TIER_START] + t, T_FIXED]
        fee = _round_div(<u128>amount * rate, PPM, mode) + fixed
        if fee < row[F_MINIMUM]:
            fee = row[F_MINIMUM]
        if row[F_MAXIMUM] and fee > row[F_MAXIMUM]:
            fee = row[F_MAXIMUM]
        if fee >= amount:
            return _fail(legs, TRANSFER_RESULT_FEES_EXCEED_AMOUNT)
        commission = _round_div(fee * row[F_COMMISSION_PPM], PPM, mode)
        tax = _round_div(fee * row[F_TAX_PPM], PPM, mode)
        deductions += fee + tax
        if deductions >= amount:
            return _fail(legs, TRANSFER_RESULT_FEES_EXCEED_AMOUNT)
        legs[SLOT_FEE + 3 * j] = <uint64_t>(fee - commission)
        legs[SLOT_FEE + 3 * j + 1] = <uint64_t>commission
        legs[SLOT_FEE + 3 * j + 2] = <uint64_t>tax
    net = amount - deductions
    if split_count == 0:
        legs[SLOT_NET] = <uint64_t>net
    else:
        # Largest remainder: floors first, then one unit each to the largest remainders.
        weight_sum = sched[S_NET_WEIGHT]
        for p in range(split_count):
            weight_sum += split_weights[sched[S_SPLIT_START] + p]
        given = 0
        for p in range(split_count + 1):
            share = net * (sched[S_NET_WEIGHT] if p == 0 else split_weights[sched[S_SPLIT_START] + p - 1])
            legs[SLOT_NET if p == 0 else SLOT_SPLIT + p - 1] = <uint64_t>(share // weight_sum)
            remainders[p] = share % weight_sum
            chosen[p] = False
            given += share // weight_sum
        while given < net:
            best = -1
            for p in range(split_count + 1):
                if not chosen[p] and (best == -1 or remainders[p] > remainders[best]):
                    best = p
            chosen[best] = True
            legs[SLOT_NET if best == 0 else SLOT_SPLIT + best - 1] += 1
            given += 1
    if legs[SLOT_NET] == 0:
        return _fail(legs, TRANSFER_RESULT_FEES_EXCEED_AMOUNT)
    legs[SLOT_RESERVE] = <uint64_t>_round_div(<u128>legs[SLOT_NET] * sched[S_RESERVE_PPM], PPM, mode)
    return 0


cdef uint32_t _fail(uint64_t[:] legs, uint32_t code) noexcept nogil:
    cdef Py_ssize_t k
    for k in range(LEGS_MAX):
        legs[k] = 0
    return code


cdef uint32_t _refund_one(const uint64_t[:] original, const uint64_t[:] refunded,
                          uint64_t amount, uint64_t[:] out) noexcept nogil:
    cdef Py_ssize_t k, best
    cdef u128 total = 0
    cdef u128 left = 0
    cdef u128 given = 0
    cdef u128 excess = 0
    cdef u128 share, room
    cdef u128 remainders[LEGS_MAX]
    cdef bint chosen[LEGS_MAX]
    for k in range(LEGS_MAX):
        out[k] = 0
        total += original[k]
        left += original[k] - refunded[k]
    if amount > left:
        return TRANSFER_RESULT_EXCEEDS_REFUNDABLE_AMOUNT
    if amount == 0:
        return 0
    for k in range(LEGS_MAX):
        share = <u128>amount * original[k]
        out[k] = <uint64_t>(share // total)
        remainders[k] = share % total
        chosen[k] = original[k] == 0
        given += share // total
    while given < amount:
        best = -1
        for k in range(LEGS_MAX):
            if not chosen[k] and (best == -1 or remainders[k] > remainders[best]):
                best = k
        chosen[best] = True
        out[best] += 1
        given += 1
    for k in range(LEGS_MAX):
        if out[k] > original[k] - refunded[k]:
            excess += out[k] - (original[k] - refunded[k])
            out[k] = original[k] - refunded[k]
    for k in range(LEGS_MAX):
        if excess == 0:
            break
        room = original[k] - refunded[k] - out[k]
        if room > excess:
            room = excess
        out[k] += <uint64_t>room
        excess -= room
    return 0
