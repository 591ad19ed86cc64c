"""Bad input, fuzzed: Hypothesis strategies over every field of every LedgerService RPC, and raw
garbage as the request body.

Properties, for every example:
* the status is one of OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, UNAVAILABLE: never UNKNOWN,
  INTERNAL, or UNIMPLEMENTED for a served RPC;
* the request is INVALID_ARGUMENT exactly when it is malformed by the README's rules (id length
  other than 0 or 16, user_data over 16 bytes, more than 8,190 items, a bad account filter), and
  then it carries a google.rpc.BadRequest naming exactly the bad fields;
* a rejected request changes nothing: a digest of accounts, transfers, balances history and
  shard positions is compared before and after, on a sample of the rejected examples.

The engine runs in a thread with its own event loop so Hypothesis drives it with plain
synchronous gRPC calls (as in test_model.py). Garbage bodies are sent through a raw
`unary_unary` without serializer: random bytes, truncated valid messages, valid messages with
unknown fields, and wrong wire types.
"""
from __future__ import annotations

import asyncio
import collections
import threading

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from hypothesis import HealthCheck, assume, given, settings as hsettings, strategies as st

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from engine.server import app as app_module
from engine.server.errors import VIOLATIONS_REPORTED_MAX

BATCH_MAX = 8_190
SERVICE = "/txengine.v1.LedgerService/"
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
CALL_TIMEOUT_SECONDS = 60
# Every status seen, by test: printed at the end of the module (pytest -s) for the report.
OBSERVED: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

FUZZ = hsettings(max_examples=150, deadline=None, database=None,
                 suppress_health_check=list(HealthCheck))


# -- the engine in a thread -----------------------------------------------------------------------

