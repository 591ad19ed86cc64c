"""The security matrix: mutual TLS, bearer tokens, entitlements, rate limits, the audit trail,
correlation ids and secrets in logs, against a real engine served with TLS on loopback, as the
least-privileged runtime database role."""
from __future__ import annotations

import asyncio
import datetime
import hashlib
import subprocess
import sys
import urllib.parse
import uuid

import asyncpg
import grpc
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2, status_pb2

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.security import certs
from engine.security.audit import verify
from engine.server import app as app_module
from engine.storage.migrate import migrate
from tests.harness import ROOT, EngineProcess, account, transfer

ISSUER = "https://issuer.test"
AUDIENCE = "txengine-test"
PAYMENTS = "spiffe://txengine.dev/payments"
REPORTS = "spiffe://txengine.dev/reports"
RUNTIME_LOGIN = "txengine_test_app"
POLICY = f"""
[defaults]
requests_per_second = 0

[principals."{PAYMENTS}"]
rpcs = ["*"]
ledgers = [1]
account_codes = [10]

[principals."{REPORTS}"]
rpcs = ["*"]

[principals."svc-limited"]
rpcs = ["CreateTransfers", "LookupAccounts"]
requests_per_second = 5
burst_seconds = 1

[principals."svc-free"]
rpcs = ["*"]

[principals."svc-single"]
rpcs = ["*"]
concurrent_rpcs_max = 1

[principals."svc-readonly"]
rpcs = ["LookupAccounts"]

[principals."svc-ledger2"]
rpcs = ["*"]
ledgers = [2]
"""


@pytest.fixture(scope="module")
def material(tmp_path_factory) -> dict:
    """Certificates of a development CA and of a foreign one, an RSA token key pair, a policy."""
    out = tmp_path_factory.mktemp("security")
    paths = certs.make_development_set(out, ["localhost", "127.0.0.1"], ["payments", "reports"])
    foreign = certs.make_ca("another CA")
    paths["rogue"], paths["rogue-key"] = certs.write(
        out / "foreign", "payments", certs.issue_client(foreign, "payments"))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    (out / "jwt-public.pem").write_bytes(public_pem)
    (out / "policy.toml").write_text(POLICY)
    return {"paths": paths, "dir": out, "jwt_key": key, "jwt_public_pem": public_pem}


def token(material, subject: str, **overrides) -> str:
    now = datetime.datetime.now(datetime.timezone.utc)
    claims = {"sub": subject, "iss": ISSUER, "aud": AUDIENCE, "iat": now,
              "exp": now + datetime.timedelta(minutes=5), **overrides}
    return jwt.encode(claims, material["jwt_key"], algorithm="RS256")


async def runtime_url(database_url: str) -> str:
    """Migrate as the owner, then a login role that is a member of txengine_runtime only."""
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn, 4)
        exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", RUNTIME_LOGIN)
        if not exists:
            try:
                await conn.execute(f"CREATE ROLE {RUNTIME_LOGIN} LOGIN IN ROLE txengine_runtime")
            except asyncpg.DuplicateObjectError:
                pass
    finally:
        await conn.close()
    parts = urllib.parse.urlsplit(database_url)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{RUNTIME_LOGIN}@"))


@pytest_asyncio.fixture
async def secure_app(settings, material):
    paths = material["paths"]
    app = await app_module.start(settings.model_copy(update={
        "database_url": await runtime_url(settings.database_url),
        "migration_database_url": settings.database_url,
        "tls_cert": paths["server"], "tls_key": paths["server-key"], "tls_client_ca": paths["ca"],
        "auth_jwt_keys": material["dir"] / "jwt-public.pem", "auth_jwt_issuer": ISSUER,
        "auth_jwt_audience": AUDIENCE, "policy_file": material["dir"] / "policy.toml",
    }))
    yield app
    await app.stop(0)


def credentials(material, client: str | None = "payments") -> grpc.ChannelCredentials:
    paths = material["paths"]
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=paths["ca"].read_bytes())
    return grpc.ssl_channel_credentials(
        root_certificates=paths["ca"].read_bytes(), private_key=paths[f"{client}-key"].read_bytes(),
        certificate_chain=paths[client].read_bytes())


