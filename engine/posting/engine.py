"""The posting engine: admission to bounded shard queues, and the group-commit loop.

Control plane only: it routes, batches and orders; the balance kernel does the arithmetic and
the store does the I/O. One commit loop owns every shard of the database (the shard lease),
so its in-memory balances are authoritative, and one Postgres transaction holds each batch:
cross-shard transfers are as atomic as single-shard ones.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import time
from collections.abc import Iterator

import asyncpg
import numpy as np
import structlog

from engine.config import Settings
from engine.events.codec import OutboxEvents
from engine.fees.expand import FeeExpander
from engine.ids import ZERO_ID, halves
from engine.kernels import _copy as copy
from engine.kernels import apply_transfers, shard_of, transfer_shard_items
from engine.kernels._copy import encode_binary_copy
from engine.observability import metrics
from engine.observability.correlation import CORRELATION_ID
from engine.observability.stages import StageTimes
from engine.posting.accounts import (AccountCache, AccountCacheFull, NewAccount, create_accounts,
                                     set_closed)
from engine.posting.batch import Outcome, Request, TransferColumns, shards_of
from engine.results import AccountFlags, TransferResult
from engine.storage.store import (TRANSFER_STATE, BatchWrite, ShardLease, StorageUnavailable,
                                  Store)

log = structlog.get_logger("engine.posting")

RECOVERY_BACKOFF_SECONDS = (0.05, 0.1, 0.2, 0.5, 1.0)
IDLE_WAKE_SECONDS_MAX = 1.0
# Failures of Postgres or of the connection to it; anything else in a commit is a defect.
# InternalClientError: asyncpg read a session's FATAL message before noticing the closed socket.
STORAGE_ERRORS = (StorageUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError,
                  asyncpg.InternalClientError, OSError, ConnectionError, TimeoutError)


class Overloaded(Exception):
    """A queue limit was hit; the caller should back off and retry."""


class Unavailable(Exception):
    """The engine cannot commit now (storage down, shard lease lost, shutting down)."""


class PostingEngine:
    """Admits requests, commits them in batches, and resolves each request after COMMIT."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self._queue: collections.deque[Request] = collections.deque()
        self._queued_items: collections.Counter[int] = collections.Counter()
        self._wakeup = asyncio.Event()
        self._accepting = False
        self._available = False
        self._task: asyncio.Task | None = None
        self._lease: ShardLease | None = None
        self._cache = AccountCache()
        self._clock_ns = 0
        self._now = 0  # the commit clock, read once per commit
        self._last_seq: dict[int, int] = {}
        self.stages = StageTimes()
        # The engine's commit clock in nanoseconds; replaceable so tests can move time.
        self.clock = time.time_ns
        self._next_expiry = 0
        self._lookup_commits_left = 0
        self.optimistic_conflicts = 0  # batches applied again after an id was found committed
        # The last timestamp of the last commit; readers of the event outbox wait on _committed.
        self.committed_timestamp = 0
        self._committed = asyncio.Event()
        self.fees = FeeExpander(store)

    @property
    def shard_count(self) -> int:
        return self.store.shard_count

    @property
    def available(self) -> bool:
        return self._available

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self._take_lease()
        self._accepting = True
        self._task = asyncio.create_task(self._run(), name="commit-loop")

    async def stop(self, grace_seconds: float) -> None:
        """Refuse new requests, let queued ones commit for up to grace_seconds, then stop."""
        self._accepting = False
        deadline = time.monotonic() + grace_seconds
        while (self._queue or self._busy) and time.monotonic() < deadline and self._available:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._fail(list(self._queue), Unavailable("the engine is shutting down"))
        self._queue.clear()

    async def _take_lease(self) -> None:
        self._lease = await self.store.acquire_lease(self.settings.lease_wait_seconds)
        self._cache = AccountCache()
        self._clock_ns = self._lease.last_timestamp
        self._last_seq = dict(self._lease.last_seq)
        self.committed_timestamp = self._clock_ns
        self._next_expiry = await self.store.next_expiry()
        self._available = True
        log.info("shards leased", shards=len(self._lease.epochs),
                 epoch=max(self._lease.epochs.values()), last_timestamp=self._clock_ns)

    async def _recover(self) -> None:
        """After a failed commit nothing in memory can be trusted: reconnect, take a new
        epoch, and rebuild the account cache from storage on demand."""
        self._available = False
        self._cache = AccountCache()
        attempt = 0
        while True:
            delay = RECOVERY_BACKOFF_SECONDS[min(attempt, len(RECOVERY_BACKOFF_SECONDS) - 1)]
            try:
                await self._take_lease()
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - the commit loop must outlive any failure
                log.warning("storage recovery failed", error=repr(error), retry_in_s=delay)
                await self.store.drop_writer()
            attempt += 1
            await asyncio.sleep(delay)

    # -- admission -------------------------------------------------------------------------

    async def create_transfers(self, transfers: TransferColumns) -> Outcome:
        """Apply a request; fee transfers and refunds first become their legs (engine/fees)."""
        if transfers.fee_schedule_ids is None:
            return await self._create_transfers(transfers)
        with self.stages.stage("fees"):
            expansion = await self.fees.expand(transfers)
        try:
            outcome = await self._create_transfers(expansion.columns)
        finally:
            expansion.release()
        return expansion.collapse(outcome)

    async def simulate(self, transfers: TransferColumns) -> tuple[Outcome, list[tuple]]:
        """A dry run: the results (timestamps 0) and the touched accounts' rows afterwards.

        The same fee expansion and balance kernel run in a scratch engine over the committed
        state loaded from storage; nothing is queued, cached or written."""
        expansion = await self.fees.expand(transfers) if transfers.fee_schedule_ids is not None \
            else None
        try:
            columns = expansion.columns if expansion is not None else transfers
            scratch = PostingEngine(self.store, self.settings)
            scratch._clock_ns = self._clock_ns
            scratch._now = max(self.clock(), self._clock_ns + 1)
            scratch._last_seq = dict(self._last_seq)
            request = Request(future=asyncio.get_running_loop().create_future(), shard_items={},
                              transfers=columns)
            committed = await scratch._load_transfers([request], pending_only=False)
            await scratch._load_accounts([request], committed)
            (outcome,) = scratch._apply_transfers([request], committed, _Writes(), remember=False)
        finally:
            if expansion is not None:
                expansion.release()
        outcome = Outcome(outcome.results, [0] * len(outcome.results))
        if expansion is not None:
            outcome = expansion.collapse(outcome)
        cache = scratch._cache
        touched = dict.fromkeys(columns.debit_ids + columns.credit_ids)
        accounts = [cache.row(cache.slot_of[i]) for i in touched if i in cache.slot_of]
        return outcome, accounts

    async def _create_transfers(self, transfers: TransferColumns) -> Outcome:
        return await self._submit(Request(
            future=asyncio.get_running_loop().create_future(),
            shard_items=transfer_shard_items(transfers.debit_ids, transfers.credit_ids,
                                             self.shard_count),
            transfers=transfers, correlation_id=CORRELATION_ID.get(),
        ))

    async def create_accounts(self, accounts: list[NewAccount]) -> Outcome:
        shards = shards_of([a.id for a in accounts], self.shard_count)
        return await self._submit(Request(
            future=asyncio.get_running_loop().create_future(),
            shard_items=_count(shards), accounts=accounts, account_shards=shards.tolist(),
        ))

    async def set_closed(self, ids: list[bytes], close: bool) -> Outcome:
        shards = shards_of(ids, self.shard_count)
        return await self._submit(Request(
            future=asyncio.get_running_loop().create_future(),
            shard_items=_count(shards), closures=ids, close=close,
        ))

    async def _submit(self, request: Request) -> Outcome:
        if request.items == 0:
            return Outcome([], [])
        if not self._accepting:
            raise Unavailable("the engine is not accepting requests (starting or shutting down)")
        if not self._available:
            raise Unavailable("storage is unavailable; retry with the same ids")
        limit = self.settings.shard_queue_items_max
        for shard, items in request.shard_items.items():
            if self._queued_items[shard] + items > limit:
                raise Overloaded(f"shard {shard} queue is full ({limit} items); retry later")
        self._queued_items.update(request.shard_items)
        self._queue.append(request)
        self._wakeup.set()
        return await asyncio.shield(request.future)

    def queue_depths(self) -> dict[int, int]:
        return dict(self._queued_items)

    async def wait_for_commit(self, after_timestamp: int, timeout_seconds: float) -> bool:
        """Wait until a commit later than after_timestamp, for at most timeout_seconds."""
        deadline = time.monotonic() + timeout_seconds
        while self.committed_timestamp <= after_timestamp:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for can lose a cancellation
                # that arrives as the wait ends, and a stopping task would then never stop.
                async with asyncio.timeout(left):
                    await self._committed.wait()
            except TimeoutError:
                return False
        return True

    async def wait_for_commits(self, after_timestamp: int, timeout_seconds: float,
                               gather_seconds: float) -> bool:
        """wait_for_commit, then gather_seconds more, so that a reader of the outbox takes the
        commits of that span in one read instead of one read per commit."""
        if not await self.wait_for_commit(after_timestamp, timeout_seconds):
            return False
        await asyncio.sleep(gather_seconds)
        return True

    # -- the commit loop -------------------------------------------------------------------

    _busy = False

    async def _run(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._idle_seconds()):  # see wait_for_commit
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            while self._queue or (self._available and self._expiry_due()):
                batch = self._take() if self._queue else []
                self._busy = True
                try:
                    await self._commit(batch)
                except STORAGE_ERRORS as error:
                    metrics.record_commit_failure("storage")
                    log.warning("commit failed", error=repr(error), requests=len(batch))
                    self._fail(batch, Unavailable(f"commit failed: {error}; retry with the same ids"))
                    await self._recover()
                except AccountCacheFull as error:
                    metrics.record_commit_failure("cache_full")
                    self._fail(batch, Overloaded(str(error)))
                    await self._recover()
                except Exception as error:  # a defect: report it, then rebuild state from storage
                    metrics.record_commit_failure("defect")
                    log.exception("commit crashed", requests=len(batch))
                    self._fail(batch, error)
                    await self._recover()
                finally:
                    self._busy = False

    def _idle_seconds(self) -> float:
        """How long the loop may sleep with nothing queued: until the next expiry, at most
        IDLE_WAKE_SECONDS_MAX so a moved clock is noticed."""
        if not self._next_expiry:
            return IDLE_WAKE_SECONDS_MAX
        wait = (self._next_expiry - self.clock()) / 1e9
        return min(max(wait, 0.001), IDLE_WAKE_SECONDS_MAX)

    def _take(self) -> list[Request]:
        """Requests in arrival order, up to commit_items_max items (at least one request)."""
        batch = [self._queue.popleft()]
        items = batch[0].items
        while self._queue and items + self._queue[0].items <= self.settings.commit_items_max:
            request = self._queue.popleft()
            items += request.items
            batch.append(request)
        for request in batch:
            self._queued_items.subtract(request.shard_items)
        return batch

    def _fail(self, batch: list[Request], error: Exception) -> None:
        for request in batch:
            if not request.future.done():
                request.future.set_exception(error)

    def _stamp(self, count: int) -> int:
        """First of `count` commit timestamps: unique, strictly increasing, never behind the
        last committed one whatever the wall clock does. A commit reads the clock once, so
        its timestamps are consecutive from that reading."""
        base = max(self._now, self._clock_ns + 1)
        self._clock_ns = base + count - 1
        return base

    def _expiry_due(self) -> bool:
        return self._next_expiry != 0 and max(self.clock(), self._clock_ns + 1) >= self._next_expiry

    async def _commit(self, batch: list[Request]) -> None:
        """Commit a batch, assuming first that its transfer ids are new (no lookup of them).

        Most ids are new, and Postgres' primary key proves it: a committed id makes the COPY
        fail and the batch is applied again with every id looked up, so the results are those
        of the lookup path. Items that fail at or after the existence step are looked up before
        the write, since their result would be EXISTS* if their id were committed."""
        if self._lookup_commits_left:
            self._lookup_commits_left -= 1
            await self._commit_once(batch, optimistic=False)
            return
        last_seq = dict(self._last_seq)
        try:
            await self._commit_once(batch, optimistic=True)
        except (asyncpg.UniqueViolationError, _KnownIds) as conflict:
            if isinstance(conflict, asyncpg.UniqueViolationError) and \
                    not (conflict.constraint_name or "").startswith("transfers"):
                raise
            # Nothing of the attempt was committed: forget its effects and apply it again.
            self._cache = AccountCache()
            self._last_seq = last_seq
            self._lookup_commits_left = LOOKUP_COMMITS_AFTER_CONFLICT
            self.optimistic_conflicts += 1
            await self._commit_once(batch, optimistic=False)

    async def _commit_once(self, batch: list[Request], optimistic: bool) -> None:
        assert self._lease is not None
        stages = self.stages
        self._now = max(self.clock(), self._clock_ns + 1)
        first_timestamp = self._clock_ns + 1
        with stages.stage("load_transfers"):
            committed = await self._load_transfers(batch, pending_only=optimistic)
            expiry_checked = self._expiry_within(1 + sum(request.items for request in batch))
            expired = await self._load_expired(committed, expiry_checked) if expiry_checked else []
        with stages.stage("load_accounts"):
            await self._load_accounts(batch, committed)
        write = _Writes()
        cache = self._cache
        if expired:
            self._expire(expired, committed, write)
        outcomes: list[Outcome] = []
        runs = list(_runs(batch))
        transfer_runs = [k for k, run in enumerate(runs) if run[0].transfers is not None]
        for k, run in enumerate(runs):
            request = run[0]
            if request.accounts is not None:
                results, stamps, slots = create_accounts(
                    self._cache, request.accounts, request.account_shards,
                    self._stamp(len(request.accounts)),
                )
                write.created.extend(slots)
                for slot in slots:
                    write.events.account_created(cache.row(slot))
                outcomes.append(Outcome(results, stamps))
            elif request.closures is not None:
                results, stamps, slots = set_closed(self._cache, request.closures, request.close,
                                                    self._stamp(len(request.closures)))
                write.flags_changed.extend(slots)
                changed = set(slots)
                for account_id, stamp in zip(request.closures, stamps):
                    slot = cache.slot_of.get(account_id)
                    if slot in changed:  # the first mention of an account is its change
                        changed.discard(slot)
                        write.events.account_closed(cache.row(slot), stamp, request.close)
                outcomes.append(Outcome(results, stamps))
            else:
                with stages.stage("prepare"):
                    remember = k != transfer_runs[-1]
                    run_outcomes = self._apply_transfers(run, committed, write, remember)
                    outcomes.extend(run_outcomes)
                    _record_fees(run, run_outcomes, write)
        if optimistic and write.unverified_ids:
            with stages.stage("load_transfers"):
                ids = list(set(write.unverified_ids))
                if await self.store.load_transfers(shards_of(ids, self.shard_count).tolist(), ids):
                    raise _KnownIds()
        with stages.stage("write"):
            await self.store.write_batch(self._lease, write.finish(
                self._cache, self.shard_count, self._last_seq, first_timestamp, self._clock_ns),
                stages)
        self.committed_timestamp = self._clock_ns
        self._committed.set()
        self._committed = asyncio.Event()
        if expiry_checked:
            self._next_expiry = await self.store.next_expiry()
        for expires_at in write.new_expiries:
            self._next_expiry = min(self._next_expiry or expires_at, expires_at)
        stages.batches += 1
        stages.items += sum(request.items for request in batch)
        for request, outcome in zip(batch, outcomes):
            if not request.future.done():
                request.future.set_result(outcome)
        metrics.record_outcomes(batch, outcomes)

    async def _load_transfers(self, batch: list[Request], pending_only: bool) -> dict[bytes, list]:
        """Committed transfers that the batch posts or voids and, unless pending_only, those
        that share an id with it, as mutable TRANSFER_STATE rows."""
        ids: set[bytes] = set()
        if not pending_only:
            ids.update(i for r in batch if r.transfers is not None for i in r.transfers.ids)
        ids.update(i for r in batch if r.transfers is not None for i in r.transfers.pending_ids)
        ids.discard(ZERO_ID)
        if not ids:
            return {}
        ids = list(ids)
        rows = await self.store.load_transfers(shards_of(ids, self.shard_count).tolist(), ids)
        return {r["id"]: list(r) for r in rows}

    def _expiry_within(self, stamps: int) -> int:
        """The last timestamp a commit handing out `stamps` timestamps may use, when an open
        reservation can lapse by then (0 when none can)."""
        until = self._now + stamps
        return until if self._next_expiry and self._next_expiry <= until else 0

    async def _load_expired(self, committed: dict[bytes, list], until: int) -> list[list]:
        """Open reservations that lapse at this commit; the shard writer expires them itself.

        A reservation is released before every item stamped at or after its expiry and after
        every item stamped before it, never in between: the commit releases each reservation
        due by the last timestamp it may use and, when one is due only after the commit's
        clock reading, moves that reading forward to it, so the release precedes all of the
        commit's items (which then may reach further, hence the loop)."""
        stamps = until - self._now
        expired: list[list] = []
        seen: set[bytes] = set()
        since = 0
        while True:
            rows = await self.store.expiring_transfers(until, EXPIRY_BATCH_MAX, since)
            fresh = [r for r in rows if r["id"] not in seen]
            for r in fresh:
                seen.add(r["id"])
                state = committed.setdefault(r["id"], list(r))
                if state[PENDING_STATUS] == PendingStatus.PENDING:
                    expired.append(state)
            if fresh and len(rows) == EXPIRY_BATCH_MAX:
                since = rows[-1]["expires_at"]  # a full page: more may be due by `until`
                continue
            latest = max((r["expires_at"] for r in fresh), default=0)
            if latest <= self._now:
                return expired
            self._now = latest
            since, until = until, latest + stamps

    async def _load_accounts(self, batch: list[Request], committed: dict[bytes, list]) -> None:
        wanted: set[bytes] = set()
        for request in batch:
            if request.transfers is not None:
                wanted.update(request.transfers.debit_ids)
                wanted.update(request.transfers.credit_ids)
            elif request.closures is not None:
                wanted.update(request.closures)
            else:
                wanted.update(a.id for a in request.accounts)
        for state in committed.values():
            wanted.update(state[1:3])
        missing = [i for i in wanted if i not in self._cache.slot_of]
        if not missing:
            return
        rows = await self.store.load_accounts(shards_of(missing, self.shard_count).tolist(), missing)
        for r in rows:
            self._cache.add(r["shard"], r["id"], r["ledger"], r["code"], r["flags"], r["user_data"],
                            r["timestamp"], r["debits_pending"], r["debits_posted"],
                            r["credits_pending"], r["credits_posted"])

    def _expire(self, expired: list[list], committed: dict[bytes, list], write: "_Writes") -> None:
        """Release lapsed reservations, at one commit timestamp, before the batch's items."""
        timestamp = self._stamp(1)
        cache = self._cache
        for state in expired:
            debit, credit = cache.slot_of[state[1]], cache.slot_of[state[2]]
            amount = np.uint64(state[3])
            cache.debits_pending[debit] -= amount
            cache.credits_pending[credit] -= amount
            state[PENDING_STATUS] = PendingStatus.EXPIRED
            write.status_changed[state[0]] = state
            write.touch(debit, credit)
            write.history_of(cache, debit, credit, timestamp)
            write.events.transfer_expired(state, int(cache.shard[debit]), timestamp,
                                          _balances(cache, debit), _balances(cache, credit))
        log.info("reservations expired", count=len(expired), commit_timestamp=timestamp)

    def _apply_transfers(self, run: list[Request], committed: dict[bytes, list],
                         write: "_Writes", remember: bool) -> list[Outcome]:
        """One balance-kernel call over consecutive CreateTransfers requests."""
        cols = [r.transfers for r in run]
        ids = [i for c in cols for i in c.ids]
        pending_ids = [i for c in cols for i in c.pending_ids]
        n = len(ids)

        # Committed transfers named by an item's id or pending_id become rows n..n+m-1.
        existing_ids = [i for i in dict.fromkeys(ids + pending_ids) if i in committed]
        existing = [committed[i] for i in existing_ids]
        row_of = {i: n + k for k, i in enumerate(existing_ids)}
        rows = _Rows(cols, existing, existing_ids)
        exists_row = np.array([row_of.get(i, -1) for i in ids], np.int64)
        pending_row = np.array([row_of.get(i, -1) for i in pending_ids], np.int64)
        dup_prev = np.full(n, -1, np.int64)
        pending_prev = np.full(n, -1, np.int64)
        last_index: dict[bytes, int] = {}
        for index, (transfer_id, pending_id) in enumerate(zip(ids, pending_ids)):
            if pending_id != ZERO_ID:
                pending_prev[index] = last_index.get(pending_id, -1)
            dup_prev[index] = last_index.get(transfer_id, -1)
            last_index[transfer_id] = index
        slot_of = self._cache.slot_of
        debit_slot = np.array([slot_of.get(i, -1) for i in rows.debit_ids], np.int64)
        credit_slot = np.array([slot_of.get(i, -1) for i in rows.credit_ids], np.int64)
        chain_break = np.zeros(n, np.uint8)
        chain_break[np.cumsum([len(c) for c in cols]) - 1] = 1
        status = np.array([0] * n + [e[PENDING_STATUS] for e in existing], np.uint8)
        expires_at = np.array([0] * n + [e[EXPIRES_AT] for e in existing], np.int64)

        result = np.zeros(n, np.uint32)
        timestamp = np.zeros(n, np.int64)
        amount_out = np.zeros(n, np.uint64)
        resolved_row = np.full(n, -1, np.int64)
        balances_after = np.zeros((n, 8), np.uint64)
        cache = self._cache
        size = cache.size
        with self.stages.stage("kernel"):
            apply_transfers(
                rows.id_hi, rows.id_lo, rows.debit_hi, rows.debit_lo, rows.credit_hi,
                rows.credit_lo, rows.pending_hi, rows.pending_lo, rows.amount, rows.ledger,
                rows.code, rows.flags, rows.timeout, rows.user_data_key,
                debit_slot, credit_slot, chain_break, dup_prev, exists_row, pending_prev,
                pending_row, rows.existing_timestamp, rows.precheck, self._stamp(n),
                cache.ledger[:size], cache.flags[:size],
                cache.debits_pending[:size], cache.debits_posted[:size],
                cache.credits_pending[:size], cache.credits_posted[:size],
                status, expires_at, result, timestamp, amount_out, resolved_row, balances_after,
            )

        for k, state in enumerate(existing):
            if status[n + k] != state[PENDING_STATUS]:
                state[PENDING_STATUS] = int(status[n + k])
                write.status_changed[state[0]] = state
        ok = np.flatnonzero(result == TransferResult.OK)
        if len(ok) < n:
            # Failures at or after the existence step would be EXISTS* for a committed id.
            late = ~np.isin(result, PRE_EXISTENCE_RESULTS) & (result != TransferResult.OK)
            write.unverified_ids.extend(ids[i] for i in np.flatnonzero(late).tolist())
        if len(ok):
            # A post or void is stored with its pending transfer's accounts, ledger and code.
            source = np.where(resolved_row[ok] >= 0, resolved_row[ok], ok)
            self._collect(ok, source, rows, debit_slot, credit_slot, amount_out, timestamp,
                          status, expires_at, balances_after, committed, write, remember)

        outcomes = []
        start = 0
        results, stamps = result.tolist(), timestamp.tolist()
        for request, c in zip(run, cols):
            end = start + len(c)
            outcomes.append(Outcome(results[start:end], stamps[start:end]))
            if request.correlation_id:
                stored = _stored_range(results, stamps, start, end)
                if stored is not None:
                    write.requests.append((*stored, request.correlation_id))
            start = end
        return outcomes

    def _collect(self, ok, source, rows: "_Rows", debit_slot, credit_slot, amount_out, timestamp,
                 status, expires_at, balances_after, committed, write: "_Writes",
                 remember: bool) -> None:
        """Storage columns, shard positions and history for the committed items of a run.

        `remember`: a later run of this commit may name these transfers, so keep them in
        `committed` too (a Python row each; the common single-run commit skips that)."""
        cache = self._cache
        dr, cr = debit_slot[source], credit_slot[source]
        write.touched.extend((dr, cr))
        seq_shards = cache.shard[dr]
        seq = np.empty(len(ok), np.int64)
        for shard in np.unique(seq_shards).tolist():
            where = np.flatnonzero(seq_shards == shard)
            first = self._last_seq[shard] + 1
            seq[where] = np.arange(first, first + len(where))
            self._last_seq[shard] = first + len(where) - 1
        storage_shards = np.empty(len(ok), np.int32)
        shard_of(rows.id_hi[ok], rows.id_lo[ok], self.shard_count, storage_shards)
        user_data = [rows.user_data[i] for i in ok.tolist()]
        write.events.transfer_balances.append(balances_after[ok])
        write.transfer_chunks.append(TransferChunk(
            shard=storage_shards, id_hi=rows.id_hi[ok], id_lo=rows.id_lo[ok],
            debit_hi=rows.debit_hi[source], debit_lo=rows.debit_lo[source],
            credit_hi=rows.credit_hi[source], credit_lo=rows.credit_lo[source],
            amount=amount_out[ok], pending_hi=rows.pending_hi[ok], pending_lo=rows.pending_lo[ok],
            ledger=rows.ledger[source].astype(np.int64), code=rows.code[source].astype(np.int64),
            flags=rows.flags[ok].astype(np.int32), timeout=rows.timeout[ok].astype(np.int64),
            user_data=user_data, timestamp=timestamp[ok], status=status[ok].astype(np.int16),
            expires_at=expires_at[ok], seq_shard=seq_shards.astype(np.int32), seq=seq,
        ))
        open_expiries = expires_at[ok][(status[ok] == PendingStatus.PENDING) & (expires_at[ok] > 0)]
        write.new_expiries.extend(open_expiries.tolist())
        if remember:
            for i, p in zip(ok.tolist(), source.tolist()):
                committed[rows.ids[i]] = [
                    rows.ids[i], rows.debit_ids[p], rows.credit_ids[p], int(amount_out[i]),
                    rows.pending_ids[i], int(rows.ledger[p]), int(rows.code[p]),
                    int(rows.flags[i]), int(rows.timeout[i]), rows.user_data[i],
                    int(timestamp[i]), int(status[i]), int(expires_at[i])]
        history = (cache.flags[dr] | cache.flags[cr]) & AccountFlags.HISTORY
        for j in np.flatnonzero(history).tolist():
            i = int(ok[j])
            write.history_rows(cache, int(dr[j]), int(cr[j]), int(timestamp[i]), balances_after[i])