class EngineThread:
    """An in-process engine on its own event loop thread, with a digest of its database."""

    def __init__(self, settings, database_url: str):
        self.settings = settings
        self.database_url = database_url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = self.run(app_module.start(settings))
        self.conn = self.run(asyncpg.connect(database_url))
        self.channel = grpc.insecure_channel(
            self.app.address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024),
                                       ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)

    def run(self, coroutine, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def digest(self) -> tuple:
        async def query():
            return tuple([
                await self.conn.fetchval(
                    f"SELECT count(*) || ':' || coalesce(md5(string_agg(x::text, ',' ORDER BY x::text)), '') "
                    f"FROM {table} x")
                for table in ("accounts", "transfers", "account_balances", "shards")])
        return self.run(query())

    def close(self) -> None:
        self.channel.close()
        self.run(self.conn.close())
        self.run(self.app.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def fuzz_engine(postgres, redis_url, tmp_path_factory):
    """One engine and database for the whole module (Hypothesis examples share it)."""
    import uuid

    from engine.config import Settings

    name = f"t_fuzz_{uuid.uuid4().hex[:8]}"
    postgres.psql(f"CREATE DATABASE {name};")
    url = postgres.get_uri(name)
    settings = Settings(listen="127.0.0.1:0", database_url=url, redis_url=redis_url,
                        data_dir=tmp_path_factory.mktemp("fuzz"), shards=4, lease_wait_seconds=5)
    engine = EngineThread(settings, url)
    accounts = [pb.Account(id=new_id(), ledger=1, code=1, flags=flags)
                for flags in (0, 0, 8, 2)]
    response = engine.stub.CreateAccounts(pb.CreateAccountsRequest(accounts=accounts))
    assert [r.result for r in response.results] == [pb.ACCOUNT_RESULT_OK] * 4
    engine.accounts = [a.id for a in accounts]
    KNOWN_IDS.extend(engine.accounts)
    yield engine
    engine.close()
    for test, codes in sorted(OBSERVED.items()):
        print(f"\nfuzz statuses {test}: {dict(codes)}")


# Ids of accounts that exist, so that some fuzzed transfers are valid and commit.
KNOWN_IDS: list[bytes] = []


# -- strategies -----------------------------------------------------------------------------------

ID_LENGTHS = (0, 1, 15, 16, 17, 32)


@st.composite
def ids(draw) -> bytes:
    kind = draw(st.integers(0, 9))
    if kind <= 2 and KNOWN_IDS:
        return draw(st.sampled_from(KNOWN_IDS))
    if kind == 3:
        return bytes(16)
    length = draw(st.sampled_from(ID_LENGTHS))
    return draw(st.binary(min_size=length, max_size=length))


def edges(bits: int, signed: bool = False):
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    special = [v for v in (0, 1, 2, high, high - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**62, 2**63 - 1,
                           2**63, -1, low) if low <= v <= high]
    return st.one_of(st.sampled_from(sorted(set(special))), st.integers(low, high))


u32 = edges(32)
u64 = edges(64)
i64 = edges(64, signed=True)
flags32 = st.one_of(st.integers(0, 63), st.sampled_from([64, 2**31, 2**32 - 1]), u32)
user_data = st.binary(min_size=0, max_size=40)


@st.composite
def batch_of(draw, element, big_weight: int = 40):
    """Mostly 0..6 items; rarely 8,189/8,190/8,191 (one element repeated, so it is cheap)."""
    if draw(st.integers(0, big_weight)) == 0:
        one = draw(element)
        return [one] * draw(st.sampled_from([BATCH_MAX - 1, BATCH_MAX, BATCH_MAX + 1]))
    return draw(st.lists(element, min_size=0, max_size=6))


transfers_ = st.builds(
    pb.Transfer, id=ids(), debit_account_id=ids(), credit_account_id=ids(), amount=u64,
    pending_id=ids(), ledger=st.one_of(st.just(1), u32), code=st.one_of(st.just(1), u32),
    flags=flags32, timeout_seconds=st.one_of(st.just(0), u32), user_data=user_data,
    timestamp=st.one_of(st.just(0), i64))

accounts_ = st.builds(
    pb.Account, id=ids(), ledger=st.one_of(st.just(1), u32), code=st.one_of(st.just(1), u32),
    flags=flags32, debits_pending=st.one_of(st.just(0), u64), debits_posted=st.one_of(st.just(0), u64),
    credits_pending=st.one_of(st.just(0), u64), credits_posted=st.one_of(st.just(0), u64),
    user_data=user_data, timestamp=st.one_of(st.just(0), i64))

filters = st.one_of(
    st.builds(  # anything
        pb.AccountFilter, account_id=ids(), timestamp_min=st.one_of(st.just(0), i64),
        timestamp_max=st.one_of(st.just(0), i64), limit=st.one_of(st.integers(0, 10), u32),
        flags=flags32, code=st.one_of(st.just(0), u32), user_data=user_data),
    st.builds(  # mostly valid, so the store's queries see edge values too
        pb.AccountFilter, account_id=ids(), timestamp_min=st.one_of(st.just(0), i64),
        timestamp_max=st.one_of(st.just(0), st.just(2**63 - 1), i64),
        limit=st.sampled_from([1, 2, BATCH_MAX, BATCH_MAX + 1]), flags=st.integers(1, 7),
        code=st.one_of(st.just(0), st.just(1), u32), user_data=st.binary(max_size=17)))


# -- expected violations (the README's rules) -----------------------------------------------------

def _id_bad(value: bytes) -> bool:
    return len(value) not in (0, 16)


def transfer_violations(transfers, field="transfers") -> set[str]:
    if len(transfers) > BATCH_MAX:
        return {field}
    bad = set()
    for i, t in enumerate(transfers):
        for name in ("id", "debit_account_id", "credit_account_id", "pending_id"):
            if _id_bad(getattr(t, name)):
                bad.add(f"{field}[{i}].{name}")
        if len(t.user_data) > 16:
            bad.add(f"{field}[{i}].user_data")
    return bad


def account_violations(accounts) -> set[str]:
    if len(accounts) > BATCH_MAX:
        return {"accounts"}
    bad = set()
    for i, a in enumerate(accounts):
        if _id_bad(a.id):
            bad.add(f"accounts[{i}].id")
        if len(a.user_data) > 16:
            bad.add(f"accounts[{i}].user_data")
    return bad


def id_violations(values) -> set[str]:
    if len(values) > BATCH_MAX:
        return {"ids"}
    return {f"ids[{i}]" for i, v in enumerate(values) if _id_bad(v)}


def filter_violations(f) -> set[str]:
    bad = set()
    if len(f.account_id) != 16 or f.account_id == bytes(16):
        bad.add("filter.account_id")
    if not 1 <= f.limit <= BATCH_MAX:
        bad.add("filter.limit")
    if f.flags & ~7 or not f.flags & 3:
        bad.add("filter.flags")
    if f.timestamp_min < 0 or f.timestamp_min > (f.timestamp_max or 2**63 - 1):
        bad.add("filter.timestamp_min")
    if f.timestamp_max < 0:
        bad.add("filter.timestamp_max")
    if len(f.user_data) > 16:
        bad.add("filter.user_data")
    return bad


# -- checking one call ----------------------------------------------------------------------------

def status_of(error: grpc.RpcError) -> status_pb2.Status | None:
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


def bad_request_fields(error: grpc.RpcError) -> set[str]:
    status = status_of(error)
    assert status is not None, f"INVALID_ARGUMENT without grpc-status-details-bin: {error!r}"
    assert status.code == error.code().value[0]
    found = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            message = error_details_pb2.BadRequest()
            detail.Unpack(message)
            found.append(message)
    assert len(found) == 1, f"expected one BadRequest in {status}"
    violations = found[0].field_violations
    assert violations and all(v.field and v.description for v in violations), status
    return {v.field for v in violations}


def call(engine, test: str, invoke, expected_bad: set[str], check_unchanged: bool):
    """Invoke; check the status properties; on a sample of rejections, check nothing changed."""
    before = engine.digest() if check_unchanged and expected_bad else None
    try:
        response = invoke()
        code, error = grpc.StatusCode.OK, None
    except grpc.RpcError as raised:
        code, error, response = raised.code(), raised, None
    label = code.name if code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT) \
        else f"{code.name}: {(error.details() or '')[:70]}"
    OBSERVED[test][label] += 1
    assert code in ALLOWED, f"{test}: {code} {error.details() if error else ''}"
    if code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT):
        # Overload and unavailability may pre-empt validation; otherwise validity decides.
        assert (code == grpc.StatusCode.INVALID_ARGUMENT) == bool(expected_bad), (
            f"{test}: expected violations {sorted(expected_bad)[:5]}, got {code}")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        reported = bad_request_fields(error)
        if len(expected_bad) > VIOLATIONS_REPORTED_MAX:
            # The status names the first violations and sums up the rest under "request",
            # so that its trailer stays within the clients' metadata limit.
            assert "request" in reported and reported - {"request"} <= expected_bad
        else:
            assert reported == expected_bad
    if before is not None and code != grpc.StatusCode.OK:
        assert engine.digest() == before, f"{test}: a rejected request changed the database"
    return response


