"""Postgres access: the writer connection with its shard lease, and a pool for reads.

Ids travel as raw 16-byte ``bytes`` (a binary codec for ``uuid``), so no UUID objects are built
on the hot path. Nothing above this module writes SQL.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
from typing import TYPE_CHECKING

import asyncpg

from engine.storage.migrate import migrate

if TYPE_CHECKING:
    from engine.observability.stages import StageTimes

LEASE_LOCK_CLASS = 0x7478_6C73  # "txls": advisory lock class of shard leases
FEE_SCHEDULE_LOCK_CLASS = 0x7478_6673  # "txfs": advisory lock class of fee schedule versions

ACCOUNT_COLUMNS = (
    "shard", "id", "ledger", "code", "flags", "debits_pending", "debits_posted",
    "credits_pending", "credits_posted", "user_data", "timestamp",
)
# Columns of a transfer as the API returns it, in Transfer field order.
TRANSFER_FIELDS = (
    "id", "debit_account_id", "credit_account_id", "amount", "pending_id", "ledger", "code",
    "flags", "timeout_seconds", "user_data", "timestamp",
)
# A transfer as the engine keeps it: the API fields, then the state of a pending transfer.
TRANSFER_STATE = (*TRANSFER_FIELDS, "pending_status", "expires_at")
TRANSFER_COLUMNS = ("shard", *TRANSFER_STATE, "seq_shard", "seq")
ACCOUNT_FIELDS = ACCOUNT_COLUMNS[1:]
# One row per committed request that stored transfers: its timestamps and correlation id.
REQUEST_LOG_COLUMNS = ("timestamp_min", "timestamp_max", "correlation_id")
FEE_TRANSFER_COLUMNS = ("id", "schedule_id", "schedule_version", "refund_of", "debit_account_id",
                        "credit_account_id", "ledger", "amount", "slots", "amounts", "timestamp")
BALANCE_COLUMNS = ("shard", "account_id", "timestamp", "debits_pending", "debits_posted",
                   "credits_pending", "credits_posted")

DURABLE_SYNCHRONOUS_COMMIT = {"on", "remote_apply", "remote_write", "local"}


class StorageUnavailable(Exception):
    """Postgres cannot be reached or a transaction failed for a reason other than the input."""


class FencingLost(StorageUnavailable):
    """Another process took over a shard: this process must not commit any more."""


class UnsafeDurability(RuntimeError):
    """Postgres is configured so that a commit may be lost; the engine refuses to run on it."""


@dataclasses.dataclass(frozen=True)
class AccountQuery:
    """A validated AccountFilter; timestamp bounds are inclusive and always set."""

    account_id: bytes
    timestamp_min: int
    timestamp_max: int
    limit: int
    debits: bool
    credits: bool
    reversed: bool
    code: int = 0
    user_data: bytes | None = None


@dataclasses.dataclass(frozen=True)
class OutboxRow:
    """One commit's row of event_outbox (see migration 0004)."""

    commit_timestamp: int
    first_timestamp: int
    transfer_count: int
    transfer_balances: bytes
    other_events: bytes


@dataclasses.dataclass
class BatchWrite:
    """Everything one commit writes, in storage-row form."""

    new_accounts: list[tuple]  # ACCOUNT_COLUMNS
    flag_updates: tuple[list, list, list]  # (shard, id, flags) columns of accounts closed/reopened
    # (shard, id, debits_pending, debits_posted, credits_pending, credits_posted) columns
    balance_updates: tuple[list, list, list, list, list, list]
    transfers_copy: bytes | None  # binary COPY stream of transfers rows (TRANSFER_COLUMNS)
    # (shard, id, pending_status) columns of committed pending transfers that changed state
    pending_updates: tuple[list, list, list]
    history: list[tuple]  # BALANCE_COLUMNS
    last_seq: dict[int, int]
    last_timestamp: int
    requests: list[tuple] = dataclasses.field(default_factory=list)  # REQUEST_LOG_COLUMNS
    outbox: OutboxRow | None = None  # None when the commit changed nothing
    fee_records: list[tuple] = dataclasses.field(default_factory=list)  # FEE_TRANSFER_COLUMNS