@dataclasses.dataclass
class TransferChunk:
    """Committed transfers of one kernel call, column by column, in TRANSFER_COLUMNS order."""

    shard: np.ndarray
    id_hi: np.ndarray
    id_lo: np.ndarray
    debit_hi: np.ndarray
    debit_lo: np.ndarray
    credit_hi: np.ndarray
    credit_lo: np.ndarray
    amount: np.ndarray
    pending_hi: np.ndarray
    pending_lo: np.ndarray
    ledger: np.ndarray
    code: np.ndarray
    flags: np.ndarray
    timeout: np.ndarray
    user_data: list[bytes]
    timestamp: np.ndarray
    status: np.ndarray
    expires_at: np.ndarray
    seq_shard: np.ndarray
    seq: np.ndarray


def encode_transfers(chunks: list[TransferChunk]) -> bytes | None:
    """One binary COPY stream of every chunk's rows (TRANSFER_COLUMNS order), or None."""
    if not chunks:
        return None

    def cat(name: str) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate([getattr(c, name) for c in chunks]))

    user_data = [u for c in chunks for u in c.user_data]
    offsets = np.zeros(len(user_data) + 1, np.int64)
    np.cumsum([len(u) for u in user_data], out=offsets[1:])
    rows = len(user_data)
    return encode_binary_copy(rows, [
        (copy.INT32, cat("shard")), (copy.UUID, cat("id_hi"), cat("id_lo")),
        (copy.UUID, cat("debit_hi"), cat("debit_lo")),
        (copy.UUID, cat("credit_hi"), cat("credit_lo")), (copy.INT64, cat("amount")),
        (copy.UUID, cat("pending_hi"), cat("pending_lo")), (copy.INT64, cat("ledger")),
        (copy.INT64, cat("code")), (copy.INT32, cat("flags")), (copy.INT64, cat("timeout")),
        (copy.BYTEA, b"".join(user_data), offsets), (copy.INT64, cat("timestamp")),
        (copy.INT16, cat("status")), (copy.INT64, cat("expires_at")),
        (copy.INT32, cat("seq_shard")), (copy.INT64, cat("seq")),
    ])