# -- every RPC, fuzzed ----------------------------------------------------------------------------

sample = st.integers(0, 3).map(lambda n: n == 0)  # about one rejected example in four is digested


@FUZZ
@given(transfers=batch_of(transfers_), digest=sample)
def test_create_transfers(fuzz_engine, transfers, digest):
    response = call(fuzz_engine, "CreateTransfers",
                    lambda: fuzz_engine.stub.CreateTransfers(
                        pb.CreateTransfersRequest(transfers=transfers), timeout=CALL_TIMEOUT_SECONDS),
                    transfer_violations(transfers), digest)
    if response is not None:
        assert [r.index for r in response.results] == list(range(len(transfers)))
        assert all(r.result != pb.TRANSFER_RESULT_UNSPECIFIED for r in response.results)


@FUZZ
@given(accounts=batch_of(accounts_), digest=sample)
def test_create_accounts(fuzz_engine, accounts, digest):
    response = call(fuzz_engine, "CreateAccounts",
                    lambda: fuzz_engine.stub.CreateAccounts(
                        pb.CreateAccountsRequest(accounts=accounts), timeout=CALL_TIMEOUT_SECONDS),
                    account_violations(accounts), digest)
    if response is not None:
        assert [r.index for r in response.results] == list(range(len(accounts)))
        assert all(r.result != pb.ACCOUNT_RESULT_UNSPECIFIED for r in response.results)


@FUZZ
@given(rpc=st.sampled_from(["LookupAccounts", "LookupTransfers", "CloseAccounts", "ReopenAccounts"]),
       values=batch_of(ids()), digest=sample)
def test_id_list_rpcs(fuzz_engine, rpc, values, digest):
    request = {"LookupAccounts": pb.LookupAccountsRequest, "LookupTransfers": pb.LookupTransfersRequest,
               "CloseAccounts": pb.CloseAccountsRequest,
               "ReopenAccounts": pb.ReopenAccountsRequest}[rpc](ids=values)
    response = call(fuzz_engine, rpc,
                    lambda: getattr(fuzz_engine.stub, rpc)(request, timeout=CALL_TIMEOUT_SECONDS),
                    id_violations(values), digest)
    if response is not None and rpc in ("CloseAccounts", "ReopenAccounts"):
        assert [r.index for r in response.results] == list(range(len(values)))
    if rpc == "CloseAccounts" and response is not None:
        # Keep the known accounts usable for the other examples.
        fuzz_engine.stub.ReopenAccounts(pb.ReopenAccountsRequest(ids=KNOWN_IDS))