@dataclasses.dataclass
class ShardLease:
    """The shards this process owns, each with its fencing epoch and committed position."""

    epochs: dict[int, int]
    last_seq: dict[int, int]
    last_timestamp: int


async def _init_connection(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "uuid", schema="pg_catalog", encoder=bytes, decoder=bytes, format="binary"
    )


# A writer transaction never waits on its client; one that does belongs to a stalled process,
# and Postgres ends it so that the shard rows it holds are released to the next owner.
IDLE_IN_TRANSACTION_MS = 10_000


def _connect_kwargs() -> dict:
    return {
        "server_settings": {"synchronous_commit": "on", "application_name": "txengine",
                            "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS)},
        "init": _init_connection,
        "statement_cache_size": 256,
    }


async def connect(url: str, timeout_seconds: float = 10.0) -> asyncpg.Connection:
    kwargs = _connect_kwargs()
    init = kwargs.pop("init")
    conn = await asyncpg.connect(url, timeout=timeout_seconds, **kwargs)
    await init(conn)
    return conn


async def check_durability(conn: asyncpg.Connection, allow_unsafe: bool) -> dict[str, str]:
    """Refuse to run on a Postgres that may lose a committed transaction."""
    settings = {
        name: await conn.fetchval(f"SHOW {name}")
        for name in ("fsync", "synchronous_commit", "full_page_writes")
    }
    unsafe = settings["fsync"] != "on" or settings["synchronous_commit"] not in DURABLE_SYNCHRONOUS_COMMIT
    if unsafe and not allow_unsafe:
        raise UnsafeDurability(
            f"Postgres runs with fsync={settings['fsync']}, synchronous_commit="
            f"{settings['synchronous_commit']}: acknowledged transfers could be lost. "
            "Fix the server settings, or pass --unsafe-no-durability for storage benchmarks."
        )
    return settings


def _untimed(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class Store:
    """The engine's storage: migrations, the shard lease, the batch writer and the readers."""

    def __init__(self, url: str, *, pool_size: int, allow_unsafe: bool,
                 migration_url: str | None = None):
        self.url = url
        # Migrations run as the role that owns the schema; serving needs less (see 0003).
        self.migration_url = migration_url or url
        self.pool_size = pool_size
        self.allow_unsafe = allow_unsafe
        self.shard_count = 0
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._writer: asyncpg.Connection | None = None
        self._lease_conn: asyncpg.Connection | None = None
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool | None:
        """The read pool (None until open)."""
        return self._pool

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, shards: int | None) -> None:
        conn = await connect(self.migration_url)
        try:
            await check_durability(conn, self.allow_unsafe)
            _, self.shard_count = await migrate(conn, shards)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.url, min_size=1, max_size=self.pool_size, **_connect_kwargs()
        )

    async def close(self) -> None:
        for conn in (self._writer, self._lease_conn):
            if conn is not None and not conn.is_closed():
                conn.terminate()
        self._writer = self._lease_conn = None
        if self._pool is not None:
            self._pool.terminate()
            self._pool = None

    async def acquire_lease(self, wait_seconds: float) -> ShardLease:
        """Take every shard: advisory locks held by a dedicated session, then a new epoch per
        shard. A commit made under an older epoch fails, so a stale owner cannot write."""
        await self.drop_writer()
        self._lease_conn = await connect(self.url)
        self._writer = await connect(self.url)
        shards = list(range(self.shard_count))
        deadline = asyncio.get_running_loop().time() + wait_seconds
        while True:
            got = await self._lease_conn.fetchval(
                "SELECT bool_and(pg_try_advisory_lock($1, s)) FROM unnest($2::int[]) AS s",
                LEASE_LOCK_CLASS, shards,
            )
            if got:
                break
            await self._lease_conn.execute("SELECT pg_advisory_unlock_all()")
            if asyncio.get_running_loop().time() >= deadline:
                raise StorageUnavailable("the shards are owned by another engine process")
            await asyncio.sleep(0.2)
        # A stalled previous owner may still hold the shard rows in an open transaction
        # (sessions end such transactions after IDLE_IN_TRANSACTION_MS); wait for the rows no
        # longer than the lease wait that remains.
        remaining_ms = max(1, int((deadline - asyncio.get_running_loop().time()) * 1000))
        async with self._writer.transaction():
            await self._writer.execute(f"SET LOCAL lock_timeout = {remaining_ms}")
            try:
                rows = await self._writer.fetch(
                    """UPDATE shards SET epoch = epoch + 1, owner = $1, leased_at = now()
                       WHERE shard = ANY($2::int[])
                       RETURNING shard, epoch, last_seq, last_timestamp""",
                    self.owner, shards,
                )
            except asyncpg.LockNotAvailableError as error:
                raise StorageUnavailable("the shards are held by a stalled engine process") from error
        assert len(rows) == self.shard_count
        return ShardLease(
            epochs={r["shard"]: r["epoch"] for r in rows},
            last_seq={r["shard"]: r["last_seq"] for r in rows},
            last_timestamp=max(r["last_timestamp"] for r in rows),
        )

    async def drop_writer(self) -> None:
        for conn in (self._writer, self._lease_conn):
            if conn is not None and not conn.is_closed():
                conn.terminate()
        self._writer = self._lease_conn = None

    # -- the writer ------------------------------------------------------------------------

    async def load_accounts(self, shards: list[int], ids: list[bytes]) -> list[asyncpg.Record]:
        assert self._writer is not None
        return await self._writer.fetch(
            f"""SELECT {', '.join(f'a.{c}' for c in ACCOUNT_COLUMNS)}
                FROM unnest($1::int[], $2::uuid[]) AS k(shard, id)
                JOIN accounts a ON a.shard = k.shard AND a.id = k.id""",
            shards, ids,
        )

    async def load_transfers(self, shards: list[int], ids: list[bytes]) -> list[asyncpg.Record]:
        """Committed transfers by id, with their pending state (TRANSFER_STATE)."""
        assert self._writer is not None
        return await self._writer.fetch(
            f"""SELECT {', '.join(f't.{c}' for c in TRANSFER_STATE)}
                FROM unnest($1::int[], $2::uuid[]) AS k(shard, id)
                JOIN transfers t ON t.shard = k.shard AND t.id = k.id""",
            shards, ids,
        )

    async def expiring_transfers(self, now: int, limit: int,
                                 since: int = 0) -> list[asyncpg.Record]:
        """Open reservations whose expiry is at or before `now` (and at or after `since`),
        oldest first."""
        assert self._writer is not None
        return await self._writer.fetch(
            f"""SELECT {', '.join(TRANSFER_STATE)} FROM transfers
                WHERE pending_status = 1 AND expires_at > 0 AND expires_at <= $1
                  AND expires_at >= $3
                ORDER BY expires_at LIMIT $2""",
            now, limit, since,
        )

    async def next_expiry(self) -> int:
        """The earliest expiry of an open reservation, or 0 when none can lapse."""
        assert self._writer is not None
        value = await self._writer.fetchval(
            "SELECT min(expires_at) FROM transfers WHERE pending_status = 1 AND expires_at > 0"
        )
        return value or 0

    async def write_batch(self, lease: ShardLease, batch: BatchWrite,
                          stages: StageTimes | None = None) -> None:
        """Write one batch in one transaction, fenced by the lease's epochs; `stages` times
        the statements that grow with the batch (stages.WRITE_PARTS)."""
        part = stages.stage if stages is not None else _untimed
        conn = self._writer
        assert conn is not None
        async with conn.transaction():
            fenced = await conn.execute(
                """UPDATE shards SET last_seq = u.seq, last_timestamp = $1
                   FROM unnest($2::int[], $3::bigint[], $4::bigint[]) AS u(shard, epoch, seq)
                   WHERE shards.shard = u.shard AND shards.epoch = u.epoch""",
                batch.last_timestamp, list(lease.epochs), list(lease.epochs.values()),
                [batch.last_seq[s] for s in lease.epochs],
            )
            if fenced != f"UPDATE {len(lease.epochs)}":
                raise FencingLost("a shard was taken over by another engine process")
            if batch.new_accounts:
                await conn.copy_records_to_table(
                    "accounts", records=batch.new_accounts, columns=ACCOUNT_COLUMNS
                )
            if batch.flag_updates[0]:
                await conn.execute(
                    """UPDATE accounts AS a SET flags = u.flags
                       FROM unnest($1::int[], $2::uuid[], $3::int[]) AS u(shard, id, flags)
                       WHERE a.shard = u.shard AND a.id = u.id""",
                    *batch.flag_updates,
                )
            balance_updates = batch.balance_updates
            if balance_updates[0]:
                with part("write_balances"):
                    await conn.execute(
                        """UPDATE accounts AS a SET debits_pending = u.dp, debits_posted = u.dpo,
                                  credits_pending = u.cp, credits_posted = u.cpo
                           FROM unnest($1::int[], $2::uuid[], $3::bigint[], $4::bigint[],
                                       $5::bigint[], $6::bigint[]) AS u(shard, id, dp, dpo, cp, cpo)
                           WHERE a.shard = u.shard AND a.id = u.id""",
                        *balance_updates,
                    )
            if batch.transfers_copy is not None:
                with part("write_transfers"):
                    await conn.copy_to_table(
                        "transfers", source=memoryview(batch.transfers_copy),
                        columns=TRANSFER_COLUMNS, format="binary",
                    )
            if batch.pending_updates[0]:
                await conn.execute(
                    """UPDATE transfers AS t SET pending_status = u.status
                       FROM unnest($1::int[], $2::uuid[], $3::smallint[]) AS u(shard, id, status)
                       WHERE t.shard = u.shard AND t.id = u.id""",
                    *batch.pending_updates,
                )
            if batch.history:
                await conn.copy_records_to_table(
                    "account_balances", records=batch.history, columns=BALANCE_COLUMNS
                )
            if batch.requests:
                await conn.copy_records_to_table(
                    "request_log", records=batch.requests, columns=REQUEST_LOG_COLUMNS
                )
            if batch.outbox is not None:
                await conn.execute(
                    """INSERT INTO event_outbox (commit_timestamp, first_timestamp, transfer_count,
                                                 transfer_balances, other_events)
                       VALUES ($1, $2, $3, $4, $5)""",
                    *dataclasses.astuple(batch.outbox),
                )
            if batch.fee_records:
                await conn.copy_records_to_table(
                    "fee_transfers", records=batch.fee_records, columns=FEE_TRANSFER_COLUMNS
                )

    # -- readers ---------------------------------------------------------------------------

    async def lookup_accounts(self, shards: list[int], ids: list[bytes]) -> list[asyncpg.Record]:
        assert self._pool is not None
        return await self._pool.fetch(
            f"""SELECT {', '.join(f'a.{c}' for c in ACCOUNT_FIELDS)}
                FROM unnest($1::int[], $2::uuid[]) WITH ORDINALITY AS k(shard, id, n)
                JOIN accounts a ON a.shard = k.shard AND a.id = k.id ORDER BY k.n""",
            shards, ids,
        )

    async def lookup_transfers(self, shards: list[int], ids: list[bytes]) -> list[asyncpg.Record]:
        assert self._pool is not None
        return await self._pool.fetch(
            f"""SELECT {', '.join(f't.{c}' for c in TRANSFER_FIELDS)}
                FROM unnest($1::int[], $2::uuid[]) WITH ORDINALITY AS k(shard, id, n)
                JOIN transfers t ON t.shard = k.shard AND t.id = k.id ORDER BY k.n""",
            shards, ids,
        )

    async def account_transfers(self, query: AccountQuery) -> list[asyncpg.Record]:
        """An account's transfers in timestamp order (newest first when reversed)."""
        assert self._pool is not None
        order = "DESC" if query.reversed else "ASC"
        conditions = ['"timestamp" >= $2', '"timestamp" <= $3']
        args: list = [query.account_id, query.timestamp_min, query.timestamp_max, query.limit]
        if query.code:
            args.append(query.code)
            conditions.append(f"code = ${len(args)}")
        if query.user_data is not None:
            args.append(query.user_data)
            conditions.append(f"user_data = ${len(args)}")
        where = " AND ".join(conditions)
        fields = ", ".join(TRANSFER_FIELDS)
        branches = [
            f"""(SELECT {fields} FROM transfers WHERE {side} = $1 AND {where}
                 ORDER BY "timestamp" {order} LIMIT $4)"""
            for side, wanted in (("debit_account_id", query.debits),
                                 ("credit_account_id", query.credits)) if wanted
        ]
        return await self._pool.fetch(
            f"""SELECT * FROM ({' UNION ALL '.join(branches)}) AS t
                ORDER BY "timestamp" {order} LIMIT $4""",
            *args,
        )

    async def account_balances(self, shard: int, query: AccountQuery) -> list[asyncpg.Record]:
        """Historical balances of a HISTORY account in timestamp order."""
        assert self._pool is not None
        order = "DESC" if query.reversed else "ASC"
        return await self._pool.fetch(
            f"""SELECT "timestamp", debits_pending, debits_posted, credits_pending, credits_posted
                FROM account_balances
                WHERE shard = $1 AND account_id = $2 AND "timestamp" BETWEEN $3 AND $4
                ORDER BY "timestamp" {order} LIMIT $5""",
            shard, query.account_id, query.timestamp_min, query.timestamp_max, query.limit,
        )

    # -- fee schedules -----------------------------------------------------------------------

    async def create_fee_schedule(self, schedule_id: bytes, definition: str, timestamp: int) -> int:
        """Store the next version of a schedule and return its number."""
        assert self._pool is not None
        async with self._pool.acquire() as conn, conn.transaction():
            # Concurrent creates of one id take turns, so versions are gap-free.
            await conn.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))",
                               FEE_SCHEDULE_LOCK_CLASS, schedule_id.hex())
            return await conn.fetchval(
                """INSERT INTO fee_schedules (id, version, definition, "timestamp")
                   SELECT $1, coalesce(max(version), 0) + 1, $2::jsonb, $3
                   FROM fee_schedules WHERE id = $1
                   RETURNING version""",
                schedule_id, definition, timestamp,
            )

    async def fee_schedules(self, keys: list[tuple[bytes, int]]) -> list[asyncpg.Record]:
        """The schedules named by (id, version) pairs; version 0 means the latest."""
        assert self._pool is not None
        return await self._pool.fetch(
            """SELECT DISTINCT ON (k.id, k.version) k.id AS key_id, k.version AS key_version,
                      s.id, s.version, s.definition::text AS definition, s."timestamp"
               FROM unnest($1::uuid[], $2::int[]) AS k(id, version)
               JOIN fee_schedules s ON s.id = k.id AND (k.version = 0 OR s.version = k.version)
               ORDER BY k.id, k.version, s.version DESC""",
            [k[0] for k in keys], [k[1] for k in keys],
        )

    async def list_fee_schedules(self, schedule_id: bytes | None, limit: int) -> list[asyncpg.Record]:
        """Every version of one schedule, or the latest version of each, in id order."""
        assert self._pool is not None
        if schedule_id is not None:
            return await self._pool.fetch(
                """SELECT id, version, definition::text AS definition, "timestamp"
                   FROM fee_schedules WHERE id = $1 ORDER BY version LIMIT $2""",
                schedule_id, limit)
        return await self._pool.fetch(
            """SELECT DISTINCT ON (id) id, version, definition::text AS definition, "timestamp"
               FROM fee_schedules ORDER BY id, version DESC LIMIT $1""", limit)

    async def fee_transfers(self, ids: list[bytes]) -> list[asyncpg.Record]:
        """Committed fee transfers and refunds by id."""
        assert self._pool is not None
        return await self._pool.fetch(
            f"SELECT {', '.join(FEE_TRANSFER_COLUMNS)} FROM fee_transfers WHERE id = ANY($1::uuid[])",
            ids)

    async def refunds_of(self, original_ids: list[bytes]) -> list[asyncpg.Record]:
        """Committed refunds of these fee transfers."""
        assert self._pool is not None
        return await self._pool.fetch(
            f"""SELECT {', '.join(FEE_TRANSFER_COLUMNS)} FROM fee_transfers
                WHERE refund_of = ANY($1::uuid[]) ORDER BY "timestamp"
            """, original_ids)

    async def ping(self) -> None:
        assert self._pool is not None
        await self._pool.fetchval("SELECT 1")
