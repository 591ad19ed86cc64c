"""LedgerService: protobuf requests in, columns to the posting engine, results out.

The servicer validates the shape of a request (id lengths, batch size, caller data size,
flags this version serves) and rejects a malformed one as a whole before anything is applied.
Business rules are the engine's; SQL is the store's.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import time
import urllib.parse
import uuid

import grpc
from google.protobuf.message import DecodeError

import numpy as np

from engine import limits
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.events.codec import EVENT_WIRE_BYTES_MAX, encode_commits, transfer_message
from engine.events.relay import read_projection
from engine.events.service import EventParts
from engine.fees.schedule import FeeSchedule
from engine.ids import ZERO_ID
from engine.kernels import _wire as wire
from engine.posting.accounts import NewAccount
from engine.posting.batch import TransferColumns, shards_of
from engine.posting.engine import PostingEngine
from engine.results import TransferResult
from engine.security.guard import Guard, NotEntitled
from engine.server import fees
from engine.server.errors import InvalidRequest, NotFound, Violation, abort, handle_errors
from engine.storage.store import ACCOUNT_COLUMNS, AccountQuery, Store

INT64_MAX = 2**63 - 1
FILTER_FLAGS_KNOWN = (pb.ACCOUNT_FILTER_FLAGS_DEBITS | pb.ACCOUNT_FILTER_FLAGS_CREDITS
                      | pb.ACCOUNT_FILTER_FLAGS_REVERSED)
# StreamTransfers: requests of one stream being committed at once; more waits (flow control).
STREAM_IN_FLIGHT_MAX = 8
EVENT_TYPES = frozenset(pb.EventType.values()) - {pb.EVENT_TYPE_UNSPECIFIED}
CONSISTENCIES = frozenset(pb.Consistency.values())
WEBHOOK_URL_CHARS_MAX = 2048
WEBHOOK_SECRET_BYTES = (16, 256)
# SubscribeEvents: commits read per round, and how long to wait for a commit when caught up.
SUBSCRIBE_COMMITS_PER_READ = 16
SUBSCRIBE_TRANSFERS_PER_READ = 8_190
SUBSCRIBE_IDLE_SECONDS = 1.0
PROJECTION_TIMEOUT_SECONDS = 0.5
assert limits.BATCH_ITEMS_MAX * EVENT_WIRE_BYTES_MAX < limits.GRPC_MESSAGE_BYTES_MAX, \
    "a SubscribeEventsResponse of BATCH_ITEMS_MAX events must fit a gRPC message"



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


class WireTransfers:
    """A CreateTransfers or StreamTransfers body kept as wire bytes until it is decoded."""

    __slots__ = ("raw", "request_type")

    def __init__(self, raw: bytes, request_type):
        self.raw = raw
        self.request_type = request_type

    @property
    def transfers(self):
        return _parse(self.request_type, self.raw).transfers


def decode_transfers_request(request) -> TransferColumns:
    """Columns of a CreateTransfers/StreamTransfers request: the wire kernel for plain transfers
    in the usual encoding, protobuf and decode_transfers for anything else (fees, bad fields)."""
    if isinstance(request, WireTransfers):
        columns = wire.decode_transfers(request.raw, limits.BATCH_ITEMS_MAX,
                                        limits.USER_DATA_BYTES_MAX, ZERO_ID,
                                        TransferResult.TIMESTAMP_MUST_BE_ZERO)
        if columns is not None:
            return TransferColumns(*columns)
    return decode_transfers(request.transfers)


def transfer_results_response(response_type, outcome):
    """The CreateTransfers/StreamTransfers response of an outcome: wire bytes built by the
    kernel (see _serializer), or, for fee transfers (results with legs), the message."""
    if outcome.legs is None:
        return wire.encode_results(outcome.results, outcome.timestamps)
    return response_type(results=_transfer_results(outcome))


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
    # Transfers without fees (nearly all) keep the columns above and nothing else.
    if any(t.fee_schedule_id or t.refund_of or t.fee_schedule_version for t in transfers):
        fees.decode_fee_fields(transfers, columns, violations)
    if violations:
        raise InvalidRequest(violations)
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


def decode_filter(account_filter) -> AccountQuery:
    """Validate an AccountFilter; raises InvalidRequest naming every bad field."""
    f = account_filter
    violations: list[Violation] = []
    if len(f.account_id) != limits.ID_BYTES or f.account_id == ZERO_ID:
        violations.append(Violation("filter.account_id", "must be a non-zero 16-byte id"))
    if not 1 <= f.limit <= limits.BATCH_ITEMS_MAX:
        violations.append(Violation("filter.limit", f"must be 1..{limits.BATCH_ITEMS_MAX}, got {f.limit}"))
    if f.flags & ~FILTER_FLAGS_KNOWN:
        violations.append(Violation("filter.flags", f"unknown bits {f.flags & ~FILTER_FLAGS_KNOWN:#x}"))
    debits = bool(f.flags & pb.ACCOUNT_FILTER_FLAGS_DEBITS)
    credits = bool(f.flags & pb.ACCOUNT_FILTER_FLAGS_CREDITS)
    if not (debits or credits):
        violations.append(Violation("filter.flags", "set DEBITS, CREDITS or both"))
    for name in ("timestamp_min", "timestamp_max"):
        if getattr(f, name) < 0:
            violations.append(Violation(f"filter.{name}", "timestamps are not negative"))
    timestamp_max = f.timestamp_max or INT64_MAX
    if f.timestamp_min > timestamp_max:
        violations.append(Violation("filter.timestamp_min", "must not exceed timestamp_max"))
    if len(f.user_data) > limits.USER_DATA_BYTES_MAX:
        violations.append(Violation("filter.user_data", f"at most {limits.USER_DATA_BYTES_MAX} bytes"))
    if violations:
        raise InvalidRequest(violations)
    return AccountQuery(
        account_id=f.account_id, timestamp_min=f.timestamp_min, timestamp_max=timestamp_max,
        limit=f.limit, debits=debits, credits=credits,
        reversed=bool(f.flags & pb.ACCOUNT_FILTER_FLAGS_REVERSED), code=f.code,
        user_data=f.user_data or None,
    )


def _event_types(values, field: str, violations: list[Violation]) -> list[int]:
    for index, value in enumerate(values):
        if value not in EVENT_TYPES:
            violations.append(Violation(f"{field}[{index}]", f"unknown event type {value}"))
    return sorted(set(values))


def decode_subscription(request) -> tuple[str, list[int], bytes]:
    violations: list[Violation] = []
    url = urllib.parse.urlsplit(request.url)
    if url.scheme not in ("http", "https") or not url.netloc:
        violations.append(Violation("url", "must be an absolute http or https URL"))
    if len(request.url) > WEBHOOK_URL_CHARS_MAX:
        violations.append(Violation("url", f"at most {WEBHOOK_URL_CHARS_MAX} characters"))
    low, high = WEBHOOK_SECRET_BYTES
    if not low <= len(request.secret) <= high:
        violations.append(Violation("secret", f"must be {low}..{high} bytes, got {len(request.secret)}"))
    types = _event_types(request.types, "types", violations)
    if violations:
        raise InvalidRequest(violations)
    return request.url, types, request.secret


def _subscription_id(value: bytes, field: str) -> bytes:
    if len(value) != limits.ID_BYTES or value == ZERO_ID:
        raise InvalidRequest([Violation(field, "must be a non-zero 16-byte id")])
    return value


def subscription_message(row) -> pb.WebhookSubscription:
    return pb.WebhookSubscription(id=row["id"], url=row["url"], types=row["event_types"],
                                  created_at=row["created_at"])


def account_message(row) -> pb.Account:
    return pb.Account(
        id=row["id"], ledger=row["ledger"], code=row["code"], flags=row["flags"],
        debits_pending=row["debits_pending"], debits_posted=row["debits_posted"],
        credits_pending=row["credits_pending"], credits_posted=row["credits_posted"],
        user_data=row["user_data"], timestamp=row["timestamp"],
    )


def _transfer_results(outcome) -> list[pb.CreateTransferResult]:
    if outcome.legs is None:
        return [pb.CreateTransferResult(index=i, result=r, timestamp=t)
                for i, (r, t) in enumerate(zip(outcome.results, outcome.timestamps))]
    return [pb.CreateTransferResult(index=i, result=r, timestamp=t,
                                    legs=[fees.leg_message(leg) for leg in legs],
                                    fee_schedule_version=version)
            for i, (r, t, legs, version) in enumerate(zip(
                outcome.results, outcome.timestamps, outcome.legs, outcome.fee_schedule_versions))]


def _schedule_id(value: bytes, field: str, required: bool) -> bytes | None:
    if not value and not required:
        return None
    if len(value) != limits.ID_BYTES or value == ZERO_ID:
        raise InvalidRequest([Violation(field, "must be a non-zero 16-byte id")])
    return value


class LedgerServicer(ledger_pb2_grpc.LedgerServiceServicer):
    """The v1 LedgerService over one posting engine and its store."""

    def __init__(self, engine: PostingEngine, store: Store, events: EventParts,
                 guard: Guard | None = None):
        self.engine = engine
        self.store = store
        self.events = events
        # Entitlements and item rates of the caller (engine.security); None: no checks.
        self.guard = guard

    async def _admit_transfers(self, columns: TransferColumns) -> None:
        if self.guard is not None:
            await self.guard.check_transfers(columns)
            await self.guard.charge_items(len(columns))

    @handle_errors
    async def CreateAccounts(self, request, context):
        accounts = decode_accounts(request.accounts)
        if self.guard is not None:
            self.guard.check_accounts(accounts)
            await self.guard.charge_items(len(accounts))
        outcome = await self.engine.create_accounts(accounts)
        return pb.CreateAccountsResponse(results=[
            pb.CreateAccountResult(index=i, result=r, timestamp=t)
            for i, (r, t) in enumerate(zip(outcome.results, outcome.timestamps))
        ])

    @handle_errors
    async def CreateTransfers(self, request, context):
        stages = self.engine.stages
        with stages.stage("decode"):
            columns = decode_transfers_request(request)
        await self._admit_transfers(columns)
        outcome = await self.engine.create_transfers(columns)
        with stages.stage("encode"):
            return transfer_results_response(pb.CreateTransfersResponse, outcome)

    @handle_errors
    async def CloseAccounts(self, request, context):
        return pb.CloseAccountsResponse(results=await self._set_closed(request.ids, True))

    @handle_errors
    async def ReopenAccounts(self, request, context):
        return pb.ReopenAccountsResponse(results=await self._set_closed(request.ids, False))

    async def _set_closed(self, ids, close: bool) -> list[pb.AccountClosureResult]:
        _, checked = _lookup_ids(ids, self.engine.shard_count)
        if self.guard is not None:
            await self.guard.check_account_ids(checked)
        outcome = await self.engine.set_closed(checked, close)
        return [pb.AccountClosureResult(index=i, result=r, timestamp=t)
                for i, (r, t) in enumerate(zip(outcome.results, outcome.timestamps))]

    @handle_errors
    async def LookupAccounts(self, request, context):
        shards, ids = _lookup_ids(request.ids, self.engine.shard_count)
        violations = []
        if request.consistency not in CONSISTENCIES:
            violations.append(Violation("consistency", f"unknown value {request.consistency}"))
        if request.min_version < 0:
            violations.append(Violation("min_version", "versions are not negative"))
        if violations:
            raise InvalidRequest(violations)
        eventual = request.consistency == pb.CONSISTENCY_EVENTUAL
        if eventual and ids:
            response = await self._lookup_projection(ids, request.min_version)
            if response is not None:
                return response
        version = self.engine.committed_timestamp
        rows = await self.store.lookup_accounts(shards, ids) if ids else []
        if self.guard is not None:
            rows = await self.guard.visible_accounts(rows)
        return pb.LookupAccountsResponse(accounts=[account_message(r) for r in rows],
                                         version=version if eventual else 0)

    async def _lookup_projection(self, ids: list[bytes],
                                 min_version: int) -> pb.LookupAccountsResponse | None:
        """The accounts from the Redis projection, or None when it cannot serve them: behind
        min_version, unreachable, or missing an account that Postgres may have."""
        try:
            version, accounts = await asyncio.wait_for(
                read_projection(self.events.redis, ids), PROJECTION_TIMEOUT_SECONDS)
        except Exception:  # noqa: BLE001 - any Redis failure: read Postgres instead
            return None
        if version < min_version or any(a is None for a in accounts):
            return None
        if self.guard is not None:
            accounts = self.guard.visible_account_messages(accounts)
        return pb.LookupAccountsResponse(accounts=accounts, version=version)

    async def SubscribeEvents(self, request, context):
        """Events after request.after, then live; ends only when the client goes away."""
        violations: list[Violation] = []
        types = set(_event_types(request.types, "types", violations))
        after = (request.after.commit_timestamp, request.after.index)
        if after[0] < 0:
            violations.append(Violation("after.commit_timestamp", "timestamps are not negative"))
        if violations:
            raise InvalidRequest(violations)
        ledgers = self.guard.event_ledgers("SubscribeEvents") if self.guard is not None else None
        store = self.events.store
        position = after[0] - 1 if request.HasField("after") else await store.progress("trimmed")
        await store.check_cursor(max(position, 0))
        while True:
            seen = self.engine.committed_timestamp
            rows, columns = await store.commits_after(position, SUBSCRIBE_COMMITS_PER_READ,
                                                      SUBSCRIBE_TRANSFERS_PER_READ)
            await store.check_cursor(position)
            if not rows:
                await self.engine.wait_for_commit(seen, SUBSCRIBE_IDLE_SECONDS)
                continue
            for commit in encode_commits(rows, columns):
                position = commit.commit_timestamp
                response = pb.SubscribeEventsResponse.FromString(commit.events)
                if types or commit.commit_timestamp <= after[0] or ledgers is not None:
                    kept = [e for e in response.events
                            if (e.cursor.commit_timestamp, e.cursor.index) > after
                            and (not types or e.type in types)
                            and (ledgers is None or _event_ledger(e) in ledgers)]
                    response = pb.SubscribeEventsResponse(events=kept)
                events = response.events
                for start in range(0, len(events), limits.BATCH_ITEMS_MAX):
                    yield (response if len(events) <= limits.BATCH_ITEMS_MAX else
                           pb.SubscribeEventsResponse(
                               events=events[start:start + limits.BATCH_ITEMS_MAX]))

    def _webhooks_entitled(self, rpc: str) -> None:
        """Webhooks deliver every event of every ledger: only an unrestricted principal
        manages them."""
        if self.guard is not None and self.guard.event_ledgers(rpc) is not None:
            raise NotEntitled([rpc], "webhooks deliver every ledger's events, and the "
                                     "entitlement names ledgers")

    @handle_errors
    async def CreateWebhookSubscription(self, request, context):
        self._webhooks_entitled("CreateWebhookSubscription")
        url, types, secret = decode_subscription(request)
        subscription_id = uuid.uuid4().bytes
        created_at = time.time_ns()
        store = self.events.store
        await store.create_subscription(subscription_id, url, types, secret, created_at,
                                        await store.latest_commit())
        return pb.CreateWebhookSubscriptionResponse(subscription=pb.WebhookSubscription(
            id=subscription_id, url=url, types=types, created_at=created_at))

    @handle_errors
    async def ListWebhookSubscriptions(self, request, context):
        self._webhooks_entitled("ListWebhookSubscriptions")
        rows = await self.events.store.subscriptions()
        return pb.ListWebhookSubscriptionsResponse(
            subscriptions=[subscription_message(r) for r in rows])

    @handle_errors
    async def DeleteWebhookSubscription(self, request, context):
        self._webhooks_entitled("DeleteWebhookSubscription")
        deleted = await self.events.store.delete_subscription(_subscription_id(request.id, "id"))
        return pb.DeleteWebhookSubscriptionResponse(deleted=deleted)

    @handle_errors
    async def ReplayWebhookDeliveries(self, request, context):
        self._webhooks_entitled("ReplayWebhookDeliveries")
        replayed = await self.events.store.replay_dead(
            _subscription_id(request.subscription_id, "subscription_id"))
        self.events.webhooks.wake()
        return pb.ReplayWebhookDeliveriesResponse(replayed=replayed)

    @handle_errors
    async def LookupTransfers(self, request, context):
        shards, ids = _lookup_ids(request.ids, self.engine.shard_count)
        rows = await self.store.lookup_transfers(shards, ids) if ids else []
        if self.guard is not None:
            rows = await self.guard.visible_transfers(rows)
        return pb.LookupTransfersResponse(transfers=[transfer_message(r) for r in rows])

    @handle_errors
    async def GetAccountTransfers(self, request, context):
        query = decode_filter(request.filter)
        if self.guard is not None and not await self.guard.account_visible(query.account_id):
            return pb.GetAccountTransfersResponse()
        rows = await self.store.account_transfers(query)
        if self.guard is not None:
            rows = await self.guard.visible_transfers(rows)
        return pb.GetAccountTransfersResponse(transfers=[transfer_message(r) for r in rows])

    @handle_errors
    async def GetAccountBalances(self, request, context):
        query = decode_filter(request.filter)
        if self.guard is not None and not await self.guard.account_visible(query.account_id):
            return pb.GetAccountBalancesResponse()
        shard = int(shards_of([query.account_id], self.engine.shard_count)[0])
        rows = await self.store.account_balances(shard, query)
        return pb.GetAccountBalancesResponse(balances=[
            pb.AccountBalance(timestamp=r["timestamp"], debits_pending=r["debits_pending"],
                              debits_posted=r["debits_posted"], credits_pending=r["credits_pending"],
                              credits_posted=r["credits_posted"])
            for r in rows
        ])

    @handle_errors
    async def CreateFeeSchedule(self, request, context):
        schedule = fees.decode_schedule(request.schedule)
        timestamp = time.time_ns()
        version = await self.store.create_fee_schedule(
            schedule.id, json.dumps(schedule.to_json()), timestamp)
        schedule = dataclasses.replace(schedule, version=version, timestamp=timestamp)
        return pb.CreateFeeScheduleResponse(schedule=fees.schedule_message(schedule))

    @handle_errors
    async def GetFeeSchedule(self, request, context):
        key = (_schedule_id(request.id, "id", required=True), request.version)
        found = (await self.engine.fees.schedules([key])).get(key)
        if found is None:
            raise NotFound(f"no fee schedule {request.id.hex()} version {request.version or 'latest'}")
        return pb.GetFeeScheduleResponse(schedule=fees.schedule_message(found))

    @handle_errors
    async def ListFeeSchedules(self, request, context):
        schedule_id = _schedule_id(request.id, "id", required=False)
        if not 1 <= request.limit <= limits.BATCH_ITEMS_MAX:
            raise InvalidRequest([Violation("limit", f"must be 1..{limits.BATCH_ITEMS_MAX}, got {request.limit}")])
        rows = await self.store.list_fee_schedules(schedule_id, request.limit)
        return pb.ListFeeSchedulesResponse(schedules=[
            fees.schedule_message(FeeSchedule.from_json(r["id"], r["version"], r["timestamp"],
                                                        json.loads(r["definition"])))
            for r in rows])

    @handle_errors
    async def Simulate(self, request, context):
        columns = decode_transfers(request.transfers)
        if not len(columns):
            return pb.SimulateResponse()
        if self.guard is not None:  # entitled as a write would be; shows only visible accounts
            await self.guard.check_transfers(columns)
        outcome, accounts = await self.engine.simulate(columns)
        rows = [dict(zip(ACCOUNT_COLUMNS, row)) for row in accounts]
        if self.guard is not None:
            rows = await self.guard.visible_accounts(rows)
        return pb.SimulateResponse(results=_transfer_results(outcome),
                                   accounts=[account_message(r) for r in rows])

    async def StreamTransfers(self, request_iterator, context):
        """Pipelined CreateTransfers: up to STREAM_IN_FLIGHT_MAX requests of the stream commit
        at once; responses come back in request order. A malformed request ends the stream
        with its status (earlier requests keep their results)."""
        in_flight: asyncio.Queue = asyncio.Queue()
        # A request enters the engine only while fewer than STREAM_IN_FLIGHT_MAX of the stream
        # are unanswered; a slot is freed once its response has been taken by the transport.
        slots = asyncio.Semaphore(STREAM_IN_FLIGHT_MAX)

        async def submit() -> None:
            try:
                async for request in request_iterator:
                    columns = decode_transfers_request(request)
                    await self._admit_transfers(columns)
                    await slots.acquire()
                    in_flight.put_nowait(asyncio.ensure_future(
                        self.engine.create_transfers(columns)))
                in_flight.put_nowait(None)
            except Exception as error:  # surfaced in request order by the writer below
                failed = asyncio.get_running_loop().create_future()
                failed.set_exception(error)
                in_flight.put_nowait(failed)

        reader = asyncio.create_task(submit())
        try:
            while (pending := await in_flight.get()) is not None:
                try:
                    outcome = await pending
                except Exception as error:  # noqa: BLE001 - the boundary, as in handle_errors
                    await abort(context, error)
                yield transfer_results_response(pb.StreamTransfersResponse, outcome)
                slots.release()
        finally:
            reader.cancel()
            while not in_flight.empty():
                leftover = in_flight.get_nowait()
                if leftover is not None:
                    leftover.cancel()


def _parse(request_type, raw: bytes):
    """A request message from its wire bytes; a body that does not parse is INVALID_ARGUMENT
    like any other malformed request (grpc's own parser would answer UNKNOWN)."""
    try:
        return request_type.FromString(raw)
    except DecodeError as error:
        raise InvalidRequest([Violation(
            "request", f"not a valid {request_type.DESCRIPTOR.full_name}: {error}")]) from error


def _serializer(response_type):
    """SerializeToString, passing through a body that is already wire bytes."""
    serialize = response_type.SerializeToString

    def serialized(response) -> bytes:
        return response if type(response) is bytes else serialize(response)

    return serialized


# Requests whose bodies go to the wire kernel (decode_transfers_request) unparsed.
WIRE_DECODED = (pb.CreateTransfersRequest, pb.StreamTransfersRequest)


def _request(request_type, raw: bytes):
    if request_type in WIRE_DECODED:
        return WireTransfers(raw, request_type)
    return _parse(request_type, raw)


def _unary(method, request_type):
    @functools.wraps(method)
    async def handler(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            request = _request(request_type, raw)
        except InvalidRequest as error:
            await abort(context, error)
        return await method(request, context)

    return handler


def _streaming(method, request_type):
    @functools.wraps(method)
    async def handler(raw_iterator, context: grpc.aio.ServicerContext):
        async def requests():
            async for raw in raw_iterator:
                yield _request(request_type, raw)

        async with contextlib.aclosing(method(requests(), context)) as responses:
            async for response in responses:
                yield response

    return handler


def _server_streaming(method, request_type):
    @functools.wraps(method)
    async def handler(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            async with contextlib.aclosing(method(_parse(request_type, raw), context)) as responses:
                async for response in responses:
                    yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - the boundary, as in handle_errors
            await abort(context, error)

    return handler


def add_to_server(servicer: LedgerServicer, server: grpc.aio.Server) -> None:
    """Register LedgerService with request bodies parsed by the servicer (see _parse)."""
    service = pb.DESCRIPTOR.services_by_name["LedgerService"]
    handlers = {}
    for method in service.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        implementation = getattr(servicer, method.name)
        if method.client_streaming:
            assert method.server_streaming, "only bidirectional streams are served"
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                _streaming(implementation, request_type),
                response_serializer=_serializer(response_type))
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                _server_streaming(implementation, request_type),
                response_serializer=_serializer(response_type))
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _unary(implementation, request_type),
                response_serializer=_serializer(response_type))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _event_ledger(event: pb.Event) -> int:
    """The ledger of what an event describes (a transfer, else an account)."""
    return event.transfer.ledger if event.HasField("transfer") else event.account.ledger