@FUZZ
@given(rpc=st.sampled_from(["GetAccountTransfers", "GetAccountBalances"]),
       account_filter=st.one_of(filters, st.none()), digest=sample)
def test_account_filter_rpcs(fuzz_engine, rpc, account_filter, digest):
    request_type = (pb.GetAccountTransfersRequest if rpc == "GetAccountTransfers"
                    else pb.GetAccountBalancesRequest)
    request = request_type() if account_filter is None else request_type(filter=account_filter)
    call(fuzz_engine, rpc,
         lambda: getattr(fuzz_engine.stub, rpc)(request, timeout=CALL_TIMEOUT_SECONDS),
         filter_violations(request.filter), digest)


@hsettings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(batches=st.lists(batch_of(transfers_, big_weight=80), min_size=0, max_size=4), digest=sample)
def test_stream_transfers(fuzz_engine, batches, digest):
    """A stream ends at its first malformed request, with that request's violations; the
    requests before it get their responses."""
    expected_bad: set[str] = set()
    valid_before = 0
    for batch in batches:
        bad = transfer_violations(batch)
        if bad:
            expected_bad = bad
            break
        valid_before += 1
    # The digest applies only when nothing before the malformed request could commit.
    check = digest and valid_before == 0
    responses = []

    def invoke():
        requests = iter([pb.StreamTransfersRequest(transfers=b) for b in batches])
        for response in fuzz_engine.stub.StreamTransfers(requests, timeout=CALL_TIMEOUT_SECONDS):
            responses.append(response)

    call(fuzz_engine, "StreamTransfers", invoke, expected_bad, check)
    assert len(responses) <= valid_before
    for response, batch in zip(responses, batches):
        assert len(response.results) == len(batch)


# -- raw bytes as the request body ----------------------------------------------------------------

def raw(engine, method: str):
    return engine.channel.unary_unary(SERVICE + method, request_serializer=None,
                                      response_deserializer=None)


VALID = pb.CreateTransfersRequest(transfers=[
    pb.Transfer(id=bytes(range(1, 17)), debit_account_id=b"\x01" * 16, credit_account_id=b"\x02" * 16,
                amount=5, ledger=1, code=1, user_data=b"ud")] * 2).SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@st.composite
def garbage(draw) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["random", "truncated", "unknown_field", "wrong_wire_type",
                                 "huge_length"]))
    if kind == "random":
        return kind, draw(st.binary(min_size=0, max_size=300))
    if kind == "truncated":
        return kind, VALID[:draw(st.integers(0, len(VALID) - 1))]
    if kind == "unknown_field":
        number = draw(st.integers(2, 2**29 - 1))
        payload = draw(st.binary(max_size=20))
        return kind, VALID + _varint(number << 3 | 2) + _varint(len(payload)) + payload
    if kind == "wrong_wire_type":
        # field 1 (repeated Transfer, wire type 2) sent as a varint / fixed64 / fixed32
        wire = draw(st.sampled_from([0, 1, 5]))
        body = {0: _varint(draw(st.integers(0, 2**64 - 1))), 1: b"\x00" * 8, 5: b"\x00" * 4}[wire]
        return kind, _varint(1 << 3 | wire) + body
    return kind, b"\x0a" + _varint(draw(st.integers(len(VALID), 2**32))) + VALID


REQUEST_TYPES = {"CreateTransfers": pb.CreateTransfersRequest, "CreateAccounts": pb.CreateAccountsRequest,
                 "LookupAccounts": pb.LookupAccountsRequest,
                 "GetAccountTransfers": pb.GetAccountTransfersRequest,
                 "CloseAccounts": pb.CloseAccountsRequest}
GARBAGE_METHODS = st.sampled_from(sorted(REQUEST_TYPES))


def _parses(method: str, body: bytes) -> bool:
    try:
        REQUEST_TYPES[method].FromString(body)
        return True
    except Exception:  # noqa: BLE001 - DecodeError and friends
        return False


