"""Fee messages: FeeSchedule protos to and from engine.fees.schedule, legs, and the Transfer
fields 12-14 that name a schedule or the transfer a refund reverses."""
from __future__ import annotations

import numpy as np

from engine import limits
from engine.fees.expand import Leg
from engine.fees.schedule import (Fee, FeeSchedule, InvalidSchedule, Rounding, Split, Tier,
                                  validate)
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.ids import ZERO_ID
from engine.server.errors import InvalidRequest, Violation

# A fee transfer or refund may be LINKED into a caller's chain, and nothing else: its legs
# decide which of them are pending.
FEE_TRANSFER_FLAGS = pb.TRANSFER_FLAGS_LINKED


def _id(value: bytes) -> bytes:
    return ZERO_ID if not value else value


def decode_schedule(message: pb.FeeSchedule) -> FeeSchedule:
    """A validated schedule; raises InvalidRequest naming the first bad field."""
    if message.version or message.timestamp:
        field = "version" if message.version else "timestamp"
        raise InvalidRequest([Violation(f"schedule.{field}", "is output only; leave it 0")])
    if message.rounding and message.rounding not in {int(r) for r in Rounding}:
        raise InvalidRequest([Violation("schedule.rounding", f"unknown FeeRounding {message.rounding}")])
    schedule = FeeSchedule(
        id=_id(message.id),
        fees=tuple(Fee(
            account_id=_id(f.account_id), rate_ppm=f.rate_ppm, fixed_amount=f.fixed_amount,
            minimum_amount=f.minimum_amount, maximum_amount=f.maximum_amount,
            tiers=tuple(Tier(t.amount_min, t.rate_ppm, t.fixed_amount) for t in f.tiers),
            commission_account_id=_id(f.commission_account_id), commission_ppm=f.commission_ppm,
            tax_account_id=_id(f.tax_account_id), tax_ppm=f.tax_ppm,
        ) for f in message.fees),
        splits=tuple(Split(_id(s.account_id), s.weight) for s in message.splits),
        net_weight=message.net_weight, reserve_ppm=message.reserve_ppm,
        reserve_account_id=_id(message.reserve_account_id),
        reserve_timeout_seconds=message.reserve_timeout_seconds,
        rounding=Rounding(message.rounding or Rounding.HALF_EVEN),
    )
    try:
        validate(schedule)
    except InvalidSchedule as error:
        raise InvalidRequest([Violation(f"schedule.{error.field}", error.message)]) from error
    return schedule


def schedule_message(schedule: FeeSchedule) -> pb.FeeSchedule:
    def account(value: bytes) -> bytes:
        return b"" if value == ZERO_ID else value

    return pb.FeeSchedule(
        id=schedule.id, version=schedule.version,
        fees=[pb.Fee(
            account_id=f.account_id, rate_ppm=f.rate_ppm, fixed_amount=f.fixed_amount,
            minimum_amount=f.minimum_amount, maximum_amount=f.maximum_amount,
            tiers=[pb.FeeTier(amount_min=t.amount_min, rate_ppm=t.rate_ppm,
                              fixed_amount=t.fixed_amount) for t in f.tiers],
            commission_account_id=account(f.commission_account_id),
            commission_ppm=f.commission_ppm, tax_account_id=account(f.tax_account_id),
            tax_ppm=f.tax_ppm,
        ) for f in schedule.fees],
        splits=[pb.SplitParty(account_id=s.account_id, weight=s.weight) for s in schedule.splits],
        net_weight=schedule.net_weight, reserve_ppm=schedule.reserve_ppm,
        reserve_account_id=account(schedule.reserve_account_id),
        reserve_timeout_seconds=schedule.reserve_timeout_seconds,
        rounding=int(schedule.rounding), timestamp=schedule.timestamp,
    )


def leg_message(leg: Leg) -> pb.Leg:
    return pb.Leg(id=leg.id, debit_account_id=leg.debit_account_id,
                  credit_account_id=leg.credit_account_id, amount=leg.amount, kind=leg.kind,
                  slot=leg.slot, flags=leg.flags, timeout_seconds=leg.timeout_seconds)


def decode_fee_fields(transfers, columns, violations: list[Violation]) -> None:
    """Fill the fee columns of `columns` from Transfer fields 12-14 and check them."""
    schedule_ids, versions, refund_of = [], [], []
    for index, t in enumerate(transfers):
        for field, value, out in (("fee_schedule_id", t.fee_schedule_id, schedule_ids),
                                  ("refund_of", t.refund_of, refund_of)):
            if value and len(value) != limits.ID_BYTES:
                violations.append(Violation(f"transfers[{index}].{field}",
                                            f"must be {limits.ID_BYTES} bytes (or empty), got {len(value)}"))
                value = b""
            out.append(value or ZERO_ID)
        versions.append(t.fee_schedule_version)
        if not (t.fee_schedule_id or t.refund_of):
            if t.fee_schedule_version:
                violations.append(Violation(f"transfers[{index}].fee_schedule_version",
                                            "set only with fee_schedule_id"))
            continue
        if t.fee_schedule_id and t.refund_of:
            violations.append(Violation(f"transfers[{index}].refund_of",
                                        "a refund uses its original's schedule: leave fee_schedule_id empty"))
        if t.refund_of and t.fee_schedule_version:
            violations.append(Violation(f"transfers[{index}].fee_schedule_version",
                                        "a refund uses its original's schedule version: leave it 0"))
        if t.flags & ~FEE_TRANSFER_FLAGS:
            violations.append(Violation(f"transfers[{index}].flags",
                                        "a fee transfer or refund may only be LINKED"))
        if t.pending_id or t.timeout_seconds:
            field = "pending_id" if t.pending_id else "timeout_seconds"
            violations.append(Violation(f"transfers[{index}].{field}",
                                        "must be empty for a fee transfer or refund"))
    columns.fee_schedule_ids = schedule_ids
    columns.fee_schedule_versions = np.array(versions, np.uint32)
    columns.refund_of = refund_of