class PendingStatus(enum.IntEnum):
    """transfers.pending_status."""

    NONE = 0
    PENDING = 1
    POSTED = 2
    VOIDED = 3
    EXPIRED = 4


class _KnownIds(Exception):
    """An item failed where a committed id would have made it EXISTS*: look the ids up."""


# Results decided before the existence check: the same whether or not the id is committed.
PRE_EXISTENCE_RESULTS = np.array([TransferResult[name] for name in (
    "TIMESTAMP_MUST_BE_ZERO", "RESERVED_FLAG", "ID_MUST_NOT_BE_ZERO",
    "FLAGS_ARE_MUTUALLY_EXCLUSIVE", "PENDING_ID_MUST_NOT_BE_ZERO",
    "PENDING_ID_MUST_BE_DIFFERENT", "TIMEOUT_RESERVED_FOR_PENDING_TRANSFER",
    "DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO", "CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO",
    "ACCOUNTS_MUST_BE_DIFFERENT", "PENDING_ID_MUST_BE_ZERO", "LEDGER_MUST_NOT_BE_ZERO",
    "CODE_MUST_NOT_BE_ZERO", "AMOUNT_MUST_NOT_BE_ZERO", "DEBIT_ACCOUNT_NOT_FOUND",
    "CREDIT_ACCOUNT_NOT_FOUND", "ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER",
    "TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS", "PENDING_TRANSFER_NOT_FOUND",
    "PENDING_TRANSFER_NOT_PENDING", "PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID",
    "PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID", "PENDING_TRANSFER_HAS_DIFFERENT_LEDGER",
    "PENDING_TRANSFER_HAS_DIFFERENT_CODE")], np.uint32)
