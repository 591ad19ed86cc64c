"""LedgerService: protobuf requests in, columns to the posting engine, results out.

The servicer validates the shape of a request (id lengths, batch size, caller data size,
flags this version serves) and rejects a malformed one as a whole before anything is applied.
Business rules are the engine's; SQL is the store's.
"""
from __future__ import annotations

import grpc
import numpy as np

from engine import limits
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import ZERO_ID
from engine.posting.accounts import NewAccount
from engine.posting.batch import TransferColumns, shards_of
from engine.posting.engine import PostingEngine
from engine.results import TransferFlags, TransferResult
from engine.server.errors import InvalidRequest, Unimplemented, Violation, handle_errors
from engine.storage.store import Store

# Flags a later version serves; a request using them is UNIMPLEMENTED, not silently ignored.
UNSERVED_TRANSFER_FLAGS = (
    TransferFlags.PENDING | TransferFlags.POST_PENDING_TRANSFER
    | TransferFlags.VOID_PENDING_TRANSFER | TransferFlags.BALANCING_DEBIT
    | TransferFlags.BALANCING_CREDIT
)


def _check_count(count: int, field: str) -> None:
    if count > limits.BATCH_ITEMS_MAX:
        raise InvalidRequest([Violation(field, f"at most {limits.BATCH_ITEMS_MAX} items, got {count}")])


def _ids(values, field: str, violations: list[Violation]) -> list[bytes]:
    """16-byte ids; an empty field is the zero id; any other length is a violation."""
    out = []
    for index, value in enumerate(values):
        if len(value) == limits.ID_BYTES:
            out.append(value)
        elif not value:
            out.append(ZERO_ID)
        else:
            violations.append(Violation(
                field.format(index), f"must be {limits.ID_BYTES} bytes (or empty for zero), got {len(value)}"))
            out.append(ZERO_ID)
    return out


def _user_data(values, field: str, violations: list[Violation]) -> list[bytes]:
    out = list(values)
    for index, value in enumerate(out):
        if len(value) > limits.USER_DATA_BYTES_MAX:
            violations.append(Violation(
                field.format(index), f"at most {limits.USER_DATA_BYTES_MAX} bytes, got {len(value)}"))
    return out


def decode_transfers(transfers) -> TransferColumns:
    """Columns of a repeated Transfer field; raises InvalidRequest naming every bad field."""
    _check_count(len(transfers), "transfers")
    violations: list[Violation] = []
    columns = TransferColumns(
        ids=_ids([t.id for t in transfers], "transfers[{}].id", violations),
        debit_ids=_ids([t.debit_account_id for t in transfers], "transfers[{}].debit_account_id", violations),
        credit_ids=_ids([t.credit_account_id for t in transfers], "transfers[{}].credit_account_id", violations),
        pending_ids=_ids([t.pending_id for t in transfers], "transfers[{}].pending_id", violations),
        amount=np.array([t.amount for t in transfers], np.uint64),
        ledger=np.array([t.ledger for t in transfers], np.uint32),
        code=np.array([t.code for t in transfers], np.uint32),
        flags=np.array([t.flags for t in transfers], np.uint32),
        timeout_seconds=np.array([t.timeout_seconds for t in transfers], np.uint32),
        user_data=_user_data([t.user_data for t in transfers], "transfers[{}].user_data", violations),
        precheck=np.array([TransferResult.TIMESTAMP_MUST_BE_ZERO if t.timestamp else 0
                           for t in transfers], np.uint32),
    )
    if violations:
        raise InvalidRequest(violations)
    unserved = np.flatnonzero(columns.flags & UNSERVED_TRANSFER_FLAGS)
    if len(unserved):
        raise Unimplemented(
            f"transfers[{unserved[0]}].flags: pending, post/void and balancing transfers are not "
            "served by this engine version")
    return columns


