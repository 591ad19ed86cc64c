"""Typed values of the txengine v1 API: flags, results, accounts, transfers, balances.

Enum members mirror the proto's value names without their prefix (`TRANSFER_RESULT_EXISTS` is
`TransferResult.EXISTS`) and keep the proto's numbers. Ids are `uuid.UUID`; the dataclasses also
accept an int, 16 bytes or a UUID string and convert it. Amounts and balances are ints in the
ledger's minor units.
"""
from __future__ import annotations

import dataclasses
import enum
import uuid
from typing import Generic, TypeVar

from txengine_client.ids import as_id, new_id

BATCH_ITEMS_MAX = 8_190
"""Most accounts, transfers or ids in one request (the v1 contract)."""


class AccountFlags(enum.IntFlag):
    NONE = 0
    LINKED = 1
    DEBITS_MUST_NOT_EXCEED_CREDITS = 2
    CREDITS_MUST_NOT_EXCEED_DEBITS = 4
    HISTORY = 8
    CLOSED = 16


class TransferFlags(enum.IntFlag):
    NONE = 0
    LINKED = 1
    PENDING = 2
    POST_PENDING_TRANSFER = 4
    VOID_PENDING_TRANSFER = 8
    BALANCING_DEBIT = 16
    BALANCING_CREDIT = 32


class AccountFilterFlags(enum.IntFlag):
    NONE = 0
    DEBITS = 1
    CREDITS = 2
    REVERSED = 4


class AccountResult(enum.IntEnum):
    UNSPECIFIED = 0
    OK = 1
    LINKED_EVENT_FAILED = 2
    LINKED_EVENT_CHAIN_OPEN = 3
    TIMESTAMP_MUST_BE_ZERO = 4
    RESERVED_FLAG = 5
    ID_MUST_NOT_BE_ZERO = 6
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 7
    DEBITS_PENDING_MUST_BE_ZERO = 8
    DEBITS_POSTED_MUST_BE_ZERO = 9
    CREDITS_PENDING_MUST_BE_ZERO = 10
    CREDITS_POSTED_MUST_BE_ZERO = 11
    LEDGER_MUST_NOT_BE_ZERO = 12
    CODE_MUST_NOT_BE_ZERO = 13
    EXISTS_WITH_DIFFERENT_FLAGS = 14
    EXISTS_WITH_DIFFERENT_USER_DATA = 15
    EXISTS_WITH_DIFFERENT_LEDGER = 16
    EXISTS_WITH_DIFFERENT_CODE = 17
    EXISTS = 18