def secure_stub(app, material, client: str | None = "payments"):
    channel = grpc.aio.secure_channel(app.address, credentials(material, client),
                                      options=[("grpc.ssl_target_name_override", "localhost")])
    return channel, ledger_pb2_grpc.LedgerServiceStub(channel)


def bearer(value: str) -> tuple:
    return (("authorization", f"Bearer {value}"),)


def details(error: grpc.aio.AioRpcError, kind):
    for key, value in error.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(kind.DESCRIPTOR):
                    message = kind()
                    detail.Unpack(message)
                    return message
    return None


# -- transport -------------------------------------------------------------------------------

async def test_plaintext_against_the_tls_port_fails(secure_app):
    async with grpc.aio.insecure_channel(secure_app.address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[]), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("client", [None, "rogue"], ids=["no-client-certificate",
                                                         "certificate-from-another-ca"])
async def test_the_handshake_refuses_clients_without_a_trusted_certificate(secure_app, material,
                                                                           client):
    channel, stub = secure_stub(secure_app, material, client)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account()]), timeout=5)
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_trusted_client_certificate_is_the_principal(secure_app, material, db):
    channel, stub = secure_stub(secure_app, material, "payments")
    async with channel:
        reply = await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account(code=10)]))
    assert reply.results[0].result == pb.ACCOUNT_RESULT_OK
    row = await db.fetchrow("SELECT principal, rpc, outcome FROM audit_log ORDER BY seq DESC LIMIT 1")
    assert tuple(row) == (PAYMENTS, "CreateAccounts", "OK")


# -- tokens ----------------------------------------------------------------------------------

def _bad_tokens(material) -> dict[str, str]:
    past = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1)
    public_pem = material["jwt_public_pem"]
    hs256_with_public_key = _forge_hs256(public_pem)
    unsigned = jwt.encode({"sub": "svc-free", "iss": ISSUER, "aud": AUDIENCE,
                           "exp": past + datetime.timedelta(hours=2)}, None, algorithm="none")
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "expired": token(material, "svc-free", exp=past),
        "wrong-audience": token(material, "svc-free", aud="another-service"),
        "wrong-issuer": token(material, "svc-free", iss="https://elsewhere.test"),
        "alg-none": unsigned,
        "hs256-signed-with-the-public-key": hs256_with_public_key,
        "signed-by-another-key": jwt.encode(
            {"sub": "svc-free", "iss": ISSUER, "aud": AUDIENCE,
             "exp": past + datetime.timedelta(hours=2)}, other_key, algorithm="RS256"),
        "garbage": "not.a.token",
    }


def _forge_hs256(public_pem: bytes) -> str:
    """The algorithm-confusion attack: an HS256 token whose HMAC key is the server's public key
    (PyJWT refuses to build one, so it is assembled by hand)."""
    import base64
    import hashlib
    import hmac
    import json
    import time

    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": "svc-free", "iss": ISSUER, "aud": AUDIENCE,
                              "exp": int(time.time()) + 600}).encode())
    signature = b64(hmac.new(public_pem, header + b"." + payload, hashlib.sha256).digest())
    return (header + b"." + payload + b"." + signature).decode()


@pytest.mark.parametrize("kind", ["expired", "wrong-audience", "wrong-issuer", "alg-none",
                                  "hs256-signed-with-the-public-key", "signed-by-another-key",
                                  "garbage"])
async def test_bad_tokens_are_unauthenticated_and_audited(secure_app, material, db, kind):
    bad = _bad_tokens(material)[kind]
    channel, stub = secure_stub(secure_app, material, "payments")
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account(code=10)]),
                                      metadata=bearer(bad))
    assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await db.fetchval("SELECT count(*) FROM accounts") == 0
    row = await db.fetchrow("SELECT rpc, outcome, detail FROM audit_log ORDER BY seq DESC LIMIT 1")
    assert (row["rpc"], row["outcome"]) == ("CreateAccounts", "UNAUTHENTICATED")
    assert bad not in row["detail"]


