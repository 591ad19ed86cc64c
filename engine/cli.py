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
        conn = await connect(database_url(settings, embedded))
        try:
            applied, shards = await migrate(conn, settings.shards)
        finally:
            await conn.close()
        print(f"migrations applied now: {applied or 'none'}; shards: {shards}")

    asyncio.run(run())
    return 0


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
    serve.set_defaults(run=_serve)
    migrate = commands.add_parser("migrate", help="apply schema migrations and exit")
    _add_settings_flags(migrate)
    migrate.set_defaults(run=_migrate)
    bench = commands.add_parser("bench", help="measure batched CreateTransfers throughput")
    from engine import bench as bench_module

    bench_module.add_arguments(bench)
    bench.set_defaults(run=_quiet(bench_module.main))
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
    args = parser.parse_args(argv)
    sys.exit(args.run(args))
