"""`txengine bench-security`: what security costs, measured in one run on one embedded
Postgres (fsync and synchronous_commit on).

Each mode serves the same engine with more of the security layer on:

* ``plaintext`` — the default: no TLS, no authentication, no policy, no audit;
* ``mtls-audit`` — mutual TLS (the principal from the client certificate), a policy that
  restricts the principal to its ledger and account codes (every item checked), and the audit
  trail (one record per request, committed before the answer);
* ``mtls-token-audit`` — the same plus a verified RS256 bearer token on every call.

In each mode two loads run, from a separate process with every request serialized before the
clock starts: one transfer per RPC from many concurrent callers, and batched CreateTransfers
(8,190 transfers per request) on a few concurrent callers. It prints transfers/s and exact
p50/p99 latencies per mode and load, and the ratio to plaintext.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import multiprocessing
import pathlib
import tempfile
import time
import uuid

import numpy as np

ACCOUNT_CODE = 10
BATCH_TRANSFERS = 8_190
ISSUER, AUDIENCE = "https://issuer.bench", "txengine-bench"
MODES = ("plaintext", "mtls-audit", "mtls-token-audit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=8.0, help="load time of each run [8]")
    parser.add_argument("--callers", type=int, default=128,
                        help="concurrent one-transfer callers [128]")
    parser.add_argument("--batch-callers", type=int, default=2,
                        help="concurrent batched callers [2]")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds over every mode, in turn; the median is reported [2]")


def _transfers(account_ids: list[bytes], count: int, seed: int) -> list:
    from engine.gen.txengine.v1 import ledger_pb2 as pb

    rng = np.random.default_rng(seed)
    pairs = rng.integers(0, len(account_ids), size=(count, 2))
    pairs[pairs[:, 0] == pairs[:, 1], 1] = (pairs[pairs[:, 0] == pairs[:, 1], 1] + 1) % len(account_ids)
    return [pb.Transfer(id=uuid.uuid4().bytes, debit_account_id=account_ids[d],
                        credit_account_id=account_ids[c], amount=1, ledger=1, code=1)
            for d, c in pairs.tolist()]


def _load(job: dict, out) -> None:
    """The load generator process: serialize, then send for `seconds`, record latencies."""
    import grpc

    from engine.gen.txengine.v1 import ledger_pb2 as pb

    async def main() -> dict:
        credentials = job["credentials"]
        options = [("grpc.max_send_message_length", 8 * 1024 * 1024),
                   ("grpc.ssl_target_name_override", "localhost")]
        if credentials is None:
            channel = grpc.aio.insecure_channel(job["address"], options=options)
        else:
            channel = grpc.aio.secure_channel(job["address"], grpc.ssl_channel_credentials(
                *credentials), options=options)
        call = channel.unary_unary("/txengine.v1.LedgerService/CreateTransfers",
                                   request_serializer=None,
                                   response_deserializer=pb.CreateTransfersResponse.FromString)
        metadata = (("authorization", f"Bearer {job['token']}"),) if job["token"] else None
        per_request = job["batch"]
        bodies = [pb.CreateTransfersRequest(transfers=_transfers(
            job["accounts"], per_request, seed=job["seed"] * 1_000_003 + i)).SerializeToString()
            for i in range(job["requests"])]
        latencies: list[float] = []
        deadline = time.monotonic() + job["seconds"]
        cursor = iter(bodies)

        async def caller() -> None:
            for body in cursor:
                if time.monotonic() >= deadline:
                    return
                began = time.perf_counter()
                await call(body, metadata=metadata)
                latencies.append(time.perf_counter() - began)

        began = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(job["callers"])))
        elapsed = time.monotonic() - began
        await channel.close()
        return {"latencies": latencies, "elapsed": elapsed, "items": len(latencies) * per_request}

    out.put(asyncio.run(main()))


def _measure(job: dict) -> dict:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    process = context.Process(target=_load, args=(job, out))
    process.start()
    result = out.get()
    process.join()
    latencies_ms = np.array(result["latencies"]) * 1000
    return {"transfers_per_second": result["items"] / result["elapsed"],
            "p50_ms": float(np.percentile(latencies_ms, 50)),
            "p99_ms": float(np.percentile(latencies_ms, 99)), "requests": len(latencies_ms)}


async def _run(args: argparse.Namespace) -> list[dict]:
    import grpc
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from engine.config import Settings
    from engine.gen.txengine.v1 import ledger_pb2 as pb
    from engine.gen.txengine.v1 import ledger_pb2_grpc
    from engine.security import certs
    from engine.server import app as app_module
    from engine.storage.embedded import EmbeddedPostgres

    work = pathlib.Path(tempfile.mkdtemp(prefix="txengine-bench-security-"))
    postgres = await asyncio.to_thread(EmbeddedPostgres, work)
    paths = certs.make_development_set(work / "certs", ["localhost", "127.0.0.1"], ["bench"])
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (work / "jwt.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    (work / "policy.toml").write_text(
        '[principals."spiffe://txengine.dev/bench"]\nrpcs = ["*"]\nledgers = [1]\n'
        f'account_codes = [{ACCOUNT_CODE}]\n[principals."bench-token"]\nrpcs = ["*"]\n'
        f'ledgers = [1]\naccount_codes = [{ACCOUNT_CODE}]\n')
    now = datetime.datetime.now(datetime.timezone.utc)
    token = jwt.encode({"sub": "bench-token", "iss": ISSUER, "aud": AUDIENCE,
                        "exp": now + datetime.timedelta(hours=2)}, key, algorithm="RS256")
    client_credentials = (paths["ca"].read_bytes(), paths["bench-key"].read_bytes(),
                          paths["bench"].read_bytes())
    rows = []
    for number, mode in [(n, m) for _ in range(args.rounds) for n, m in enumerate(MODES)]:
        name = f"bench_security_{number}_{uuid.uuid4().hex[:6]}"
        await asyncio.to_thread(postgres._server.psql, f"CREATE DATABASE {name};")
        secured = mode != "plaintext"
        settings = Settings(
            listen="127.0.0.1:0", database_url=postgres._server.get_uri(name),
            data_dir=work, log_level="warning",
            **({"tls_cert": paths["server"], "tls_key": paths["server-key"],
                "tls_client_ca": paths["ca"], "policy_file": work / "policy.toml"}
               if secured else {}),
            **({"auth_jwt_keys": work / "jwt.pem", "auth_jwt_issuer": ISSUER,
                "auth_jwt_audience": AUDIENCE} if mode == "mtls-token-audit" else {}))
        app = await app_module.start(settings)
        try:
            accounts = [pb.Account(id=uuid.uuid4().bytes, ledger=1, code=ACCOUNT_CODE)
                        for _ in range(args.accounts)]
            credentials = grpc.ssl_channel_credentials(*client_credentials) if secured else None
            metadata = (("authorization", f"Bearer {token}"),) if mode == "mtls-token-audit" else None
            channel = (grpc.aio.secure_channel(app.address, credentials, options=[
                ("grpc.ssl_target_name_override", "localhost")]) if secured
                else grpc.aio.insecure_channel(app.address))
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            for start in range(0, len(accounts), BATCH_TRANSFERS):
                await stub.CreateAccounts(pb.CreateAccountsRequest(
                    accounts=accounts[start:start + BATCH_TRANSFERS]), metadata=metadata)
            await channel.close()
            ids = [a.id for a in accounts]
            base = {"address": app.address, "accounts": ids, "seconds": args.seconds,
                    "credentials": client_credentials if secured else None,
                    "token": token if mode == "mtls-token-audit" else None}
            await asyncio.to_thread(_measure, {  # warm-up, not reported
                **base, "seconds": 1.0, "callers": 2, "batch": 1_000, "requests": 20,
                "seed": 7})
            for load, callers, batch, requests in (
                    ("one transfer per RPC", args.callers, 1, int(args.seconds * 6_000)),
                    (f"batched {BATCH_TRANSFERS:,}", args.batch_callers, BATCH_TRANSFERS,
                     int(args.seconds * 12) + 2 * args.batch_callers)):
                result = await asyncio.to_thread(_measure, {
                    **base, "callers": callers, "batch": batch, "requests": requests,
                    "seed": number * 10 + len(rows)})
                rows.append({"mode": mode, "load": load, "callers": callers, **result})
                print(f"  {mode:<17} {load:<22} {result['transfers_per_second']:>10,.0f}/s "
                      f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms", flush=True)
        finally:
            await app.stop(0)
    return rows


def _medians(rows: list[dict]) -> list[dict]:
    """One row per mode and load: the median of each figure over the rounds."""
    keys = list(dict.fromkeys((r["mode"], r["load"]) for r in rows))
    merged = []
    for mode, load in keys:
        runs = [r for r in rows if (r["mode"], r["load"]) == (mode, load)]
        merged.append({**runs[0], **{name: float(np.median([r[name] for r in runs]))
                                     for name in ("transfers_per_second", "p50_ms", "p99_ms")}})
    return merged


def main(args: argparse.Namespace) -> int:
    print("txengine bench-security: embedded Postgres, fsync and synchronous_commit on; "
          "load from a separate process")
    rows = _medians(asyncio.run(_run(args)))
    plain = {r["load"]: r for r in rows if r["mode"] == "plaintext"}
    print(f"\nmedian of {args.rounds} rounds")
    print(f"{'mode':<17} {'load':<22} {'callers':>7} {'transfers/s':>12} {'p50 ms':>8} "
          f"{'p99 ms':>8} {'vs plaintext':>12}")
    for r in rows:
        ratio = r["transfers_per_second"] / plain[r["load"]]["transfers_per_second"]
        print(f"{r['mode']:<17} {r['load']:<22} {r['callers']:>7} "
              f"{r['transfers_per_second']:>12,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
              f"{ratio:>11.0%}")
    return 0