async def test_a_valid_token_names_the_principal(secure_app, material, db):
    channel, stub = secure_stub(secure_app, material, "payments")
    async with channel:
        await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account(code=99)]),
                                  metadata=bearer(token(material, "svc-free")))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account()]),
                                      metadata=bearer(token(material, "svc-readonly")))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        stream = stub.StreamTransfers(iter([pb.CreateTransfersRequest()]),
                                      metadata=bearer(token(material, "svc-readonly")))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            [r async for r in stream]
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    rows = await db.fetch("SELECT principal, rpc, outcome FROM audit_log ORDER BY seq")
    assert [tuple(r) for r in rows] == [
        ("svc-free", "CreateAccounts", "OK"),
        ("svc-readonly", "CreateAccounts", "PERMISSION_DENIED"),
        ("svc-readonly", "StreamTransfers", "PERMISSION_DENIED")]


# -- entitlements ----------------------------------------------------------------------------

async def _accounts(stub, *codes: int, metadata=None) -> list[bytes]:
    made = [account(code=code) for code in codes]
    reply = await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=made), metadata=metadata)
    assert all(r.result == pb.ACCOUNT_RESULT_OK for r in reply.results)
    return [a.id for a in made]


async def test_one_unentitled_item_rejects_the_whole_batch(secure_app, material, db):
    reports_channel, reports = secure_stub(secure_app, material, "reports")
    channel, payments = secure_stub(secure_app, material, "payments")
    async with reports_channel, channel:
        outsider, = await _accounts(reports, 20)
        a, b = await _accounts(payments, 10, 10)
        before = await db.fetchval("SELECT count(*) FROM transfers")
        batch = [transfer(a, b, 5), transfer(b, a, 1), transfer(a, outsider, 1), transfer(a, b, 2)]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await payments.CreateTransfers(pb.CreateTransfersRequest(transfers=batch))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "transfers[2].credit_account_id" in raised.value.details()
        assert details(raised.value, error_details_pb2.ErrorInfo).reason == "NOT_ENTITLED"
        assert await db.fetchval("SELECT count(*) FROM transfers") == before == 0

        # The same through the stream: the unentitled request ends it, nothing of it applied.
        stream = payments.StreamTransfers()
        await stream.write(pb.CreateTransfersRequest(transfers=[transfer(a, b, 1)]))
        first = await stream.read()
        assert first.results[0].result == pb.TRANSFER_RESULT_OK
        await stream.write(pb.CreateTransfersRequest(transfers=[transfer(outsider, b, 1)]))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stream.read()
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await db.fetchval("SELECT count(*) FROM transfers") == 1

        # A post that names no accounts is checked against its pending transfer's.
        hold = transfer(outsider, outsider, 3)  # never created: the accounts must differ
        pending = transfer(a, b, 3, flags=pb.TRANSFER_FLAGS_PENDING)
        reply = await payments.CreateTransfers(pb.CreateTransfersRequest(transfers=[pending]))
        assert reply.results[0].result == pb.TRANSFER_RESULT_OK
        post = pb.Transfer(id=uuid.uuid4().bytes, pending_id=pending.id,
                           flags=pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER)
        reply = await payments.CreateTransfers(pb.CreateTransfersRequest(transfers=[post]))
        assert reply.results[0].result == pb.TRANSFER_RESULT_OK
        unknown_post = pb.Transfer(id=uuid.uuid4().bytes, pending_id=hold.id,
                                   flags=pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await payments.CreateTransfers(pb.CreateTransfersRequest(transfers=[unknown_post]))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # Creating an account of a code or ledger outside the entitlement is refused too.
        for bad in (account(code=20), account(code=10, ledger=2)):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await payments.CreateAccounts(pb.CreateAccountsRequest(accounts=[account(), bad]))
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await db.fetchval("SELECT count(*) FROM accounts") == 3


async def test_lookups_outside_the_entitlement_return_nothing(secure_app, material):
    reports_channel, reports = secure_stub(secure_app, material, "reports")
    channel, payments = secure_stub(secure_app, material, "payments")
    async with reports_channel, channel:
        x, y = await _accounts(reports, 20, 21)
        a, = await _accounts(payments, 10)
        theirs = transfer(x, y, 7)
        ours = transfer(x, a, 1)  # touches one entitled account: visible to payments
        await reports.CreateTransfers(pb.CreateTransfersRequest(transfers=[theirs, ours]))

        found = await payments.LookupAccounts(pb.LookupAccountsRequest(ids=[x, a, y]))
        assert [acc.id for acc in found.accounts] == [a]
        found = await payments.LookupTransfers(pb.LookupTransfersRequest(ids=[theirs.id, ours.id]))
        assert [t.id for t in found.transfers] == [ours.id]
        query = pb.AccountFilter(account_id=x, limit=10, flags=pb.ACCOUNT_FILTER_FLAGS_DEBITS
                                 | pb.ACCOUNT_FILTER_FLAGS_CREDITS)
        got = await payments.GetAccountTransfers(pb.GetAccountTransfersRequest(filter=query))
        assert list(got.transfers) == []
        got = await reports.GetAccountTransfers(pb.GetAccountTransfersRequest(filter=query))
        assert len(got.transfers) == 2
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await payments.CloseAccounts(pb.CloseAccountsRequest(ids=[x]))
        assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_events_follow_the_entitlement(secure_app, material):
    """The event stream and webhooks carry every account of a ledger: a principal entitled to
    some accounts cannot follow them, one entitled to some ledgers sees only those ledgers'
    events, and eventually consistent lookups are filtered like strong ones."""
    reports_channel, reports = secure_stub(secure_app, material, "reports")
    channel, payments = secure_stub(secure_app, material, "payments")
    ledger2 = bearer(token(material, "svc-ledger2"))
    async with reports_channel, channel:
        x, y = await _accounts(reports, 20, 21)
        a, = await _accounts(payments, 10)
        two = [account(ledger=2, code=30) for _ in range(2)]
        await reports.CreateAccounts(pb.CreateAccountsRequest(accounts=two))
        await reports.CreateTransfers(pb.CreateTransfersRequest(transfers=[
            transfer(x, y, 3), transfer(two[0].id, two[1].id, 4, ledger=2)]))

        for call in (lambda: _read_events(payments),
                     lambda: payments.CreateWebhookSubscription(
                         pb.CreateWebhookSubscriptionRequest(url="http://127.0.0.1:9/h",
                                                             secret=b"k" * 16)),
                     lambda: reports.CreateWebhookSubscription(
                         pb.CreateWebhookSubscriptionRequest(url="http://127.0.0.1:9/h",
                                                             secret=b"k" * 16),
                         metadata=ledger2)):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call()
            assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED

        seen = await _read_events(reports, metadata=ledger2)
        assert seen and {e.account.ledger or e.transfer.ledger for e in seen} == {2}
        everything = await _read_events(reports)
        assert {e.account.ledger or e.transfer.ledger for e in everything} == {1, 2}

        found = await payments.LookupAccounts(pb.LookupAccountsRequest(
            ids=[x, a], consistency=pb.CONSISTENCY_EVENTUAL))
        assert [acc.id for acc in found.accounts] == [a]


async def _read_events(stub, metadata=None) -> list:
    """The events already committed: SubscribeEvents from the start, read until a pause."""
    call = stub.SubscribeEvents(pb.SubscribeEventsRequest(), metadata=metadata)
    events = []
    try:
        while True:
            try:
                response = await asyncio.wait_for(call.read(), 1.0)
            except asyncio.TimeoutError:
                return events
            events.extend(response.events)
    finally:
        call.cancel()


# -- rate limits -----------------------------------------------------------------------------

async def test_one_principal_is_rate_limited_while_another_is_not(secure_app, material):
    channel, stub = secure_stub(secure_app, material, "reports")
    limited = bearer(token(material, "svc-limited"))
    free = bearer(token(material, "svc-free"))
    async with channel:
        async def call(metadata):
            try:
                await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[]), metadata=metadata)
                return None
            except grpc.aio.AioRpcError as error:
                return error

        limited_calls = [call(limited) for _ in range(40)]
        free_calls = [call(free) for _ in range(40)]
        outcomes = await asyncio.gather(*limited_calls, *free_calls)
    refused = [e for e in outcomes[:40] if e is not None]
    assert 0 < len(refused) <= 40 - 5
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        retry = details(error, error_details_pb2.RetryInfo)
        assert retry is not None and retry.retry_delay.ToNanoseconds() > 0
    assert outcomes[40:] == [None] * 40