class TransferResult(enum.IntEnum):
    UNSPECIFIED = 0
    OK = 1
    LINKED_EVENT_FAILED = 2
    LINKED_EVENT_CHAIN_OPEN = 3
    TIMESTAMP_MUST_BE_ZERO = 4
    RESERVED_FLAG = 5
    ID_MUST_NOT_BE_ZERO = 6
    DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 7
    CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO = 8
    ACCOUNTS_MUST_BE_DIFFERENT = 9
    PENDING_ID_MUST_BE_ZERO = 10
    PENDING_ID_MUST_NOT_BE_ZERO = 11
    PENDING_ID_MUST_BE_DIFFERENT = 12
    TIMEOUT_RESERVED_FOR_PENDING_TRANSFER = 13
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 14
    LEDGER_MUST_NOT_BE_ZERO = 15
    CODE_MUST_NOT_BE_ZERO = 16
    AMOUNT_MUST_NOT_BE_ZERO = 17
    DEBIT_ACCOUNT_NOT_FOUND = 18
    CREDIT_ACCOUNT_NOT_FOUND = 19
    ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER = 20
    TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS = 21
    PENDING_TRANSFER_NOT_FOUND = 22
    PENDING_TRANSFER_NOT_PENDING = 23
    PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID = 24
    PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID = 25
    PENDING_TRANSFER_HAS_DIFFERENT_LEDGER = 26
    PENDING_TRANSFER_HAS_DIFFERENT_CODE = 27
    EXCEEDS_PENDING_TRANSFER_AMOUNT = 28
    PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT = 29
    PENDING_TRANSFER_ALREADY_POSTED = 30
    PENDING_TRANSFER_ALREADY_VOIDED = 31
    PENDING_TRANSFER_EXPIRED = 32
    EXISTS_WITH_DIFFERENT_FLAGS = 33
    EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID = 34
    EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID = 35
    EXISTS_WITH_DIFFERENT_AMOUNT = 36
    EXISTS_WITH_DIFFERENT_PENDING_ID = 37
    EXISTS_WITH_DIFFERENT_USER_DATA = 38
    EXISTS_WITH_DIFFERENT_TIMEOUT = 39
    EXISTS_WITH_DIFFERENT_CODE = 40
    EXISTS_WITH_DIFFERENT_LEDGER = 41
    EXISTS = 42
    DEBIT_ACCOUNT_CLOSED = 43
    CREDIT_ACCOUNT_CLOSED = 44
    OVERFLOWS_DEBITS_PENDING = 45
    OVERFLOWS_CREDITS_PENDING = 46
    OVERFLOWS_DEBITS_POSTED = 47
    OVERFLOWS_CREDITS_POSTED = 48
    OVERFLOWS_DEBITS = 49
    OVERFLOWS_CREDITS = 50
    OVERFLOWS_TIMEOUT = 51
    EXCEEDS_CREDITS = 52
    EXCEEDS_DEBITS = 53
    FEES_EXCEED_AMOUNT = 54
    FEE_SCHEDULE_NOT_FOUND = 55
    REFUND_ORIGINAL_NOT_FOUND = 56
    EXCEEDS_REFUNDABLE_AMOUNT = 57


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Account:
    """An account. To create one give `ledger` and `code` (and `id`, or a new one is made);
    the balances and `timestamp` are output only and filled in by lookups."""

    id: uuid.UUID = dataclasses.field(default_factory=new_id)
    ledger: int
    code: int
    flags: AccountFlags = AccountFlags.NONE
    user_data: bytes = b""
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    timestamp: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", as_id(self.id))
        object.__setattr__(self, "flags", AccountFlags(self.flags))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Transfer:
    """A transfer of `amount` from the debit account to the credit account. `id` is the
    idempotency key (a new time-ordered one is made when not given); `pending_id` is None for
    none; `timestamp` is output only."""

    id: uuid.UUID = dataclasses.field(default_factory=new_id)
    debit_account_id: uuid.UUID
    credit_account_id: uuid.UUID
    amount: int
    ledger: int
    code: int
    flags: TransferFlags = TransferFlags.NONE
    pending_id: uuid.UUID | None = None
    timeout_seconds: int = 0
    user_data: bytes = b""
    timestamp: int = 0
    # Fee transfers: the schedule that splits `amount` into legs (version 0 = the latest), or
    # the fee transfer this one refunds. Neither is stored on the legs LookupTransfers returns.
    fee_schedule_id: uuid.UUID | None = None
    fee_schedule_version: int = 0
    refund_of: uuid.UUID | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", as_id(self.id))
        object.__setattr__(self, "debit_account_id", as_id(self.debit_account_id))
        object.__setattr__(self, "credit_account_id", as_id(self.credit_account_id))
        for name in ("pending_id", "fee_schedule_id", "refund_of"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, as_id(getattr(self, name)))
        object.__setattr__(self, "flags", TransferFlags(self.flags))

    def replace(self, **changes) -> Transfer:
        """A copy with some fields changed (`dataclasses.replace`)."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AccountBalance:
    """An account's balances right after the transfer committed at `timestamp`."""

    timestamp: int
    debits_pending: int
    debits_posted: int
    credits_pending: int
    credits_posted: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class AccountFilter:
    """Which of an account's transfers (or historical balances) to fetch, by timestamp.

    Bounds are inclusive, 0 for none; at least one of `debits` and `credits`; `reversed` gives
    newest first; `code` 0 and empty `user_data` match any. `limit` is the page size.
    """

    account_id: uuid.UUID
    timestamp_min: int = 0
    timestamp_max: int = 0
    limit: int = BATCH_ITEMS_MAX
    debits: bool = True
    credits: bool = True
    reversed: bool = False
    code: int = 0
    user_data: bytes = b""

    def __post_init__(self) -> None:
        object.__setattr__(self, "account_id", as_id(self.account_id))

    @property
    def flags(self) -> AccountFilterFlags:
        flags = AccountFilterFlags.NONE
        if self.debits:
            flags |= AccountFilterFlags.DEBITS
        if self.credits:
            flags |= AccountFilterFlags.CREDITS
        if self.reversed:
            flags |= AccountFilterFlags.REVERSED
        return flags

    def next_page(self, last_timestamp: int) -> AccountFilter:
        """The filter of the page after one that ended at `last_timestamp`: timestamps are
        unique, so the next page starts just past it in the filter's direction."""
        if self.reversed:
            return dataclasses.replace(self, timestamp_max=last_timestamp - 1)
        return dataclasses.replace(self, timestamp_min=last_timestamp + 1)


