"""Malformed requests are INVALID_ARGUMENT with a google.rpc.BadRequest naming every bad field
and its index, and change nothing: transfers, accounts, lookups, closures, account filters
(GetAccountTransfers, GetAccountBalances) and requests within a StreamTransfers stream (which
end the stream after the earlier requests' responses). Every RPC and flag of the v1 contract is
served (none UNIMPLEMENTED); the server also serves grpc.health.v1 and server reflection."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from harness import account, transfer

BATCH_MAX = 8_190
SERVICE = "txengine.v1.LedgerService"
TRANSFER_ID_FIELDS = ("id", "debit_account_id", "credit_account_id", "pending_id")
BAD_LENGTHS = (1, 15, 17, 32)
RPCS = ("CreateAccounts", "CreateTransfers", "LookupAccounts", "LookupTransfers",
        "GetAccountTransfers", "GetAccountBalances", "StreamTransfers", "CloseAccounts",
        "ReopenAccounts", "SubscribeEvents", "CreateWebhookSubscription",
        "ListWebhookSubscriptions", "DeleteWebhookSubscription", "ReplayWebhookDeliveries")
DEBITS = pb.ACCOUNT_FILTER_FLAGS_DEBITS
CREDITS = pb.ACCOUNT_FILTER_FLAGS_CREDITS
REVERSED = pb.ACCOUNT_FILTER_FLAGS_REVERSED


def details(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            assert status.code == error.code().value[0]
            return status
    raise AssertionError(f"no grpc-status-details-bin in {error!r}")


def bad_request(status: status_pb2.Status) -> error_details_pb2.BadRequest:
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            message = error_details_pb2.BadRequest()
            detail.Unpack(message)
            found.append(message)
    assert len(found) == 1, f"expected one BadRequest detail in {status}"
    return found[0]


def violated_fields(error: grpc.aio.AioRpcError) -> list[str]:
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
    fields = [v.field for v in bad_request(details(error)).field_violations]
    assert all(v.description for v in bad_request(details(error)).field_violations)
    return fields


async def invalid(call, request) -> list[str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(request)
    return violated_fields(caught.value)


async def snapshot(db) -> tuple:
    return (
        await db.fetchval("SELECT count(*) FROM accounts"),
        await db.fetchval("SELECT count(*) FROM transfers"),
        tuple(await db.fetch("SELECT shard, last_seq, last_timestamp FROM shards ORDER BY shard")),
        await db.fetchval("SELECT coalesce(sum(debits_posted), 0) FROM accounts"),
    )


@pytest.fixture
async def funded(stub):
    """Two accounts of ledger 1, so that valid transfers in a request would commit."""
    a, b = account(), account()
    response = await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[a, b]))
    assert [r.result for r in response.results] == [pb.ACCOUNT_RESULT_OK] * 2
    return a.id, b.id


# -- CreateTransfers -----------------------------------------------------------------------------

@pytest.mark.parametrize("length", BAD_LENGTHS)
@pytest.mark.parametrize("field", TRANSFER_ID_FIELDS)
async def test_transfer_id_of_wrong_length(stub, db, funded, field, length):
    a, b = funded
    transfers = [transfer(a, b, 1) for _ in range(5)]
    setattr(transfers[3], field, b"\x01" * length)
    before = await snapshot(db)
    assert await invalid(stub.CreateTransfers, pb.CreateTransfersRequest(transfers=transfers)) == [
        f"transfers[3].{field}"]
    assert await snapshot(db) == before
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(
        ids=[t.id for t in transfers if len(t.id) == 16]))
    assert list(found.transfers) == []


async def test_every_bad_transfer_field_is_named(stub, db, funded):
    a, b = funded
    transfers = [transfer(a, b, 1) for _ in range(6)]
    transfers[0].id = b"\x01" * 15
    transfers[2].debit_account_id = b"\x02" * 17
    transfers[2].credit_account_id = b"\x03"
    transfers[4].user_data = b"u" * 17
    transfers[5].pending_id = b"\x04" * 8
    before = await snapshot(db)
    fields = await invalid(stub.CreateTransfers, pb.CreateTransfersRequest(transfers=transfers))
    assert sorted(fields) == sorted([
        "transfers[0].id", "transfers[2].debit_account_id", "transfers[2].credit_account_id",
        "transfers[4].user_data", "transfers[5].pending_id"])
    assert await snapshot(db) == before


@pytest.mark.parametrize("length", (17, 64))
async def test_transfer_user_data_too_long(stub, db, funded, length):
    a, b = funded
    transfers = [transfer(a, b, 1), transfer(a, b, 1, user_data=b"x" * length), transfer(a, b, 1)]
    before = await snapshot(db)
    assert await invalid(stub.CreateTransfers, pb.CreateTransfersRequest(transfers=transfers)) == [
        "transfers[1].user_data"]
    assert await snapshot(db) == before


async def test_transfer_user_data_of_16_bytes_is_accepted(stub, funded):
    a, b = funded
    t = transfer(a, b, 1, user_data=b"\xff" * 16)
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[t]))
    assert response.results[0].result == pb.TRANSFER_RESULT_OK
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[t.id]))
    assert found.transfers[0].user_data == b"\xff" * 16


async def test_too_many_transfers(stub, db, funded):
    a, b = funded
    transfers = [transfer(a, b, 1) for _ in range(BATCH_MAX + 1)]
    before = await snapshot(db)
    assert await invalid(stub.CreateTransfers, pb.CreateTransfersRequest(transfers=transfers)) == [
        "transfers"]
    assert await snapshot(db) == before


async def test_a_full_batch_of_transfers_is_accepted(stub, db, funded):
    a, b = funded
    transfers = [transfer(a, b, 1) for _ in range(BATCH_MAX)]
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers))
    assert len(response.results) == BATCH_MAX
    assert {r.result for r in response.results} == {pb.TRANSFER_RESULT_OK}
    assert await db.fetchval("SELECT count(*) FROM transfers") == BATCH_MAX


async def test_empty_requests_are_valid(stub):
    assert list((await stub.CreateTransfers(pb.CreateTransfersRequest())).results) == []
    assert list((await stub.CreateAccounts(pb.CreateAccountsRequest())).results) == []
    assert list((await stub.LookupAccounts(pb.LookupAccountsRequest())).accounts) == []
    assert list((await stub.LookupTransfers(pb.LookupTransfersRequest())).transfers) == []
    assert list((await stub.CloseAccounts(pb.CloseAccountsRequest())).results) == []
    assert list((await stub.ReopenAccounts(pb.ReopenAccountsRequest())).results) == []
    assert await _stream_all(stub, []) == []
    assert await _stream_all(stub, [pb.StreamTransfersRequest()] * 2) == [
        pb.StreamTransfersResponse()] * 2


# -- CreateAccounts ------------------------------------------------------------------------------

@pytest.mark.parametrize("length", BAD_LENGTHS)
async def test_account_id_of_wrong_length(stub, db, length):
    accounts = [account() for _ in range(4)]
    accounts[2].id = b"\x07" * length
    before = await snapshot(db)
    assert await invalid(stub.CreateAccounts, pb.CreateAccountsRequest(accounts=accounts)) == [
        "accounts[2].id"]
    assert await snapshot(db) == before
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(
        ids=[a.id for i, a in enumerate(accounts) if i != 2]))
    assert list(found.accounts) == []


async def test_account_user_data_too_long_and_bad_id_both_named(stub, db):
    accounts = [account() for _ in range(4)]
    accounts[0].user_data = b"u" * 17
    accounts[3].id = b"\x01" * 3
    before = await snapshot(db)
    fields = await invalid(stub.CreateAccounts, pb.CreateAccountsRequest(accounts=accounts))
    assert sorted(fields) == ["accounts[0].user_data", "accounts[3].id"]
    assert await snapshot(db) == before


async def test_too_many_accounts(stub, db):
    accounts = [account() for _ in range(BATCH_MAX + 1)]
    before = await snapshot(db)
    assert await invalid(stub.CreateAccounts, pb.CreateAccountsRequest(accounts=accounts)) == [
        "accounts"]
    assert await snapshot(db) == before


# -- lookups ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rpc", ["LookupAccounts", "LookupTransfers"])
@pytest.mark.parametrize("length", BAD_LENGTHS)
async def test_lookup_id_of_wrong_length(stub, rpc, length):
    request_type = getattr(pb, f"{rpc}Request")
    ids = [new_id(), new_id(), b"\x09" * length, new_id()]
    assert await invalid(getattr(stub, rpc), request_type(ids=ids)) == ["ids[2]"]


@pytest.mark.parametrize("rpc", ["LookupAccounts", "LookupTransfers"])
async def test_lookup_names_every_bad_id(stub, rpc):
    request_type = getattr(pb, f"{rpc}Request")
    ids = [b"\x01", new_id(), b"\x02" * 20]
    assert sorted(await invalid(getattr(stub, rpc), request_type(ids=ids))) == ["ids[0]", "ids[2]"]


@pytest.mark.parametrize("rpc", ["LookupAccounts", "LookupTransfers"])
async def test_lookup_too_many_ids(stub, rpc):
    request_type = getattr(pb, f"{rpc}Request")
    assert await invalid(getattr(stub, rpc), request_type(ids=[new_id()] * (BATCH_MAX + 1))) == [
        "ids"]
    response = await getattr(stub, rpc)(request_type(ids=[new_id()] * BATCH_MAX))
    assert len(response.ListFields()) == 0  # nothing found, but a valid request


async def test_lookup_of_empty_id_is_the_zero_id(stub, funded):
    a, _ = funded
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[b"", a, bytes(16)]))
    assert [x.id for x in found.accounts] == [a]


async def test_lookup_returns_found_ones_in_request_order_with_repeats(stub, funded):
    a, b = funded
    missing = new_id()
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[b, missing, a, b]))
    assert [x.id for x in found.accounts] == [b, a, b]


# -- status details on the sync API (grpc_status.rpc_status) ---------------------------------------

async def test_sync_client_decodes_bad_request(engine_app):
    def call():
        with grpc.insecure_channel(engine_app.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            try:
                stub.LookupTransfers(pb.LookupTransfersRequest(ids=[b"\x01" * 5]), timeout=10)
            except grpc.RpcError as error:
                return error.code(), rpc_status.from_call(error)
            return None, None

    code, status = await asyncio.to_thread(call)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert status is not None and status.code == code.value[0]
    assert [v.field for v in bad_request(status).field_violations] == ["ids[0]"]
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1


# -- every RPC and flag of the contract is served ------------------------------------------------

async def test_every_rpc_of_the_contract_is_served(stub, funded):
    """A minimal valid request to each LedgerService method answers OK (none UNIMPLEMENTED)."""
    a, b = funded
    service = pb.DESCRIPTOR.services_by_name["LedgerService"]
    assert {m.name for m in service.methods} == set(RPCS)
    account_filter = pb.AccountFilter(account_id=a, limit=10, flags=DEBITS | CREDITS)
    calls = {
        "CreateAccounts": lambda: stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account()])),
        "CreateTransfers": lambda: stub.CreateTransfers(pb.CreateTransfersRequest(
            transfers=[transfer(a, b, 1)])),
        "LookupAccounts": lambda: stub.LookupAccounts(pb.LookupAccountsRequest(ids=[a])),
        "LookupTransfers": lambda: stub.LookupTransfers(pb.LookupTransfersRequest(ids=[new_id()])),
        "GetAccountTransfers": lambda: stub.GetAccountTransfers(
            pb.GetAccountTransfersRequest(filter=account_filter)),
        "GetAccountBalances": lambda: stub.GetAccountBalances(
            pb.GetAccountBalancesRequest(filter=account_filter)),
        "StreamTransfers": lambda: _stream_all(stub, [pb.StreamTransfersRequest(
            transfers=[transfer(a, b, 1)])]),
        "CloseAccounts": lambda: stub.CloseAccounts(pb.CloseAccountsRequest(ids=[new_id()])),
        "ReopenAccounts": lambda: stub.ReopenAccounts(pb.ReopenAccountsRequest(ids=[new_id()])),
        "SubscribeEvents": lambda: _first_response(stub.SubscribeEvents(
            pb.SubscribeEventsRequest())),
        "CreateWebhookSubscription": lambda: stub.CreateWebhookSubscription(
            pb.CreateWebhookSubscriptionRequest(url="http://127.0.0.1:9/hook", secret=b"s" * 16)),
        "ListWebhookSubscriptions": lambda: stub.ListWebhookSubscriptions(
            pb.ListWebhookSubscriptionsRequest()),
        "DeleteWebhookSubscription": lambda: stub.DeleteWebhookSubscription(
            pb.DeleteWebhookSubscriptionRequest(id=new_id())),
        "ReplayWebhookDeliveries": lambda: stub.ReplayWebhookDeliveries(
            pb.ReplayWebhookDeliveriesRequest(subscription_id=new_id())),
    }
    assert set(calls) == set(RPCS)
    for name, call in calls.items():
        await call()  # raises AioRpcError on any non-OK status


async def _first_response(call):
    """The first message of a server stream (the funded accounts' events), then cancel."""
    async for response in call:
        call.cancel()
        return response


@pytest.mark.parametrize("flags", [
    pb.TRANSFER_FLAGS_PENDING, pb.TRANSFER_FLAGS_BALANCING_DEBIT,
    pb.TRANSFER_FLAGS_BALANCING_CREDIT, pb.TRANSFER_FLAGS_PENDING | pb.TRANSFER_FLAGS_LINKED,
], ids=["pending", "balancing_debit", "balancing_credit", "pending+linked"])
async def test_two_phase_and_balancing_flags_give_per_item_results(stub, funded, flags):
    """Flags that an earlier version refused with UNIMPLEMENTED are results per item now."""
    a, b = funded
    first = transfer(a, b, 1, flags=flags)
    transfers = [first, transfer(a, b, 1),
                 pb.Transfer(id=new_id(), pending_id=first.id,
                             flags=pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER),
                 pb.Transfer(id=new_id(), pending_id=first.id,
                             flags=pb.TRANSFER_FLAGS_VOID_PENDING_TRANSFER)]
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers))
    pending = bool(flags & pb.TRANSFER_FLAGS_PENDING)
    assert [r.result for r in response.results] == [
        pb.TRANSFER_RESULT_OK, pb.TRANSFER_RESULT_OK,
        pb.TRANSFER_RESULT_OK if pending else pb.TRANSFER_RESULT_PENDING_TRANSFER_NOT_PENDING,
        pb.TRANSFER_RESULT_PENDING_TRANSFER_ALREADY_POSTED if pending
        else pb.TRANSFER_RESULT_PENDING_TRANSFER_NOT_PENDING]