async def test_a_principal_has_at_most_its_concurrent_rpcs(secure_app, material):
    channel, stub = secure_stub(secure_app, material, "reports")
    single = bearer(token(material, "svc-single"))
    async with channel:
        a, b = await _accounts(stub, 20, 20)
        stream = stub.StreamTransfers(metadata=single)
        await stream.write(pb.CreateTransfersRequest(transfers=[transfer(a, b, 1)]))
        assert (await stream.read()).results[0].result == pb.TRANSFER_RESULT_OK
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # the open stream is its one RPC
            await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[a]), metadata=single)
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(raised.value, error_details_pb2.RetryInfo) is not None
        found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[a]))  # another principal
        assert len(found.accounts) == 1
        await stream.done_writing()
        assert await stream.read() == grpc.aio.EOF
        assert await stream.code() == grpc.StatusCode.OK
        found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[a]), metadata=single)
        assert len(found.accounts) == 1


# -- audit trail -----------------------------------------------------------------------------

async def test_the_runtime_role_cannot_change_the_audit_trail(secure_app, material, settings):
    channel, stub = secure_stub(secure_app, material, "payments")
    async with channel:
        await _accounts(stub, 10)
    runtime = await asyncpg.connect(secure_app.settings.database_url)
    try:
        assert await runtime.fetchval("SELECT current_user") == RUNTIME_LOGIN
        for statement in ("UPDATE audit_log SET outcome = 'OK'", "DELETE FROM audit_log",
                          "TRUNCATE audit_log", "DROP TABLE audit_log"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await runtime.execute(statement)
    finally:
        await runtime.close()
    owner = await asyncpg.connect(settings.database_url)
    try:  # even the owner goes through the append-only trigger
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await owner.execute("DELETE FROM audit_log")
    finally:
        await owner.close()


async def test_tampering_with_one_audit_row_is_detected(secure_app, material, settings):
    channel, stub = secure_stub(secure_app, material, "payments")
    async with channel:
        for _ in range(3):
            await _accounts(stub, 10)
    owner = await asyncpg.connect(settings.database_url)
    try:
        result = await verify(owner)
        assert result.intact and result.rows == 3
        # An attacker with the owner's rights switches the triggers off and rewrites history.
        await owner.execute("SET session_replication_role = replica")
        await owner.execute("UPDATE audit_log SET principal = 'someone-else' WHERE seq = 2")
        result = await verify(owner)
        assert not result.intact and result.rows == 1 and "seq 2" in result.problem
    finally:
        await owner.close()
    verified = subprocess.run(
        [sys.executable, "-m", "engine", "audit", "verify", "--database-url", settings.database_url],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert verified.returncode == 1 and "TAMPERED" in verified.stdout


async def test_a_removed_audit_row_is_detected(secure_app, material, settings):
    channel, stub = secure_stub(secure_app, material, "payments")
    async with channel:
        for _ in range(3):
            await _accounts(stub, 10)
    owner = await asyncpg.connect(settings.database_url)
    try:
        await owner.execute("SET session_replication_role = replica")
        await owner.execute("DELETE FROM audit_log WHERE seq = 2")
        result = await verify(owner)
        assert not result.intact and "seq 2 is missing" in result.problem
    finally:
        await owner.close()


# -- correlation ids ---------------------------------------------------------------------------

async def test_the_correlation_id_is_stored_with_each_transfer(stub, db):
    a, b = account(), account()
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[a, b]))
    first = [transfer(a.id, b.id, 1), transfer(b.id, a.id, 1)]
    call = stub.CreateTransfers(pb.CreateTransfersRequest(transfers=first),
                                metadata=(("x-correlation-id", "order-4711"),))
    await call
    assert ("x-correlation-id", "order-4711") in tuple(await call.trailing_metadata())
    second = transfer(a.id, b.id, 1)
    call = stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[second]))
    await call
    generated = dict(await call.trailing_metadata())["x-correlation-id"]
    streamed = [transfer(a.id, b.id, 1) for _ in range(2)]
    stream = stub.StreamTransfers(iter([pb.CreateTransfersRequest(transfers=[t]) for t in streamed]),
                                  metadata=(("x-correlation-id", "batch-file-9"),))
    assert len([r async for r in stream]) == 2
    rows = await db.fetch("SELECT transfer_id, correlation_id FROM transfer_correlation")
    assert {r["transfer_id"].bytes: r["correlation_id"] for r in rows} == {
        first[0].id: "order-4711", first[1].id: "order-4711", second.id: generated,
        streamed[0].id: "batch-file-9", streamed[1].id: "batch-file-9"}