class ClosureResult(enum.IntEnum):
    """Outcome of one account of `close_accounts` / `reopen_accounts`."""

    OK = 1
    ID_MUST_NOT_BE_ZERO = 2
    ACCOUNT_NOT_FOUND = 3


class LegKind(enum.IntEnum):
    """What a leg of a fee transfer or refund carries (enum LegKind of the proto)."""

    UNSPECIFIED = 0
    NET = 1
    SPLIT = 2
    FEE = 3
    COMMISSION = 4
    TAX = 5
    RESERVE = 6


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Leg:
    """One transfer of the linked chain a fee transfer or refund became."""

    id: uuid.UUID
    debit_account_id: uuid.UUID
    credit_account_id: uuid.UUID
    amount: int
    kind: LegKind
    slot: int
    flags: TransferFlags
    timeout_seconds: int


R = TypeVar("R", AccountResult, TransferResult, ClosureResult)


@dataclasses.dataclass(frozen=True, slots=True)
class CreateResult(Generic[R]):
    """The outcome of one account or transfer of a create request.

    `index` is the item's position in the request (0 for `AsyncClient.create_transfer`, whose
    request the caller never sees); `timestamp` is the commit timestamp for OK, the original's
    for EXISTS and 0 otherwise.
    """

    index: int
    result: R
    timestamp: int
    # Transfers with a fee schedule, and refunds: their legs and the schedule version used.
    legs: tuple[Leg, ...] = ()
    fee_schedule_version: int = 0

    @property
    def ok(self) -> bool:
        return self.result is type(self.result).OK

    @property
    def exists(self) -> bool:
        return self.result is type(self.result).EXISTS

    @property
    def is_ok_or_exists(self) -> bool:
        """True when the item is committed: either now (OK) or by an earlier request with the
        same id and identical fields (EXISTS).

        The SDK retries UNAVAILABLE and DEADLINE_EXCEEDED with the same ids; when the attempt
        that failed had in fact committed, the retry reports EXISTS. After a retry EXISTS is
        therefore as good as OK, and this is the check to use. EXISTS_WITH_DIFFERENT_* is not:
        the id was already used for a different item.
        """
        return self.ok or self.exists


CreateAccountResult = CreateResult[AccountResult]
CreateTransferResult = CreateResult[TransferResult]
# The outcome of one id of close_accounts / reopen_accounts (EXISTS never occurs: both are
# idempotent and answer OK for an account already in the requested state).
ClosureOutcome = CreateResult[ClosureResult]