RESULT_OK = int(TransferResult.OK)
# After a conflict, clients are likely replaying: look ids up for this many commits.
LOOKUP_COMMITS_AFTER_CONFLICT = 16

PENDING_STATUS = TRANSFER_STATE.index("pending_status")
EXPIRES_AT = TRANSFER_STATE.index("expires_at")
EXPIRY_BATCH_MAX = 8_190


class _Rows:
    """The kernel's row columns: a run's items, then the committed transfers they name."""

    def __init__(self, cols: list[TransferColumns], existing: list[list], existing_ids: list[bytes]):
        self.ids = [i for c in cols for i in c.ids] + existing_ids
        self.debit_ids = [i for c in cols for i in c.debit_ids] + [e[1] for e in existing]
        self.credit_ids = [i for c in cols for i in c.credit_ids] + [e[2] for e in existing]
        self.pending_ids = [i for c in cols for i in c.pending_ids] + [e[4] for e in existing]
        self.user_data = [u for c in cols for u in c.user_data] + [e[9] for e in existing]
        interned: dict[bytes, int] = {}
        self.user_data_key = np.array([interned.setdefault(u, len(interned)) for u in self.user_data],
                                      np.int64)
        self.id_hi, self.id_lo = halves(self.ids)
        self.debit_hi, self.debit_lo = halves(self.debit_ids)
        self.credit_hi, self.credit_lo = halves(self.credit_ids)
        self.pending_hi, self.pending_lo = halves(self.pending_ids)

        def column(name: str, dtype, field: int) -> np.ndarray:
            own = np.concatenate([getattr(c, name) for c in cols]).astype(dtype)
            return np.concatenate([own, np.array([e[field] for e in existing], dtype)])

        self.amount = column("amount", np.uint64, 3)
        self.ledger = column("ledger", np.uint32, 5)
        self.code = column("code", np.uint32, 6)
        self.flags = column("flags", np.uint32, 7)
        self.timeout = column("timeout_seconds", np.uint32, 8)
        self.precheck = np.concatenate([c.precheck for c in cols]).astype(np.uint32)
        self.existing_timestamp = np.array([e[10] for e in existing], np.int64)


