"""The `txengine` command: serve, migrate, and operational subcommands.

Every flag of `serve` also reads TXENGINE_<FLAG> (see engine.config.Settings); a flag given on
the command line wins over the environment.
"""
from __future__ import annotations

import argparse
import asyncio
import sys

import uvloop

from engine.config import Settings
from engine.observability import logs


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--listen", help="gRPC address HOST:PORT [TXENGINE_LISTEN, 127.0.0.1:50051]")
    parser.add_argument("--database-url", help="Postgres URL [TXENGINE_DATABASE_URL, embedded]")
    parser.add_argument("--redis-url", help="Redis URL [TXENGINE_REDIS_URL, embedded]")
    parser.add_argument("--data-dir", help="embedded services' data [TXENGINE_DATA_DIR, .data]")
    parser.add_argument("--shards", type=int, help="shards of a new database [TXENGINE_SHARDS, 8]")
    parser.add_argument("--lease-wait-seconds", type=float,
                        help="wait this long for another process to release the shards [30]")
    parser.add_argument("--unsafe-no-durability", action="store_true", default=None,
                        help="run on fsync=off/synchronous_commit=off (storage benchmarks only)")
    parser.add_argument("--migration-database-url",
                        help="Postgres URL of the role that owns the schema and runs migrations "
                             "[TXENGINE_MIGRATION_DATABASE_URL, --database-url]")
    parser.add_argument("--log-level", help="debug, info, warning, error [TXENGINE_LOG_LEVEL]")
    parser.add_argument("--log-format", help="json, console or auto [TXENGINE_LOG_FORMAT]")


def settings_from(args: argparse.Namespace) -> Settings:
    fields = Settings.model_fields
    given = {name: value for name, value in vars(args).items()
             if name in fields and value is not None}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    from engine.server.app import serve

    settings = settings_from(args)
    logs.configure(settings.log_level, settings.log_format)
    uvloop.run(serve(settings))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from engine.server.app import database_url
    from engine.storage.migrate import migrate
    from engine.storage.store import connect

    settings = settings_from(args)
    logs.configure(settings.log_level, settings.log_format)

    async def run() -> None:
        embedded: list = []
        conn = await connect(settings.migration_database_url or database_url(settings, embedded))
        try:
            applied, shards = await migrate(conn, settings.shards)
        finally:
            await conn.close()
        print(f"migrations applied now: {applied or 'none'}; shards: {shards}")

    asyncio.run(run())
    return 0


def _add_security_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (README: Security)")
    group.add_argument("--tls-cert", help="PEM server certificate chain [TXENGINE_TLS_CERT]")
    group.add_argument("--tls-key", help="PEM server private key [TXENGINE_TLS_KEY]")
    group.add_argument("--tls-client-ca",
                       help="PEM CA of client certificates; set: they are required "
                            "[TXENGINE_TLS_CLIENT_CA]")
    group.add_argument("--auth-jwt-keys",
                       help="PEM public key or JWKS file verifying bearer tokens "
                            "[TXENGINE_AUTH_JWT_KEYS]")
    group.add_argument("--auth-jwt-algorithm", help="the accepted JWT algorithm [RS256]")
    group.add_argument("--auth-jwt-issuer", help="required token issuer [TXENGINE_AUTH_JWT_ISSUER]")
    group.add_argument("--auth-jwt-audience",
                       help="required token audience [TXENGINE_AUTH_JWT_AUDIENCE]")
    group.add_argument("--policy-file",
                       help="entitlements and rate limits (TOML) [TXENGINE_POLICY_FILE]")
    group.add_argument("--audit", action=argparse.BooleanOptionalAction, default=None,
                       help="write the audit trail [on when clients authenticate]")


def _certs(args: argparse.Namespace) -> int:
    import pathlib

    from engine.security.certs import make_development_set

    out = pathlib.Path(args.out)
    paths = make_development_set(out, args.host or ["localhost", "127.0.0.1", "::1"],
                                 args.client or ["client"])
    for role, path in paths.items():
        print(f"{role:>16}  {path}")
    print(f"\nserve:  txengine serve --tls-cert {paths['server']} --tls-key {paths['server-key']} "
          f"--tls-client-ca {paths['ca']}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from engine.security.audit import verify
    from engine.server.app import database_url
    from engine.storage.store import connect

    settings = settings_from(args)

    async def run():
        embedded: list = []
        conn = await connect(database_url(settings, embedded))
        try:
            return await verify(conn)
        finally:
            await conn.close()

    result = asyncio.run(run())
    if result.intact:
        print(f"audit trail intact: {result.rows} records")
        return 0
    print(f"audit trail TAMPERED after {result.rows} intact records: {result.problem}")
    return 1


def _quiet(run):
    """Benchmarks print their own report; the engine inside them logs warnings only."""

    def run_quietly(args: argparse.Namespace) -> int:
        logs.configure("warning", "auto")
        return run(args)

    return run_quietly


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="txengine", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the gRPC API (applies migrations first)")
    _add_settings_flags(serve)
    serve.add_argument("--metrics-listen",
                       help="serve Prometheus /metrics on HOST:PORT [TXENGINE_METRICS_LISTEN, off]")
    _add_security_flags(serve)
    serve.set_defaults(run=_serve)
    migrate = commands.add_parser("migrate", help="apply schema migrations and exit")
    _add_settings_flags(migrate)
    migrate.set_defaults(run=_migrate)
    certs = commands.add_parser(
        "certs", help="write a development CA, a server certificate and client certificates")
    certs.add_argument("--out", default=".data/certs", help="directory [.data/certs]")
    certs.add_argument("--host", action="append",
                       help="server DNS name or IP (repeatable) [localhost, 127.0.0.1, ::1]")
    certs.add_argument("--client", action="append",
                       help="client certificate name (repeatable) [client]")
    certs.set_defaults(run=_certs)
    audit = commands.add_parser("audit", help="audit trail operations")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_commands.add_parser("verify", help="recompute the audit hash chain; exit 1 "
                                                      "if any record was changed or removed")
    _add_settings_flags(verify)
    verify.set_defaults(run=_audit_verify)
    bench = commands.add_parser("bench", help="measure batched CreateTransfers throughput")
    from engine import bench as bench_module

    bench_module.add_arguments(bench)
    bench.set_defaults(run=_quiet(bench_module.main))
    bench_security = commands.add_parser(
        "bench-security", help="throughput and latency with TLS, tokens, policy and audit on")
    from engine.security import bench as security_bench

    security_bench.add_arguments(bench_security)
    bench_security.set_defaults(run=_quiet(security_bench.main))
    bench_fees = commands.add_parser(
        "bench-fees", help="fee kernel legs/s vs its reference; fee vs plain transfers end to end")
    from engine.fees import bench as bench_fees_module

    bench_fees_module.add_arguments(bench_fees)
    bench_fees.set_defaults(run=_quiet(bench_fees_module.main))
    capacity = commands.add_parser(
        "capacity", help="stepped load, knee, sizing model and a report (Markdown + PNG)")
    from engine import capacity as capacity_module

    capacity_module.add_arguments(capacity)
    capacity.set_defaults(run=_quiet(capacity_module.main))
    events_bench = commands.add_parser(
        "events-bench", help="event publication lag under load, and catch-up after a Redis outage")
    from engine.events import bench as events_bench_module

    events_bench_module.add_arguments(events_bench)
    events_bench.set_defaults(run=_quiet(events_bench_module.main))
    args = parser.parse_args(argv)
    sys.exit(args.run(args))
