"""Versioned schema migrations.

Migrations are the numbered ``migrations/NNNN_name.sql`` files, applied in order, each in its
own transaction, under an advisory lock so that concurrent starts apply each exactly once.
Partitions are created per shard once the database's shard count is known; the count is fixed
when a database is first migrated.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import re

import asyncpg

from engine import limits

MIGRATION_LOCK_KEY = 0x7478_6D67  # "txmg"
_NAME_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
DEFAULT_SHARDS = 8
# Tables partitioned by LIST (shard), one partition per shard.
PARTITIONED_TABLES = ("accounts", "transfers", "account_balances")


class ShardCountMismatch(RuntimeError):
    """The database was created with a different number of shards."""


@dataclasses.dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations() -> list[Migration]:
    """The migrations shipped with this engine, in version order."""
    found = []
    for entry in importlib.resources.files("engine.storage.migrations").iterdir():
        match = _NAME_RE.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    # Numbers are unique and applied in order; a number may be unused.
    assert len({m.version for m in found}) == len(found), "two migrations share a number"
    return found


async def migrate(conn: asyncpg.Connection, shards: int | None) -> tuple[list[int], int]:
    """Apply pending migrations; returns (versions applied now, the database's shard count)."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for migration in migrations():
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                    migration.version, migration.name,
                )
            applied.append(migration.version)
        shard_count = await _ensure_shards(conn, shards)
        await _ensure_partitions(conn, shard_count)
        return applied, shard_count
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _ensure_shards(conn: asyncpg.Connection, shards: int | None) -> int:
    stored = await conn.fetchval("SELECT value FROM ledger_meta WHERE key = 'shard_count'")
    if stored is not None:
        if shards is not None and shards != int(stored):
            raise ShardCountMismatch(
                f"the database has {stored} shards; --shards {shards} cannot change that"
            )
        return int(stored)
    count = shards if shards is not None else DEFAULT_SHARDS
    assert 1 <= count <= limits.SHARDS_MAX
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO ledger_meta (key, value) VALUES ('shard_count', $1)", str(count)
        )
        await conn.execute(
            "INSERT INTO shards (shard) SELECT generate_series(0, $1 - 1)", count
        )
    return count


async def _ensure_partitions(conn: asyncpg.Connection, shard_count: int) -> None:
    """One partition per shard of every partitioned table (also of tables added later)."""
    async with conn.transaction():
        for table in PARTITIONED_TABLES:
            for shard in range(shard_count):
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {table}_s{shard} "
                    f"PARTITION OF {table} FOR VALUES IN ({shard})"
                )