class _Writes:
    """What one commit accumulates for storage."""

    def __init__(self) -> None:
        self.created: list[int] = []
        self.unverified_ids: list[bytes] = []
        self.flags_changed: list[int] = []
        self.touched: list[np.ndarray] = []
        self.transfer_chunks: list[TransferChunk] = []
        self.status_changed: dict[bytes, list] = {}
        self.history: list[tuple] = []
        self.new_expiries: list[int] = []
        self.requests: list[tuple] = []  # REQUEST_LOG_COLUMNS
        self.events = OutboxEvents()
        self.fee_records: list[tuple] = []

    def touch(self, *slots: int) -> None:
        self.touched.append(np.array(slots, np.int64))

    def history_of(self, cache: AccountCache, debit: int, credit: int, timestamp: int) -> None:
        for slot in (debit, credit):
            if cache.flags[slot] & AccountFlags.HISTORY:
                self.history.append((int(cache.shard[slot]), cache.ids[slot], timestamp,
                                     int(cache.debits_pending[slot]), int(cache.debits_posted[slot]),
                                     int(cache.credits_pending[slot]), int(cache.credits_posted[slot])))

    def history_rows(self, cache: AccountCache, debit: int, credit: int, timestamp: int,
                     after: np.ndarray) -> None:
        for slot, balances in ((debit, after[:4]), (credit, after[4:])):
            if cache.flags[slot] & AccountFlags.HISTORY:
                self.history.append((int(cache.shard[slot]), cache.ids[slot], timestamp,
                                     *(int(b) for b in balances)))

    def finish(self, cache: AccountCache, shard_count: int, last_seq: dict[int, int],
               first_timestamp: int, last_timestamp: int) -> BatchWrite:
        created = set(self.created)
        slots = np.unique(np.concatenate(self.touched)) if self.touched else np.zeros(0, np.int64)
        if created:
            slots = np.array([s for s in slots.tolist() if s not in created], np.int64)
        # The UPDATE runs after the COPY, so it also reaches a pending transfer inserted by
        # this commit and resolved by a later run of it.
        changed = list(self.status_changed.values())
        flag_slots = sorted(set(self.flags_changed) - created)
        return BatchWrite(
            new_accounts=[cache.row(s) for s in self.created],
            flag_updates=(cache.shard[flag_slots].tolist(), [cache.ids[s] for s in flag_slots],
                          cache.flags[flag_slots].astype(np.int32).tolist()),
            balance_updates=cache.balances(slots),
            transfers_copy=encode_transfers(self.transfer_chunks),
            pending_updates=(shards_of([s[0] for s in changed], shard_count).tolist(),
                             [s[0] for s in changed],
                             [s[PENDING_STATUS] for s in changed]),
            history=self.history,
            last_seq=dict(last_seq),
            last_timestamp=last_timestamp,
            requests=self.requests,
            outbox=self.events.outbox_row(first_timestamp, last_timestamp),
            fee_records=self.fee_records,
        )