# -- secrets in logs ---------------------------------------------------------------------------

def test_logs_contain_no_secret(material, database_url, redis_url):
    paths = material["paths"]
    password = "pg-" + uuid.uuid4().hex
    parts = urllib.parse.urlsplit(database_url)
    with_password = urllib.parse.urlunsplit(parts._replace(netloc=f"postgres:{password}@"))
    engine = EngineProcess(with_password, redis_url, extra_env={
        "TXENGINE_LOG_LEVEL": "debug", "TXENGINE_TLS_CERT": str(paths["server"]),
        "TXENGINE_TLS_KEY": str(paths["server-key"]), "TXENGINE_TLS_CLIENT_CA": str(paths["ca"]),
        "TXENGINE_AUTH_JWT_KEYS": str(material["dir"] / "jwt-public.pem"),
        "TXENGINE_AUTH_JWT_ISSUER": ISSUER, "TXENGINE_AUTH_JWT_AUDIENCE": AUDIENCE,
        "TXENGINE_POLICY_FILE": str(material["dir"] / "policy.toml"),
    })
    engine.start()
    good, bad = token(material, "svc-free"), _bad_tokens(material)["expired"]
    try:
        channel = grpc.secure_channel(engine.address, credentials(material),
                                      options=[("grpc.ssl_target_name_override", "localhost")])
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account()]), metadata=bearer(good))
        with pytest.raises(grpc.RpcError):
            stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account()]),
                                metadata=bearer(bad))
        channel.close()
    finally:
        assert engine.terminate() == 0
    logs = "\n".join(engine.lines)
    assert '"rpc refused"' in logs and "svc-free" in logs
    key_body = b"".join(paths["server-key"].read_bytes().splitlines()[1:-1]).decode()
    for secret in (password, good, bad, good.split(".")[2], key_body[:40]):
        assert secret not in logs


