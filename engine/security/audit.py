"""The audit trail: an append-only, hash-chained record of every mutating request and of every
authentication or authorization failure.

Each record holds the principal, the RPC, the correlation id, the SHA-256 digest of the
request's wire bytes, the outcome (the gRPC status name) and the time. Its ``hash`` is
``SHA-256(prev_hash || canonical encoding of the record)``, so changing, inserting or removing
a row breaks the chain from there on; ``txengine audit verify`` recomputes it. In Postgres the
table refuses UPDATE, DELETE and TRUNCATE (a trigger), and the engine's runtime role is granted
only SELECT and INSERT on it (migration 0003).

Records are written by one writer task with group commit: concurrent records share one
transaction, which takes a transaction-scoped advisory lock and reads the chain's tail, so
several engine processes on one database extend one chain. The RPC of a mutating request waits
for its record: an acknowledged write always has its audit record.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import struct

import asyncpg
import structlog

from engine.observability import metrics

log = structlog.get_logger("engine.security")

AUDIT_LOCK_KEY = 0x7478_6175  # "txau": serializes writers of the chain
GENESIS_HASH = bytes(32)
RECORDS_PER_FLUSH_MAX = 4_096
# Records waiting for the writer; beyond this, callers are refused (UNAVAILABLE) rather than
# held in memory without bound.
QUEUE_RECORDS_MAX = 65_536
DETAIL_CHARS_MAX = 512
VERIFY_ROWS_PER_FETCH = 10_000
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
COLUMNS = ("seq", "at", "principal", "rpc", "correlation_id", "request_digest", "outcome",
           "detail", "prev_hash", "hash")


class AuditUnavailable(Exception):
    """The audit record could not be written; the request must not be acknowledged."""


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    principal: str
    rpc: str
    correlation_id: str
    request_digest: bytes
    outcome: str
    detail: str = ""
    at: datetime.datetime = dataclasses.field(
        default_factory=lambda: datetime.datetime.now(datetime.timezone.utc))


def _field(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def chain_hash(prev_hash: bytes, seq: int, at: datetime.datetime, principal: str, rpc: str,
               correlation_id: str, request_digest: bytes, outcome: str, detail: str) -> bytes:
    """The hash of one record: every field length-prefixed, so no two records encode alike."""
    at_us = (at - EPOCH) // datetime.timedelta(microseconds=1)
    payload = b"".join((
        struct.pack(">qq", seq, at_us), _field(principal), _field(rpc), _field(correlation_id),
        _field(request_digest), _field(outcome), _field(detail)))
    return hashlib.sha256(prev_hash + payload).digest()


def digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


class AuditTrail:
    """The single writer of this process's audit records (see module docstring)."""

    def __init__(self, url: str):
        self.url = url
        self._queue: asyncio.Queue[tuple[AuditRecord, asyncio.Future]] = asyncio.Queue(
            QUEUE_RECORDS_MAX)
        self._conn: asyncpg.Connection | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(AuditUnavailable("the audit writer stopped"))
        if self._conn is not None and not self._conn.is_closed():
            self._conn.terminate()

    async def record(self, record: AuditRecord) -> None:
        """Append a record; returns once it is committed (raises AuditUnavailable if not)."""
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((dataclasses.replace(
                record, detail=record.detail[:DETAIL_CHARS_MAX]), future))
        except asyncio.QueueFull:
            raise AuditUnavailable("the audit writer is behind; retry later") from None
        await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < RECORDS_PER_FLUSH_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._flush([r for r, _ in batch])
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the writer must outlive a failed flush
                metrics.AUDIT_FAILURES.inc()
                log.warning("audit flush failed", error=type(error).__name__, records=len(batch))
                if self._conn is not None and not self._conn.is_closed():
                    self._conn.terminate()
                self._conn = None
                for _, future in batch:
                    if not future.done():
                        future.set_exception(AuditUnavailable(f"audit write failed: {error}"))
                continue
            metrics.AUDIT_RECORDS.inc(len(batch))
            for _, future in batch:
                if not future.done():
                    future.set_result(None)

    async def _flush(self, records: list[AuditRecord]) -> None:
        if self._conn is None or self._conn.is_closed():
            from engine.storage.store import connect

            self._conn = await connect(self.url)
        conn = self._conn
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", AUDIT_LOCK_KEY)
            tail = await conn.fetchrow("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            seq, prev = (tail["seq"], tail["hash"]) if tail else (0, GENESIS_HASH)
            rows = []
            for r in records:
                seq += 1
                row_hash = chain_hash(prev, seq, r.at, r.principal, r.rpc, r.correlation_id,
                                      r.request_digest, r.outcome, r.detail)
                rows.append((seq, r.at, r.principal, r.rpc, r.correlation_id, r.request_digest,
                             r.outcome, r.detail, prev, row_hash))
                prev = row_hash
            await conn.copy_records_to_table("audit_log", records=rows, columns=COLUMNS)


@dataclasses.dataclass(frozen=True)
class Verification:
    rows: int
    problem: str | None  # the first break in the chain, None when intact

    @property
    def intact(self) -> bool:
        return self.problem is None


async def verify(conn: asyncpg.Connection) -> Verification:
    """Recompute the whole chain in seq order; report the first row that does not fit."""
    prev, expected_seq, rows = GENESIS_HASH, 1, 0
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        async for r in conn.cursor(f"SELECT {', '.join(COLUMNS)} FROM audit_log ORDER BY seq",
                                   prefetch=VERIFY_ROWS_PER_FETCH):
            if r["seq"] != expected_seq:
                return Verification(rows, f"seq {expected_seq} is missing (next row is seq {r['seq']})")
            if r["prev_hash"] != prev:
                return Verification(rows, f"seq {r['seq']}: prev_hash does not match seq {r['seq'] - 1}")
            recomputed = chain_hash(prev, r["seq"], r["at"], r["principal"], r["rpc"],
                                    r["correlation_id"], r["request_digest"], r["outcome"],
                                    r["detail"])
            if recomputed != r["hash"]:
                return Verification(rows, f"seq {r['seq']}: contents do not match its hash")
            prev, expected_seq, rows = r["hash"], expected_seq + 1, rows + 1
    return Verification(rows, None)