def decode_accounts(accounts) -> list[NewAccount]:
    _check_count(len(accounts), "accounts")
    violations: list[Violation] = []
    ids = _ids([a.id for a in accounts], "accounts[{}].id", violations)
    user_data = _user_data([a.user_data for a in accounts], "accounts[{}].user_data", violations)
    if violations:
        raise InvalidRequest(violations)
    return [
        NewAccount(id=i, ledger=a.ledger, code=a.code, flags=a.flags, user_data=u,
                   debits_pending=a.debits_pending, debits_posted=a.debits_posted,
                   credits_pending=a.credits_pending, credits_posted=a.credits_posted,
                   timestamp=a.timestamp)
        for i, a, u in zip(ids, accounts, user_data)
    ]


def _lookup_ids(ids, shard_count: int) -> tuple[list[int], list[bytes]]:
    _check_count(len(ids), "ids")
    violations: list[Violation] = []
    checked = _ids(ids, "ids[{}]", violations)
    if violations:
        raise InvalidRequest(violations)
    return shards_of(checked, shard_count).tolist(), checked


def account_message(row) -> pb.Account:
    return pb.Account(
        id=row["id"], ledger=row["ledger"], code=row["code"], flags=row["flags"],
        debits_pending=row["debits_pending"], debits_posted=row["debits_posted"],
        credits_pending=row["credits_pending"], credits_posted=row["credits_posted"],
        user_data=row["user_data"], timestamp=row["timestamp"],
    )


def transfer_message(row) -> pb.Transfer:
    pending_id = row["pending_id"]
    return pb.Transfer(
        id=row["id"], debit_account_id=row["debit_account_id"],
        credit_account_id=row["credit_account_id"], amount=row["amount"],
        pending_id=b"" if pending_id == ZERO_ID else pending_id, ledger=row["ledger"],
        code=row["code"], flags=row["flags"], timeout_seconds=row["timeout_seconds"],
        user_data=row["user_data"], timestamp=row["timestamp"],
    )


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    """The v1 LedgerService over one posting engine and its store."""

    def __init__(self, engine: PostingEngine, store: Store):
        self.engine = engine
        self.store = store

    @handle_errors
    async def CreateAccounts(self, request, context):
        outcome = await self.engine.create_accounts(decode_accounts(request.accounts))
        return pb.CreateAccountsResponse(results=[
            pb.CreateAccountResult(index=i, result=r, timestamp=t)
            for i, (r, t) in enumerate(zip(outcome.results, outcome.timestamps))
        ])

    @handle_errors
    async def CreateTransfers(self, request, context):
        stages = self.engine.stages
        with stages.stage("decode"):
            columns = decode_transfers(request.transfers)
        outcome = await self.engine.create_transfers(columns)
        with stages.stage("encode"):
            return pb.CreateTransfersResponse(results=[
                pb.CreateTransferResult(index=i, result=r, timestamp=t)
                for i, (r, t) in enumerate(zip(outcome.results, outcome.timestamps))
            ])

    @handle_errors
    async def LookupAccounts(self, request, context):
        shards, ids = _lookup_ids(request.ids, self.engine.shard_count)
        rows = await self.store.lookup_accounts(shards, ids) if ids else []
        return pb.LookupAccountsResponse(accounts=[account_message(r) for r in rows])

    @handle_errors
    async def LookupTransfers(self, request, context):
        shards, ids = _lookup_ids(request.ids, self.engine.shard_count)
        rows = await self.store.lookup_transfers(shards, ids) if ids else []
        return pb.LookupTransfersResponse(transfers=[transfer_message(r) for r in rows])

    @handle_errors
    async def GetAccountTransfers(self, request, context):
        raise Unimplemented("GetAccountTransfers is not served by this engine version")

    @handle_errors
    async def GetAccountBalances(self, request, context):
        raise Unimplemented("GetAccountBalances is not served by this engine version")

    async def StreamTransfers(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            "StreamTransfers is not served by this engine version")