# -- AccountFilter (GetAccountTransfers, GetAccountBalances) --------------------------------------

def _filter(default_account_id: bytes, **fields) -> pb.AccountFilter:
    values = {"account_id": default_account_id, "limit": 10, "flags": DEBITS | CREDITS, **fields}
    return pb.AccountFilter(**values)


FILTER_CASES = {
    "account_id empty": ({"account_id": b""}, ["filter.account_id"]),
    "account_id 15 bytes": ({"account_id": b"\x01" * 15}, ["filter.account_id"]),
    "account_id 17 bytes": ({"account_id": b"\x01" * 17}, ["filter.account_id"]),
    "account_id zero": ({"account_id": bytes(16)}, ["filter.account_id"]),
    "limit 0": ({"limit": 0}, ["filter.limit"]),
    "limit 8191": ({"limit": BATCH_MAX + 1}, ["filter.limit"]),
    "limit 2^32-1": ({"limit": 2**32 - 1}, ["filter.limit"]),
    "no DEBITS or CREDITS": ({"flags": 0}, ["filter.flags"]),
    "REVERSED alone": ({"flags": REVERSED}, ["filter.flags"]),
    "unknown flag bit": ({"flags": DEBITS | 8}, ["filter.flags"]),
    "high flag bit": ({"flags": CREDITS | REVERSED | 1 << 31}, ["filter.flags"]),
    "timestamp_min > timestamp_max": ({"timestamp_min": 10, "timestamp_max": 9},
                                      ["filter.timestamp_min"]),
    "negative timestamp_min": ({"timestamp_min": -1}, ["filter.timestamp_min"]),
    "user_data 17 bytes": ({"user_data": b"u" * 17}, ["filter.user_data"]),
    "every field at once": ({"account_id": b"\x01", "limit": 0, "flags": 0,
                             "timestamp_min": 5, "timestamp_max": 4, "user_data": b"u" * 40},
                            ["filter.account_id", "filter.limit", "filter.flags",
                             "filter.timestamp_min", "filter.user_data"]),
}


