"""Fee schedules: the validated configuration, its slot layout, and the kernel's tables.

A schedule version is immutable once stored: a transfer records the version it used, and a new
version never changes what an older transfer's legs were. Rates are integers in parts per
million (1 basis point = 100 ppm); amounts are integers in minor units.
"""
from __future__ import annotations

import dataclasses
import enum

import numpy as np

from engine import limits
from engine.ids import ZERO_ID
from engine.kernels import _fee

LAYOUT = _fee.layout()
SPLITS_MAX: int = LAYOUT["SPLITS_MAX"]
FEES_MAX: int = LAYOUT["FEES_MAX"]
TIERS_MAX: int = LAYOUT["TIERS_MAX"]
SLOT_NET: int = LAYOUT["SLOT_NET"]
SLOT_SPLIT: int = LAYOUT["SLOT_SPLIT"]
SLOT_FEE: int = LAYOUT["SLOT_FEE"]
SLOT_RESERVE: int = LAYOUT["SLOT_RESERVE"]
LEGS_MAX: int = LAYOUT["LEGS_MAX"]
PPM: int = LAYOUT["PPM"]
WEIGHT_MAX = 2**32 - 1


class Rounding(enum.IntEnum):
    """enum FeeRounding of the proto; UNSPECIFIED is stored as HALF_EVEN."""

    HALF_EVEN = 1
    HALF_UP = 2
    DOWN = 3
    UP = 4


class LegKind(enum.IntEnum):
    """enum LegKind of the proto."""

    NET = 1
    SPLIT = 2
    FEE = 3
    COMMISSION = 4
    TAX = 5
    RESERVE = 6


def slot_kind(slot: int) -> LegKind:
    if slot == SLOT_NET:
        return LegKind.NET
    if slot < SLOT_FEE:
        return LegKind.SPLIT
    if slot < SLOT_RESERVE:
        return (LegKind.FEE, LegKind.COMMISSION, LegKind.TAX)[(slot - SLOT_FEE) % 3]
    return LegKind.RESERVE


class InvalidSchedule(ValueError):
    """A schedule breaks a rule; `field` names the offending field (e.g. fees[1].rate_ppm)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclasses.dataclass(frozen=True)
class Tier:
    amount_min: int
    rate_ppm: int
    fixed_amount: int = 0


@dataclasses.dataclass(frozen=True)
class Fee:
    account_id: bytes
    rate_ppm: int = 0
    fixed_amount: int = 0
    minimum_amount: int = 0
    maximum_amount: int = 0  # 0: none
    tiers: tuple[Tier, ...] = ()
    commission_account_id: bytes = ZERO_ID
    commission_ppm: int = 0
    tax_account_id: bytes = ZERO_ID
    tax_ppm: int = 0


@dataclasses.dataclass(frozen=True)
class Split:
    account_id: bytes
    weight: int


@dataclasses.dataclass(frozen=True)
class FeeSchedule:
    """One version of a fee schedule."""

    id: bytes
    fees: tuple[Fee, ...] = ()
    splits: tuple[Split, ...] = ()
    net_weight: int = 0
    reserve_ppm: int = 0
    reserve_account_id: bytes = ZERO_ID
    reserve_timeout_seconds: int = 0
    rounding: Rounding = Rounding.HALF_EVEN
    version: int = 0  # assigned when stored
    timestamp: int = 0  # assigned when stored

    def slot_credit_accounts(self) -> dict[int, bytes]:
        """The account each slot credits, except SLOT_NET (the transfer's credit account)."""
        accounts = {SLOT_SPLIT + p: s.account_id for p, s in enumerate(self.splits)}
        for j, fee in enumerate(self.fees):
            accounts[SLOT_FEE + 3 * j] = fee.account_id
            accounts[SLOT_FEE + 3 * j + 1] = fee.commission_account_id
            accounts[SLOT_FEE + 3 * j + 2] = fee.tax_account_id
        accounts[SLOT_RESERVE] = self.reserve_account_id
        return accounts

    def to_json(self) -> dict:
        """The stored form: ids as hex strings, everything else as integers."""
        def convert(value):
            if isinstance(value, bytes):
                return value.hex()
            if isinstance(value, tuple):
                return [convert(v) for v in value]
            if dataclasses.is_dataclass(value):
                return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)
                        if f.name not in ("id", "version", "timestamp")}
            return int(value)

        return convert(self)

    @classmethod
    def from_json(cls, schedule_id: bytes, version: int, timestamp: int, data: dict) -> FeeSchedule:
        fees = tuple(
            Fee(**{**f, "account_id": bytes.fromhex(f["account_id"]),
                   "commission_account_id": bytes.fromhex(f["commission_account_id"]),
                   "tax_account_id": bytes.fromhex(f["tax_account_id"]),
                   "tiers": tuple(Tier(**t) for t in f["tiers"])})
            for f in data["fees"])
        splits = tuple(Split(bytes.fromhex(s["account_id"]), s["weight"]) for s in data["splits"])
        return cls(id=schedule_id, fees=fees, splits=splits, net_weight=data["net_weight"],
                   reserve_ppm=data["reserve_ppm"],
                   reserve_account_id=bytes.fromhex(data["reserve_account_id"]),
                   reserve_timeout_seconds=data["reserve_timeout_seconds"],
                   rounding=Rounding(data["rounding"]), version=version, timestamp=timestamp)


