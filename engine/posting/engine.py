"""The posting engine: admission to bounded shard queues, and the group-commit loop.

Control plane only: it routes, batches and orders; the balance kernel does the arithmetic and
the store does the I/O. One commit loop owns every shard of the database (the shard lease),
so its in-memory balances are authoritative, and one Postgres transaction holds each batch:
cross-shard transfers are as atomic as single-shard ones.
"""
from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Iterator

import asyncpg
import numpy as np
import structlog

from engine.config import Settings
from engine.ids import halves
from engine.kernels import apply_transfers
from engine.observability.stages import StageTimes
from engine.posting.accounts import AccountCache, AccountCacheFull, NewAccount, create_accounts
from engine.posting.batch import Outcome, Request, TransferColumns, shards_of
from engine.results import TransferResult
from engine.storage.store import ShardLease, Store, StorageUnavailable

log = structlog.get_logger("engine.posting")

RECOVERY_BACKOFF_SECONDS = (0.05, 0.1, 0.2, 0.5, 1.0)
# Failures of Postgres or of the connection to it; anything else in a commit is a defect.
STORAGE_ERRORS = (StorageUnavailable, asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                  ConnectionError, TimeoutError)


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
        self._last_seq: dict[int, int] = {}
        self.stages = StageTimes()

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
            except STORAGE_ERRORS as error:
                log.warning("storage recovery failed", error=str(error), retry_in_s=delay)
                await self.store.drop_writer()
            attempt += 1
            await asyncio.sleep(delay)

    # -- admission -------------------------------------------------------------------------

    async def create_transfers(self, transfers: TransferColumns) -> Outcome:
        shards = np.concatenate([shards_of(transfers.debit_ids, self.shard_count),
                                 shards_of(transfers.credit_ids, self.shard_count)])
        return await self._submit(Request(
            future=asyncio.get_running_loop().create_future(),
            shard_items=_count(shards), transfers=transfers,
        ))

    async def create_accounts(self, accounts: list[NewAccount]) -> Outcome:
        shards = shards_of([a.id for a in accounts], self.shard_count)
        return await self._submit(Request(
            future=asyncio.get_running_loop().create_future(),
            shard_items=_count(shards), accounts=accounts, account_shards=shards.tolist(),
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

    # -- the commit loop -------------------------------------------------------------------

    _busy = False

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue:
                batch = self._take()
                self._busy = True
                try:
                    await self._commit(batch)
                except STORAGE_ERRORS as error:
                    log.warning("commit failed", error=repr(error), requests=len(batch))
                    self._fail(batch, Unavailable(f"commit failed: {error}; retry with the same ids"))
                    await self._recover()
                except AccountCacheFull as error:
                    self._fail(batch, Overloaded(str(error)))
                    await self._recover()
                except Exception as error:  # a defect: report it, then rebuild state from storage
                    log.exception("commit crashed", requests=len(batch))
                    self._fail(batch, error)
                    await self._recover()
                finally:
                    self._busy = False

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
        last committed one whatever the wall clock does."""
        base = max(time.time_ns(), self._clock_ns + 1)
        self._clock_ns = base + count - 1
        return base

    async def _commit(self, batch: list[Request]) -> None:
        assert self._lease is not None
        stages = self.stages
        with stages.stage("load_accounts"):
            await self._load_accounts(batch)
        with stages.stage("load_transfers"):
            committed = await self._load_transfers(batch)
        created: list[int] = []
        transfer_rows: list[tuple] = []
        touched: list[np.ndarray] = []
        outcomes: list[Outcome] = []
        for run in _runs(batch):
            if run[0].accounts is not None:
                request = run[0]
                results, stamps, slots = create_accounts(
                    self._cache, request.accounts, request.account_shards,
                    self._stamp(len(request.accounts)),
                )
                created.extend(slots)
                outcomes.append(Outcome(results, stamps))
            else:
                with stages.stage("prepare"):
                    outcomes.extend(self._apply_transfers(run, committed, transfer_rows, touched))
        with stages.stage("write"):
            await self._write(created, touched, transfer_rows)
        stages.batches += 1
        stages.items += sum(request.items for request in batch)
        for request, outcome in zip(batch, outcomes):
            if not request.future.done():
                request.future.set_result(outcome)

    async def _load_accounts(self, batch: list[Request]) -> None:
        wanted: set[bytes] = set()
        for request in batch:
            if request.transfers is not None:
                wanted.update(request.transfers.debit_ids)
                wanted.update(request.transfers.credit_ids)
            else:
                wanted.update(a.id for a in request.accounts)
        missing = [i for i in wanted if i not in self._cache.slot_of]
        if not missing:
            return
        rows = await self.store.load_accounts(shards_of(missing, self.shard_count).tolist(), missing)
        for r in rows:
            self._cache.add(r["shard"], r["id"], r["ledger"], r["code"], r["flags"], r["user_data"],
                            r["timestamp"], r["debits_pending"], r["debits_posted"],
                            r["credits_pending"], r["credits_posted"])

    async def _load_transfers(self, batch: list[Request]) -> dict[bytes, tuple]:
        """Committed transfers that share an id with this batch (TRANSFER_FIELDS order)."""
        ids = list({i for r in batch if r.transfers is not None for i in r.transfers.ids})
        if not ids:
            return {}
        rows = await self.store.load_transfers(shards_of(ids, self.shard_count).tolist(), ids)
        return {r["id"]: tuple(r) for r in rows}

    def _apply_transfers(self, run: list[Request], committed: dict[bytes, tuple],
                         transfer_rows: list[tuple], touched: list[np.ndarray]) -> list[Outcome]:
        """One balance-kernel call over consecutive CreateTransfers requests."""
        cols = [r.transfers for r in run]
        ids = [i for c in cols for i in c.ids]
        debit_ids = [i for c in cols for i in c.debit_ids]
        credit_ids = [i for c in cols for i in c.credit_ids]
        pending_ids = [i for c in cols for i in c.pending_ids]
        user_data = [u for c in cols for u in c.user_data]
        n = len(ids)

        # Committed transfers with the same ids are appended as rows n..n+m-1.
        existing_ids = [i for i in dict.fromkeys(ids) if i in committed]
        existing = [committed[i] for i in existing_ids]
        row_of = {i: n + k for k, i in enumerate(existing_ids)}
        exists_row = np.array([row_of.get(i, -1) for i in ids], np.int64)
        dup_prev = np.full(n, -1, np.int64)
        last_index: dict[bytes, int] = {}
        for index, transfer_id in enumerate(ids):
            dup_prev[index] = last_index.get(transfer_id, -1)
            last_index[transfer_id] = index
        interned: dict[bytes, int] = {}
        user_data_key = np.array(
            [interned.setdefault(u, len(interned)) for u in user_data]
            + [interned.setdefault(e[9], len(interned)) for e in existing], np.int64)

        def column(name: str, dtype, field: int) -> np.ndarray:
            own = np.concatenate([getattr(c, name) for c in cols])
            return np.concatenate([own, np.array([e[field] for e in existing], dtype)]).astype(dtype)

        id_hi, id_lo = halves(ids + existing_ids)
        debit_hi, debit_lo = halves(debit_ids + [e[1] for e in existing])
        credit_hi, credit_lo = halves(credit_ids + [e[2] for e in existing])
        pending_hi, pending_lo = halves(pending_ids + [e[4] for e in existing])
        amount = column("amount", np.uint64, 3)
        ledger = column("ledger", np.uint32, 5)
        code = column("code", np.uint32, 6)
        flags = column("flags", np.uint32, 7)
        timeout = column("timeout_seconds", np.uint32, 8)
        precheck = np.concatenate([c.precheck for c in cols]).astype(np.uint32)
        slot_of = self._cache.slot_of
        debit_slot = np.array([slot_of.get(i, -1) for i in debit_ids], np.int64)
        credit_slot = np.array([slot_of.get(i, -1) for i in credit_ids], np.int64)
        chain_break = np.zeros(n, np.uint8)
        chain_break[np.cumsum([len(c) for c in cols]) - 1] = 1
        existing_timestamp = np.array([e[10] for e in existing], np.int64)

        result = np.zeros(n, np.uint32)
        timestamp = np.zeros(n, np.int64)
        cache = self._cache
        size = cache.size
        with self.stages.stage("kernel"):
            apply_transfers(
                id_hi, id_lo, debit_hi, debit_lo, credit_hi, credit_lo, pending_hi, pending_lo,
                amount, ledger, code, flags, timeout, user_data_key,
                debit_slot, credit_slot, chain_break, dup_prev, exists_row, existing_timestamp,
                precheck, self._stamp(n),
                cache.ledger[:size], cache.flags[:size],
                cache.debits_pending[:size], cache.debits_posted[:size],
                cache.credits_pending[:size], cache.credits_posted[:size],
                result, timestamp,
            )

        ok = np.flatnonzero(result == TransferResult.OK)
        if len(ok):
            touched.append(debit_slot[ok])
            touched.append(credit_slot[ok])
            self._collect_rows(ok, ids, debit_ids, credit_ids, pending_ids, user_data,
                               amount, ledger, code, flags, timeout, timestamp,
                               cache.shard[debit_slot[ok]], committed, transfer_rows)

        outcomes = []
        start = 0
        results, stamps = result.tolist(), timestamp.tolist()
        for c in cols:
            outcomes.append(Outcome(results[start:start + len(c)], stamps[start:start + len(c)]))
            start += len(c)
        return outcomes

    def _collect_rows(self, ok, ids, debit_ids, credit_ids, pending_ids, user_data, amount,
                      ledger, code, flags, timeout, timestamp, seq_shards, committed, rows) -> None:
        """Storage rows for committed transfers, each with its place in its shard's order."""
        seq = np.empty(len(ok), np.int64)
        for shard in np.unique(seq_shards).tolist():
            where = np.flatnonzero(seq_shards == shard)
            first = self._last_seq[shard] + 1
            seq[where] = np.arange(first, first + len(where))
            self._last_seq[shard] = first + len(where) - 1
        ok_ids = [ids[i] for i in ok.tolist()]
        storage_shards = shards_of(ok_ids, self.shard_count).tolist()
        for j, i in enumerate(ok.tolist()):
            fields = (ids[i], debit_ids[i], credit_ids[i], int(amount[i]), pending_ids[i],
                      int(ledger[i]), int(code[i]), int(flags[i]), int(timeout[i]),
                      user_data[i], int(timestamp[i]))
            committed[ids[i]] = fields
            rows.append((storage_shards[j], *fields, int(seq_shards[j]), int(seq[j])))

    async def _write(self, created: list[int], touched: list[np.ndarray],
                     transfer_rows: list[tuple]) -> None:
        cache = self._cache
        created_set = set(created)
        slots = np.unique(np.concatenate(touched)) if touched else np.zeros(0, np.int64)
        if created_set:
            slots = np.array([s for s in slots.tolist() if s not in created_set], np.int64)
        await self.store.write_batch(
            self._lease,
            new_accounts=[cache.row(s) for s in created],
            balance_updates=cache.balances(slots),
            transfers=transfer_rows,
            last_seq=self._last_seq,
            last_timestamp=self._clock_ns,
        )


def _count(shards: np.ndarray) -> dict[int, int]:
    counts = np.bincount(shards)
    return {int(s): int(c) for s, c in enumerate(counts) if c}


def _runs(batch: list[Request]) -> Iterator[list[Request]]:
    """Maximal runs of consecutive transfer requests; each account request is a run of one."""
    run: list[Request] = []
    for request in batch:
        if request.accounts is not None:
            if run:
                yield run
                run = []
            yield [request]
        else:
            run.append(request)
    if run:
        yield run