# -- the SDK and streams -----------------------------------------------------------------------

async def test_the_sdk_speaks_mutual_tls_with_a_token(secure_app, material, db):
    from txengine_client import Account, AsyncClient, ClientOptions

    paths = material["paths"]
    options = ClientOptions(root_certificates=paths["ca"], certificate_chain=paths["payments"],
                            private_key=paths["payments-key"], server_name_override="localhost",
                            token=token(material, "svc-free"))
    async with AsyncClient(secure_app.address, options=options) as client:
        made = Account(ledger=1, code=10)
        [result] = await client.create_accounts([made])
        assert result.is_ok_or_exists
        assert [a.id for a in await client.lookup_accounts([made.id])] == [made.id]
    assert await db.fetchval("SELECT principal FROM audit_log") == "svc-free"


async def test_every_message_of_a_stream_is_audited(secure_app, material, db):
    channel, stub = secure_stub(secure_app, material, "payments")
    async with channel:
        a, b = await _accounts(stub, 10, 10)
        requests = [pb.CreateTransfersRequest(transfers=[transfer(a, b, 1)]) for _ in range(3)]
        replies = [r async for r in stub.StreamTransfers(iter(requests))]
    assert len(replies) == 3
    rows = await db.fetch("SELECT rpc, outcome, request_digest FROM audit_log "
                          "WHERE rpc = 'StreamTransfers' ORDER BY seq")
    assert [(r["rpc"], r["outcome"], r["request_digest"]) for r in rows] == [
        ("StreamTransfers", "OK", hashlib.sha256(q.SerializeToString()).digest())
        for q in requests]
