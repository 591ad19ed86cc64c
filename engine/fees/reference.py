"""Plain-Python oracles of ext/fee.pyx, with exact rational arithmetic (fractions.Fraction).

Same signatures and semantics as engine.kernels._fee.expand_fees and allocate_refunds; every
value is a Fraction until the documented rounding makes it an integer, so the kernel's 128-bit
integer arithmetic is checked against arithmetic that cannot overflow or lose a unit.
tests/property/test_fee_kernel.py compares the two on random batches.
"""
from collections.abc import MutableSequence, Sequence
from fractions import Fraction
from math import floor

from engine.fees.schedule import LAYOUT, PPM, Rounding
from engine.kernels import constants as c

LEGS_MAX = LAYOUT["LEGS_MAX"]
SLOT_NET, SLOT_SPLIT = LAYOUT["SLOT_NET"], LAYOUT["SLOT_SPLIT"]
SLOT_FEE, SLOT_RESERVE = LAYOUT["SLOT_FEE"], LAYOUT["SLOT_RESERVE"]


def round_fraction(value: Fraction, mode: int) -> int:
    """A non-negative rational rounded to an integer by a FeeRounding mode."""
    down = floor(value)
    rest = value - down
    if rest == 0 or mode == Rounding.DOWN:
        return down
    if mode == Rounding.UP:
        return down + 1
    if rest > Fraction(1, 2):
        return down + 1
    if rest == Fraction(1, 2) and (mode == Rounding.HALF_UP or down % 2 == 1):
        return down + 1
    return down


def largest_remainder(total: int, weights: Sequence[int]) -> list[int]:
    """Shares of total proportional to weights, summing exactly to total: floors first, then
    one unit each to the largest remainders, the lowest index first on ties."""
    weight_sum = sum(weights)
    exact = [Fraction(total * w, weight_sum) for w in weights]
    shares = [floor(e) for e in exact]
    order = sorted(range(len(weights)), key=lambda k: (-(exact[k] - shares[k]), k))
    for k in order[:total - sum(shares)]:
        shares[k] += 1
    return shares


def expand_one(amount: int, schedule: Sequence[int], fees, tiers, split_weights) -> tuple[list[int], int]:
    """(legs, result) of one amount under one schedule row of the tables."""
    mode, fee_start, fee_count, split_start, split_count, net_weight, reserve_ppm = \
        (int(v) for v in schedule)
    legs = [0] * LEGS_MAX
    failed = [0] * LEGS_MAX, c.TRANSFER_FEES_EXCEED_AMOUNT
    deductions = 0
    for j in range(fee_count):
        rate, fixed, minimum, maximum, commission_ppm, tax_ppm, tier_start, tier_count = \
            (int(v) for v in fees[fee_start + j])
        for t in range(tier_count):
            amount_min, tier_rate, tier_fixed = (int(v) for v in tiers[tier_start + t])
            if amount >= amount_min:
                rate, fixed = tier_rate, tier_fixed
        fee = round_fraction(Fraction(amount * rate, PPM), mode) + fixed
        fee = max(fee, minimum)
        if maximum:
            fee = min(fee, maximum)
        if fee >= amount:
            return failed
        commission = round_fraction(Fraction(fee * commission_ppm, PPM), mode)
        tax = round_fraction(Fraction(fee * tax_ppm, PPM), mode)
        deductions += fee + tax
        if deductions >= amount:
            return failed
        legs[SLOT_FEE + 3 * j: SLOT_FEE + 3 * j + 3] = [fee - commission, commission, tax]
    net = amount - deductions
    weights = [net_weight] + [int(w) for w in split_weights[split_start:split_start + split_count]]
    shares = largest_remainder(net, weights) if split_count else [net]
    legs[SLOT_NET] = shares[0]
    legs[SLOT_SPLIT:SLOT_SPLIT + split_count] = shares[1:]
    if legs[SLOT_NET] == 0:
        return failed
    legs[SLOT_RESERVE] = round_fraction(Fraction(legs[SLOT_NET] * reserve_ppm, PPM), mode)
    return legs, 0


def expand_fees_reference(amount, schedule, schedules, fees, tiers, split_weights,
                          legs: MutableSequence, result: MutableSequence) -> int:
    failed = 0
    for i in range(len(amount)):
        row, code = expand_one(int(amount[i]), schedules[int(schedule[i])], fees, tiers,
                               split_weights)
        for k in range(LEGS_MAX):
            legs[i][k] = row[k]
        result[i] = code
        failed += code != 0
    return failed


def refund_one(original: Sequence[int], refunded: Sequence[int], amount: int) -> tuple[list[int], int]:
    left = [int(o) - int(r) for o, r in zip(original, refunded)]
    if amount > sum(left):
        return [0] * LEGS_MAX, c.TRANSFER_EXCEEDS_REFUNDABLE_AMOUNT
    if amount == 0:
        return [0] * LEGS_MAX, 0
    out = largest_remainder(amount, [int(o) for o in original])
    excess = sum(max(o - room, 0) for o, room in zip(out, left))
    out = [min(o, room) for o, room in zip(out, left)]
    for k in range(LEGS_MAX):
        extra = min(left[k] - out[k], excess)
        out[k] += extra
        excess -= extra
    return out, 0


def allocate_refunds_reference(original, refunded, amount, out: MutableSequence,
                               result: MutableSequence) -> int:
    failed = 0
    for i in range(len(amount)):
        row, code = refund_one(original[i], refunded[i], int(amount[i]))
        for k in range(LEGS_MAX):
            out[i][k] = row[k]
        result[i] = code
        failed += code != 0
    return failed