def send_raw(engine, method: str, data: bytes, kind: str) -> tuple[grpc.StatusCode, str]:
    try:
        raw(engine, method)(data, timeout=CALL_TIMEOUT_SECONDS)
        code, message = grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        code, message = error.code(), error.details() or ""
    OBSERVED[f"garbage:{kind}"][f"{code.name}: {message[:60]}"] += 1
    return code, message


@hsettings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(method=GARBAGE_METHODS, body=garbage(), digest=sample)
def test_garbage_bodies_that_parse(fuzz_engine, method, body, digest):
    """Bytes that protobuf parses (unknown fields, lucky random bytes, truncations at a field
    boundary) are ordinary requests: a documented status, and a rejection changes nothing."""
    kind, data = body
    assume(_parses(method, data))
    before = fuzz_engine.digest() if digest else None
    code, message = send_raw(fuzz_engine, method, data, kind)
    assert code in ALLOWED, (kind, code, message)
    if before is not None and code != grpc.StatusCode.OK:
        assert fuzz_engine.digest() == before


@hsettings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(method=GARBAGE_METHODS, body=garbage(), digest=sample)
def test_garbage_bodies_that_do_not_parse(fuzz_engine, method, body, digest):
    """Bytes that are not a request message are a malformed request: INVALID_ARGUMENT (the
    README), never UNKNOWN or INTERNAL, and nothing changes.

    FAILS on this engine: grpc.aio's server runs the protobuf deserializer itself before any
    handler or interceptor, and a DecodeError there becomes UNKNOWN "Unexpected <class
    'google.protobuf.message.DecodeError'>: Error parsing message ..." . The engine registers
    the generated `FromString` deserializers as they are (ledger_pb2_grpc via
    engine/server/app.py); it needs its own deserializer that turns a DecodeError into a value
    the handler rejects with INVALID_ARGUMENT and a BadRequest."""
    kind, data = body
    assume(not _parses(method, data))
    before = fuzz_engine.digest() if digest else None
    code, message = send_raw(fuzz_engine, method, data, kind)
    if before is not None:
        assert fuzz_engine.digest() == before
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (
        f"unparseable {kind} body to {method} answered {code.name} {message!r}")


def test_garbage_body_that_parses_with_unknown_fields_is_served(fuzz_engine):
    """Unknown fields are skipped (proto3): the request is served like the valid one."""
    a, b = fuzz_engine.accounts[:2]
    message = pb.CreateTransfersRequest(transfers=[
        pb.Transfer(id=new_id(), debit_account_id=a, credit_account_id=b, amount=1, ledger=1, code=1)])
    body = message.SerializeToString() + _varint(77 << 3 | 2) + _varint(3) + b"abc"
    response = pb.CreateTransfersResponse.FromString(
        raw(fuzz_engine, "CreateTransfers")(body, timeout=CALL_TIMEOUT_SECONDS))
    assert [r.result for r in response.results] == [pb.TRANSFER_RESULT_OK]


# -- found by the fuzzer: big malformed batches ---------------------------------------------------

@pytest.mark.parametrize("bad_items", [1, 100, 400, BATCH_MAX])
def test_malformed_batch_is_invalid_argument_whatever_the_number_of_bad_items(fuzz_engine, bad_items):
    """A request with many malformed items is still INVALID_ARGUMENT with a BadRequest.

    FAILS from a few hundred bad items up: engine/server/errors.py `classify` puts one
    FieldViolation per bad field into the `grpc-status-details-bin` trailer, unbounded; beyond
    the client's metadata limit (grpc.max_metadata_size, 8 KiB soft / 16 KiB hard by default)
    the client drops the trailers and sees RESOURCE_EXHAUSTED "Stream removed (received
    metadata size exceeds hard limit ...)" instead: a malformed request reported as overload
    (and without RetryInfo), which a well-behaved client retries for ever."""
    a, b = fuzz_engine.accounts[:2]
    transfers = [pb.Transfer(id=new_id(), debit_account_id=a, credit_account_id=b, amount=1,
                             ledger=1, code=1) for _ in range(BATCH_MAX)]
    for t in transfers[:bad_items]:
        t.id = b"\x01" * 15
    before = fuzz_engine.digest()
    with pytest.raises(grpc.RpcError) as caught:
        fuzz_engine.stub.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers),
                                         timeout=CALL_TIMEOUT_SECONDS)
    assert fuzz_engine.digest() == before
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{error.code()}: {error.details()}"
    assert "transfers[0].id" in bad_request_fields(error)
