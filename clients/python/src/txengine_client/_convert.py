"""Dataclasses ⇄ protobuf messages of txengine.v1, in one place."""
from __future__ import annotations

from collections.abc import Iterable

from txengine_client._gen.txengine.v1 import ledger_pb2 as pb
from txengine_client.ids import ZERO_ID, IdLike, as_id, from_wire, to_wire
from txengine_client.types import (
    Account,
    AccountBalance,
    AccountFilter,
    AccountFlags,
    AccountResult,
    CreateResult,
    Leg,
    LegKind,
    Transfer,
    TransferFlags,
    TransferResult,
)


def account_message(account: Account) -> pb.Account:
    return pb.Account(
        id=account.id.bytes, ledger=account.ledger, code=account.code, flags=int(account.flags),
        debits_pending=account.debits_pending, debits_posted=account.debits_posted,
        credits_pending=account.credits_pending, credits_posted=account.credits_posted,
        user_data=account.user_data, timestamp=account.timestamp,
    )


def transfer_message(transfer: Transfer) -> pb.Transfer:
    pending_id = transfer.pending_id
    return pb.Transfer(
        id=transfer.id.bytes, debit_account_id=transfer.debit_account_id.bytes,
        credit_account_id=transfer.credit_account_id.bytes, amount=transfer.amount,
        pending_id=b"" if pending_id is None else pending_id.bytes, ledger=transfer.ledger,
        code=transfer.code, flags=int(transfer.flags), timeout_seconds=transfer.timeout_seconds,
        user_data=transfer.user_data, timestamp=transfer.timestamp,
        fee_schedule_id=b"" if transfer.fee_schedule_id is None else transfer.fee_schedule_id.bytes,
        fee_schedule_version=transfer.fee_schedule_version,
        refund_of=b"" if transfer.refund_of is None else transfer.refund_of.bytes,
    )


def account_from(message: pb.Account) -> Account:
    return Account(
        id=from_wire(message.id), ledger=message.ledger, code=message.code,
        flags=AccountFlags(message.flags),
        user_data=message.user_data, debits_pending=message.debits_pending,
        debits_posted=message.debits_posted, credits_pending=message.credits_pending,
        credits_posted=message.credits_posted, timestamp=message.timestamp,
    )


def transfer_from(message: pb.Transfer) -> Transfer:
    pending_id = from_wire(message.pending_id)
    return Transfer(
        id=from_wire(message.id), debit_account_id=from_wire(message.debit_account_id),
        credit_account_id=from_wire(message.credit_account_id), amount=message.amount,
        pending_id=None if pending_id == ZERO_ID else pending_id, ledger=message.ledger,
        code=message.code, flags=TransferFlags(message.flags),
        timeout_seconds=message.timeout_seconds,
        user_data=message.user_data, timestamp=message.timestamp,
    )


def balance_from(message: pb.AccountBalance) -> AccountBalance:
    return AccountBalance(
        timestamp=message.timestamp, debits_pending=message.debits_pending,
        debits_posted=message.debits_posted, credits_pending=message.credits_pending,
        credits_posted=message.credits_posted,
    )


def _enum(cls, value: int):
    # A server newer than this SDK may send a result this SDK does not know: keep the number.
    try:
        return cls(value)
    except ValueError:
        return value


def account_results(results) -> list[CreateResult[AccountResult]]:
    return [CreateResult(r.index, _enum(AccountResult, r.result), r.timestamp) for r in results]


def leg_from(message: pb.Leg) -> Leg:
    return Leg(id=from_wire(message.id), debit_account_id=from_wire(message.debit_account_id),
               credit_account_id=from_wire(message.credit_account_id), amount=message.amount,
               kind=_enum(LegKind, message.kind), slot=message.slot,
               flags=TransferFlags(message.flags), timeout_seconds=message.timeout_seconds)


def transfer_results(results) -> list[CreateResult[TransferResult]]:
    return [CreateResult(r.index, _enum(TransferResult, r.result), r.timestamp,
                         tuple(leg_from(leg) for leg in r.legs), r.fee_schedule_version)
            if r.legs else CreateResult(r.index, _enum(TransferResult, r.result), r.timestamp)
            for r in results]


def create_accounts_request(accounts: Iterable[Account]) -> pb.CreateAccountsRequest:
    return pb.CreateAccountsRequest(accounts=[account_message(a) for a in accounts])


def create_transfers_request(transfers: Iterable[Transfer]) -> pb.CreateTransfersRequest:
    return pb.CreateTransfersRequest(transfers=[transfer_message(t) for t in transfers])


def stream_request(transfers: Iterable[Transfer]) -> pb.StreamTransfersRequest:
    return pb.StreamTransfersRequest(transfers=[transfer_message(t) for t in transfers])


def ids_message(ids: Iterable[IdLike]) -> list[bytes]:
    return [to_wire(i) for i in ids]


def account_filter(request_filter: AccountFilter) -> pb.AccountFilter:
    return pb.AccountFilter(
        account_id=request_filter.account_id.bytes, timestamp_min=request_filter.timestamp_min,
        timestamp_max=request_filter.timestamp_max, limit=request_filter.limit,
        flags=int(request_filter.flags), code=request_filter.code,
        user_data=request_filter.user_data,
    )


def as_filter(value: AccountFilter | IdLike) -> AccountFilter:
    """A filter, or the default filter (both directions, oldest first, one full page) of an
    account id."""
    if isinstance(value, AccountFilter):
        return value
    return AccountFilter(account_id=as_id(value))