def validate(schedule: FeeSchedule) -> None:
    """Raise InvalidSchedule naming the first field that breaks a rule."""
    def require(ok: bool, field: str, message: str) -> None:
        if not ok:
            raise InvalidSchedule(field, message)

    def account(value: bytes, field: str) -> None:
        require(len(value) == limits.ID_BYTES and value != ZERO_ID, field, "must be a non-zero 16-byte id")

    def amount(value: int, field: str) -> None:
        require(0 <= value <= limits.BALANCE_MAX, field, "must be within 0..2^63-1")

    def ppm(value: int, field: str) -> None:
        require(0 <= value <= PPM, field, f"must be within 0..{PPM} (parts per million)")

    account(schedule.id, "id")
    require(len(schedule.fees) <= FEES_MAX, "fees", f"at most {FEES_MAX}")
    require(len(schedule.splits) <= SPLITS_MAX, "splits", f"at most {SPLITS_MAX}")
    for j, fee in enumerate(schedule.fees):
        at = f"fees[{j}]"
        account(fee.account_id, f"{at}.account_id")
        ppm(fee.rate_ppm, f"{at}.rate_ppm")
        for name in ("fixed_amount", "minimum_amount", "maximum_amount"):
            amount(getattr(fee, name), f"{at}.{name}")
        require(not fee.maximum_amount or fee.minimum_amount <= fee.maximum_amount,
                f"{at}.minimum_amount", "must not exceed maximum_amount")
        require(len(fee.tiers) <= TIERS_MAX, f"{at}.tiers", f"at most {TIERS_MAX}")
        for t, tier in enumerate(fee.tiers):
            amount(tier.amount_min, f"{at}.tiers[{t}].amount_min")
            ppm(tier.rate_ppm, f"{at}.tiers[{t}].rate_ppm")
            amount(tier.fixed_amount, f"{at}.tiers[{t}].fixed_amount")
            require(t == 0 or fee.tiers[t - 1].amount_min < tier.amount_min,
                    f"{at}.tiers[{t}].amount_min", "tiers must be in increasing amount_min order")
        ppm(fee.commission_ppm, f"{at}.commission_ppm")
        ppm(fee.tax_ppm, f"{at}.tax_ppm")
        if fee.commission_ppm:
            account(fee.commission_account_id, f"{at}.commission_account_id")
        if fee.tax_ppm:
            account(fee.tax_account_id, f"{at}.tax_account_id")
    for p, split in enumerate(schedule.splits):
        account(split.account_id, f"splits[{p}].account_id")
        require(1 <= split.weight <= WEIGHT_MAX, f"splits[{p}].weight", "must be within 1..2^32-1")
    if schedule.splits:
        require(1 <= schedule.net_weight <= WEIGHT_MAX, "net_weight",
                "must be within 1..2^32-1 when splits are given")
    ppm(schedule.reserve_ppm, "reserve_ppm")
    if schedule.reserve_ppm:
        account(schedule.reserve_account_id, "reserve_account_id")
        require(schedule.reserve_timeout_seconds >= 1, "reserve_timeout_seconds",
                "must be at least 1 when reserve_ppm is set")


@dataclasses.dataclass
class Tables:
    """Schedules flattened for ext/fee.pyx: row s of `schedules` is the s-th schedule given."""

    schedules: np.ndarray
    fees: np.ndarray
    tiers: np.ndarray
    split_weights: np.ndarray


def tables(schedules: list[FeeSchedule]) -> Tables:
    sched_rows, fee_rows, tier_rows, weights = [], [], [], []
    for s in schedules:
        sched_rows.append([int(s.rounding), len(fee_rows), len(s.fees), len(weights),
                           len(s.splits), s.net_weight, s.reserve_ppm])
        for fee in s.fees:
            fee_rows.append([fee.rate_ppm, fee.fixed_amount, fee.minimum_amount,
                             fee.maximum_amount, fee.commission_ppm, fee.tax_ppm,
                             len(tier_rows), len(fee.tiers)])
            tier_rows.extend([t.amount_min, t.rate_ppm, t.fixed_amount] for t in fee.tiers)
        weights.extend(split.weight for split in s.splits)
    return Tables(
        schedules=np.array(sched_rows, np.uint64).reshape(-1, LAYOUT["SCHEDULE_COLUMNS"]),
        fees=np.array(fee_rows, np.uint64).reshape(-1, LAYOUT["FEE_COLUMNS"]),
        tiers=np.array(tier_rows, np.uint64).reshape(-1, LAYOUT["TIER_COLUMNS"]),
        split_weights=np.array(weights, np.uint64),
    )