@pytest.mark.parametrize("rpc", ["GetAccountTransfers", "GetAccountBalances"])
async def test_bad_account_filter_is_named(stub, funded, rpc):
    """Each bad AccountFilter field is INVALID_ARGUMENT naming `filter.<field>` (one server for
    every case of one RPC: queries change nothing, so the cases cannot meet)."""
    request_type = getattr(pb, f"{rpc}Request")
    for name, (fields, expected) in FILTER_CASES.items():
        got = await invalid(getattr(stub, rpc), request_type(filter=_filter(funded[0], **fields)))
        assert sorted(got) == sorted(expected), name


@pytest.mark.parametrize("rpc", ["GetAccountTransfers", "GetAccountBalances"])
async def test_missing_filter_names_its_required_fields(stub, rpc):
    request_type = getattr(pb, f"{rpc}Request")
    got = await invalid(getattr(stub, rpc), request_type())
    assert sorted(set(got)) == ["filter.account_id", "filter.flags", "filter.limit"]


@pytest.mark.parametrize("rpc", ["GetAccountTransfers", "GetAccountBalances"])
async def test_negative_timestamp_max_is_named(stub, funded, rpc):
    """A negative timestamp_max is the bad field, so the violation must name it."""
    request_type = getattr(pb, f"{rpc}Request")
    got = await invalid(getattr(stub, rpc), request_type(filter=_filter(funded[0], timestamp_max=-1)))
    assert "filter.timestamp_max" in got, got


