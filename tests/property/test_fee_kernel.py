"""The fee kernel (ext/fee.pyx) against its Fraction oracle, and the properties of its legs."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from engine.fees import reference
from engine.fees.schedule import (FEES_MAX, LEGS_MAX, PPM, SLOT_FEE, SLOT_NET, SLOT_RESERVE,
                                  SLOT_SPLIT, SPLITS_MAX, TIERS_MAX, Fee, FeeSchedule, Rounding,
                                  Split, Tier, tables, validate)
from engine.kernels import _fee
from engine.kernels import constants as c

ACCOUNT = bytes(15) + b"\x01"
AMOUNT_MAX = 2**63 - 1
amounts = st.one_of(st.integers(1, 10**7), st.integers(1, AMOUNT_MAX))
ppms = st.one_of(st.integers(0, PPM), st.sampled_from([0, 1, 100, 2_900, 29_000, 500_000, PPM]))
fixed = st.one_of(st.integers(0, 1_000), st.integers(0, AMOUNT_MAX))


@st.composite
def fees(draw):
    tier_mins = sorted(set(draw(st.lists(st.integers(0, 10**8), max_size=TIERS_MAX))))
    minimum = draw(st.one_of(st.just(0), st.integers(0, 10**6)))
    maximum = draw(st.one_of(st.just(0), st.integers(minimum, max(minimum, 10**9))))
    return Fee(
        account_id=ACCOUNT, rate_ppm=draw(ppms), fixed_amount=draw(fixed),
        minimum_amount=minimum, maximum_amount=maximum,
        tiers=tuple(Tier(m, draw(ppms), draw(st.integers(0, 1_000))) for m in tier_mins),
        commission_account_id=ACCOUNT, commission_ppm=draw(ppms),
        tax_account_id=ACCOUNT, tax_ppm=draw(ppms),
    )


@st.composite
def schedules(draw):
    splits = draw(st.lists(st.integers(1, 2**32 - 1) | st.integers(1, 10), max_size=SPLITS_MAX))
    schedule = FeeSchedule(
        id=ACCOUNT, fees=tuple(draw(st.lists(fees(), max_size=FEES_MAX))),
        splits=tuple(Split(ACCOUNT, w) for w in splits),
        net_weight=draw(st.integers(1, 2**32 - 1) | st.integers(1, 10)) if splits else 0,
        reserve_ppm=draw(ppms), reserve_account_id=ACCOUNT, reserve_timeout_seconds=60,
        rounding=draw(st.sampled_from(list(Rounding))),
    )
    validate(schedule)
    return schedule


@st.composite
def batches(draw):
    plans = draw(st.lists(schedules(), min_size=1, max_size=4))
    n = draw(st.integers(0, 30))
    amount = draw(st.lists(amounts, min_size=n, max_size=n))
    which = draw(st.lists(st.integers(0, len(plans) - 1), min_size=n, max_size=n))
    return plans, np.array(amount, np.uint64), np.array(which, np.int32)


def run_kernel(plans, amount, which):
    t = tables(plans)
    legs = np.zeros((len(amount), LEGS_MAX), np.uint64)
    result = np.zeros(len(amount), np.uint32)
    _fee.expand_fees(amount, which, t.schedules, t.fees, t.tiers, t.split_weights, legs, result)
    return legs, result


@settings(max_examples=300, deadline=None)
@given(batches())
def test_kernel_equals_reference(batch) -> None:
    plans, amount, which = batch
    legs, result = run_kernel(plans, amount, which)
    t = tables(plans)
    ref_legs = [[0] * LEGS_MAX for _ in range(len(amount))]
    ref_result = [0] * len(amount)
    reference.expand_fees_reference(amount, which, t.schedules, t.fees, t.tiers,
                                     t.split_weights, ref_legs, ref_result)
    assert legs.tolist() == ref_legs
    assert result.tolist() == ref_result


@settings(max_examples=300, deadline=None)
@given(batches())
def test_legs_sum_to_gross_and_stay_within_a_unit(batch) -> None:
    plans, amount, which = batch
    legs, result = run_kernel(plans, amount, which)
    for i, gross in enumerate(amount.tolist()):
        row = [int(v) for v in legs[i]]
        if result[i] != 0:
            assert result[i] == c.TRANSFER_FEES_EXCEED_AMOUNT and not any(row)
            continue
        plan = plans[which[i]]
        assert sum(row[:SLOT_RESERVE]) == gross
        assert row[SLOT_NET] > 0
        assert row[SLOT_RESERVE] <= row[SLOT_NET]
        assert abs(row[SLOT_RESERVE] - Fraction(row[SLOT_NET] * plan.reserve_ppm, PPM)) < 1
        for j, fee in enumerate(plan.fees):
            platform, commission, tax = row[SLOT_FEE + 3 * j: SLOT_FEE + 3 * j + 3]
            charged = platform + commission
            rate, fixed_amount = fee.rate_ppm, fee.fixed_amount
            for tier in fee.tiers:
                if gross >= tier.amount_min:
                    rate, fixed_amount = tier.rate_ppm, tier.fixed_amount
            exact = Fraction(gross * rate, PPM) + fixed_amount
            assert charged >= fee.minimum_amount
            if fee.maximum_amount:
                assert charged <= fee.maximum_amount
            if fee.minimum_amount < exact and (not fee.maximum_amount or exact < fee.maximum_amount):
                assert abs(charged - exact) < 1
            assert abs(commission - Fraction(charged * fee.commission_ppm, PPM)) < 1
            assert abs(tax - Fraction(charged * fee.tax_ppm, PPM)) < 1
        shares = [row[SLOT_NET], *row[SLOT_SPLIT:SLOT_SPLIT + len(plan.splits)]]
        weights = [plan.net_weight, *(s.weight for s in plan.splits)] if plan.splits else [1]
        net = sum(shares)
        for share, weight in zip(shares, weights):
            assert abs(share - Fraction(net * weight, sum(weights))) < 1


@st.composite
def refund_histories(draw):
    legs = draw(st.lists(st.integers(0, 10**6) | st.integers(0, 2**40), min_size=LEGS_MAX,
                         max_size=LEGS_MAX).filter(lambda row: sum(row) > 0))
    total = sum(legs)
    refunds = draw(st.lists(st.integers(1, max(1, total // 2)) | st.integers(1, total + 5),
                            min_size=1, max_size=8))
    return legs, refunds


@settings(max_examples=300, deadline=None)
@given(refund_histories())
def test_refunds_never_exceed_the_original(history) -> None:
    legs, refunds = history
    original = np.array([legs], np.uint64)
    refunded = np.zeros((1, LEGS_MAX), np.uint64)
    total_refunded = 0
    for amount in refunds:
        out = np.zeros((1, LEGS_MAX), np.uint64)
        result = np.zeros(1, np.uint32)
        _fee.allocate_refunds(original, refunded, np.array([amount], np.uint64), out, result)
        ref_out, ref_result = reference.refund_one(legs, refunded[0].tolist(), amount)
        assert out[0].tolist() == ref_out and result[0] == ref_result
        if total_refunded + amount > sum(legs):
            assert result[0] == c.TRANSFER_EXCEEDS_REFUNDABLE_AMOUNT and not out.any()
            continue
        assert result[0] == 0
        assert int(out.sum()) == amount
        if total_refunded == 0:
            for k in range(LEGS_MAX):
                assert abs(int(out[0, k]) - Fraction(amount * legs[k], sum(legs))) < 1
        refunded += out
        total_refunded += amount
        assert (refunded <= original).all()
        if total_refunded == sum(legs):
            assert refunded.tolist() == original.tolist()


def test_a_three_leg_schedule_by_hand() -> None:
    """100.00 at 2.9 % + 0.30, a 20 % partner commission and 20 % tax on the fee, 10 % reserve."""
    plan = FeeSchedule(
        id=ACCOUNT, fees=(Fee(ACCOUNT, rate_ppm=29_000, fixed_amount=30,
                              commission_account_id=ACCOUNT, commission_ppm=200_000,
                              tax_account_id=ACCOUNT, tax_ppm=200_000),),
        reserve_ppm=100_000, reserve_account_id=ACCOUNT, reserve_timeout_seconds=60)
    legs, result = run_kernel([plan], np.array([10_000], np.uint64), np.zeros(1, np.int32))
    assert result.tolist() == [0]
    row = legs[0].tolist()
    assert (row[SLOT_NET], row[SLOT_FEE], row[SLOT_FEE + 1], row[SLOT_FEE + 2]) == (9_616, 256, 64, 64)
    assert row[SLOT_RESERVE] == 962  # 961.6 rounded half-even


def test_half_even_rounding_of_an_exact_half() -> None:
    for amount, expected in ((50, 0), (150, 2), (250, 2)):  # 1 % of x50 is n.5
        plan = FeeSchedule(id=ACCOUNT, fees=(Fee(ACCOUNT, rate_ppm=10_000),))
        legs, _ = run_kernel([plan], np.array([amount], np.uint64), np.zeros(1, np.int32))
        assert legs[0, SLOT_FEE] == expected


def test_kernel_rejects_inconsistent_tables() -> None:
    plan = FeeSchedule(id=ACCOUNT, fees=(Fee(ACCOUNT, rate_ppm=10_000),))
    t = tables([plan])
    legs = np.zeros((1, LEGS_MAX), np.uint64)
    result = np.zeros(1, np.uint32)
    with pytest.raises(ValueError):
        _fee.expand_fees(np.array([1], np.uint64), np.array([1], np.int32), t.schedules, t.fees,
                         t.tiers, t.split_weights, legs, result)
    t.fees[0, 0] = PPM + 1
    with pytest.raises(ValueError):
        _fee.expand_fees(np.array([1], np.uint64), np.array([0], np.int32), t.schedules, t.fees,
                         t.tiers, t.split_weights, legs, result)