def _stored_range(results: list[int], stamps: list[int], start: int,
                  end: int) -> tuple[int, int] | None:
    """The first and last timestamps of the transfers stored for items start..end-1 of a run:
    its OK items, whose timestamps increase with the index. Usually both ends are OK, so this
    looks at two items."""
    first = next((i for i in range(start, end) if results[i] == RESULT_OK), None)
    if first is None:
        return None
    last = next(i for i in range(end - 1, first - 1, -1) if results[i] == RESULT_OK)
    return stamps[first], stamps[last]


def _balances(cache: AccountCache, slot: int) -> tuple[int, int, int, int]:
    return (int(cache.debits_pending[slot]), int(cache.debits_posted[slot]),
            int(cache.credits_pending[slot]), int(cache.credits_posted[slot]))


def _record_fees(run: list[Request], outcomes: list[Outcome], write: _Writes) -> None:
    """The fee_transfers rows of the fee transfers and refunds of a run that committed."""
    for request, outcome in zip(run, outcomes):
        for first_leg, record in request.transfers.fee_records or ():
            if outcome.results[first_leg] == TransferResult.OK:
                write.fee_records.append((*record, outcome.timestamps[first_leg]))


def _count(shards: np.ndarray) -> dict[int, int]:
    counts = np.bincount(shards)
    return {int(s): int(c) for s, c in enumerate(counts) if c}


def _runs(batch: list[Request]) -> Iterator[list[Request]]:
    """Maximal runs of consecutive transfer requests; every other request is a run of one."""
    run: list[Request] = []
    for request in batch:
        if request.transfers is None:
            if run:
                yield run
                run = []
            yield [request]
        else:
            run.append(request)
    if run:
        yield run