@pytest.mark.parametrize("rpc", ["GetAccountTransfers", "GetAccountBalances"])
async def test_account_filter_edges_are_valid(stub, funded, rpc):
    a, _ = funded
    request_type = getattr(pb, f"{rpc}Request")
    for fields in ({"limit": 1}, {"limit": BATCH_MAX}, {"flags": DEBITS}, {"flags": CREDITS | REVERSED},
                   {"timestamp_min": 7, "timestamp_max": 7}, {"timestamp_min": 2**63 - 1},
                   {"user_data": b"u" * 16}, {"code": 2**32 - 1}, {"account_id": new_id()}):
        await getattr(stub, rpc)(request_type(filter=_filter(a, **fields)))


# -- StreamTransfers -------------------------------------------------------------------------------

async def _stream_all(stub, requests) -> list[pb.StreamTransfersResponse]:
    return [r async for r in stub.StreamTransfers(iter(requests))]


@pytest.mark.parametrize("bad", ["id", "user_data", "too_many"])
async def test_malformed_stream_request_ends_the_stream_after_earlier_responses(stub, db, funded, bad):
    a, b = funded
    first = [transfer(a, b, 1), transfer(a, b, 2)]
    second = [transfer(a, b, 3)]
    third = [transfer(a, b, 4), transfer(a, b, 5), transfer(a, b, 6)]
    if bad == "id":
        third[1].debit_account_id = b"\x05" * 5
        expected = ["transfers[1].debit_account_id"]
    elif bad == "user_data":
        third[2].user_data = b"u" * 17
        expected = ["transfers[2].user_data"]
    else:
        third = [transfer(a, b, 1) for _ in range(BATCH_MAX + 1)]
        expected = ["transfers"]
    fourth = [transfer(a, b, 7)]
    requests = [pb.StreamTransfersRequest(transfers=t) for t in (first, second, third, fourth)]
    before = await db.fetchval("SELECT count(*) FROM transfers")
    responses = []
    call = stub.StreamTransfers(iter(requests))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in call:
            responses.append(response)
    assert violated_fields(caught.value) == expected
    assert [[r.result for r in response.results] for response in responses] == [
        [pb.TRANSFER_RESULT_OK] * 2, [pb.TRANSFER_RESULT_OK]]
    assert await db.fetchval("SELECT count(*) FROM transfers") == before + 3
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(
        ids=[t.id for t in first + second + third[:3] + fourth]))
    assert [t.id for t in found.transfers] == [t.id for t in first + second]


async def test_malformed_first_stream_request_gives_no_response(stub, db, funded):
    a, b = funded
    bad = transfer(a, b, 1)
    bad.pending_id = b"\x01" * 3
    requests = [pb.StreamTransfersRequest(transfers=[bad]),
                pb.StreamTransfersRequest(transfers=[transfer(a, b, 1)])]
    before = await db.fetchval("SELECT count(*) FROM transfers")
    responses = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for response in stub.StreamTransfers(iter(requests)):
            responses.append(response)
    assert violated_fields(caught.value) == ["transfers[0].pending_id"]
    assert responses == []
    assert await db.fetchval("SELECT count(*) FROM transfers") == before


# -- CloseAccounts / ReopenAccounts ----------------------------------------------------------------

@pytest.mark.parametrize("rpc", ["CloseAccounts", "ReopenAccounts"])
async def test_closure_id_of_wrong_length(stub, db, funded, rpc):
    request_type = getattr(pb, f"{rpc}Request")
    before = await snapshot(db)
    assert await invalid(getattr(stub, rpc), request_type(ids=[funded[0], b"\x01" * 15])) == ["ids[1]"]
    assert await invalid(getattr(stub, rpc), request_type(ids=[funded[0]] * (BATCH_MAX + 1))) == ["ids"]
    assert await snapshot(db) == before
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[funded[0]]))
    assert found.accounts[0].flags == 0


# -- health and reflection -------------------------------------------------------------------------

async def test_health_reports_serving(engine_app):
    async with grpc.aio.insecure_channel(engine_app.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                try:
                    response = await health.Check(health_pb2.HealthCheckRequest(service=service))
                    if response.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise
                assert asyncio.get_running_loop().time() < deadline, f"{service!r} not SERVING"
                await asyncio.sleep(0.05)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_ledger_service(engine_app):
    async with grpc.aio.insecure_channel(engine_app.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        listed = await call.read()
        await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE))
        described = await call.read()
        await call.done_writing()
    names = {s.name for s in listed.list_services_response.service}
    assert SERVICE in names
    assert "grpc.health.v1.Health" in names
    files = described.file_descriptor_response.file_descriptor_proto
    assert files, described
    protos = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in files]
    services = {f"{p.package}.{s.name}": [m.name for m in s.method]
                for p in protos for s in p.service}
    assert set(services[SERVICE]) == set(RPCS)
