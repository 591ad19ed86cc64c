"""Expansion of fee transfers and refunds into linked chains of legs, before the balance kernel.

A transfer that names a fee schedule becomes the legs the fee kernel computes, in slot order:
the first carries the transfer's id, the others an id derived from (transfer id, slot), so a
replay yields the same ids and the balance kernel answers EXISTS. The legs are LINKED to each
other, and the last carries the transfer's own LINKED bit, so the chain commits entirely or not
at all and a caller's own chain still spans it. A refund reverses the legs of its original in
proportion to its amount (allocate_refunds). Every other item passes through unchanged, and a
request without fees never comes here. Legs are built column by column (numpy), as the rest of
the request path is.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import weakref
from typing import NamedTuple

import numpy as np

from engine.fees.schedule import (LEGS_MAX, SLOT_NET, SLOT_RESERVE, FeeSchedule, slot_kind,
                                  tables)
from engine.ids import ZERO_ID
from engine.kernels import _fee
from engine.kernels import constants as c
from engine.limits import BALANCE_MAX, ID_BYTES
from engine.posting.batch import Outcome, TransferColumns
from engine.storage.store import Store

LINKED = c.TRANSFER_FLAG_LINKED
PENDING = c.TRANSFER_FLAG_PENDING
# Immutable schedule versions kept in memory, (id, version) -> schedule.
SCHEDULE_CACHE_MAX = 4_096
SLOT_KINDS = [int(slot_kind(s)) for s in range(LEGS_MAX)]


def leg_id(transfer_id: bytes, slot: int) -> bytes:
    """The id of a leg other than the first: a hash of the transfer id and the slot."""
    return hashlib.blake2b(transfer_id + bytes([slot]), digest_size=ID_BYTES,
                           person=b"txengine-leg").digest()


class Leg(NamedTuple):
    id: bytes
    debit_account_id: bytes
    credit_account_id: bytes
    amount: int
    kind: int  # LegKind
    slot: int
    flags: int
    timeout_seconds: int


def _as_array(ids: list[bytes]) -> np.ndarray:
    """16-byte ids as an (n, 16) uint8 array."""
    return np.frombuffer(b"".join(ids), np.uint8).reshape(-1, ID_BYTES)


def _as_list(ids: np.ndarray) -> list[bytes]:
    raw = np.ascontiguousarray(ids).tobytes()
    return [raw[k:k + ID_BYTES] for k in range(0, len(raw), ID_BYTES)]


@dataclasses.dataclass
class _LegTable:
    """Legs of some request items, one row per leg, grouped by item in slot order."""

    item: np.ndarray  # int64, the request item
    slot: np.ndarray  # int64
    ids: list[bytes]
    debit: np.ndarray  # (m, 16) uint8
    credit: np.ndarray  # (m, 16) uint8
    amount: np.ndarray  # uint64
    flags: np.ndarray  # uint32
    timeout: np.ndarray  # uint32

    @classmethod
    def empty(cls) -> _LegTable:
        ids = np.zeros((0, ID_BYTES), np.uint8)
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), [], ids, ids.copy(),
                   np.zeros(0, np.uint64), np.zeros(0, np.uint32), np.zeros(0, np.uint32))

    @classmethod
    def build(cls, cols: TransferColumns, items: np.ndarray, legs: np.ndarray,
              slot_accounts: np.ndarray, reserve_timeout: np.ndarray, refund: bool) -> _LegTable:
        """Legs of `items` (rows of `legs`, k x LEGS_MAX) with the accounts of each slot
        (slot_accounts, k x LEGS_MAX x 16). A payment's legs leave its debit account (the
        reserve leaves its credit account); a refund's legs return to its credit account."""
        rows, slot = np.nonzero(legs)
        if not len(rows):
            return cls.empty()
        item = items[rows]
        debit_of, credit_of = _as_array(cols.debit_ids)[item], _as_array(cols.credit_ids)[item]
        accounts = slot_accounts[rows, slot]
        net = (slot == SLOT_NET)[:, None]
        if refund:
            debit, credit = np.where(net, debit_of, accounts), credit_of
        else:
            reserve = (slot == SLOT_RESERVE)[:, None]
            debit = np.where(reserve, credit_of, debit_of)
            credit = np.where(net, credit_of, accounts)
        boundary = rows[1:] != rows[:-1]
        first = np.concatenate([[True], boundary])
        last = np.concatenate([boundary, [True]])
        parent_flags = cols.flags[item].astype(np.uint32)
        flags = np.where(last, parent_flags & LINKED, LINKED).astype(np.uint32)
        is_reserve = slot == SLOT_RESERVE
        flags[is_reserve] |= PENDING
        timeout = np.where(is_reserve, reserve_timeout[rows], 0).astype(np.uint32)
        parents = [cols.ids[i] for i in item.tolist()]
        ids = [p if f else leg_id(p, s)
               for p, f, s in zip(parents, first.tolist(), slot.tolist())]
        return cls(item.astype(np.int64), slot.astype(np.int64), ids, debit, credit,
                   legs[rows, slot].astype(np.uint64), flags, timeout)

    @staticmethod
    def concat(tables_: list[_LegTable]) -> _LegTable:
        return _LegTable(*(
            [x for t in tables_ for x in getattr(t, f.name)] if f.name == "ids"
            else np.concatenate([getattr(t, f.name) for t in tables_])
            for f in dataclasses.fields(_LegTable)))


class Expansion:
    """The expanded request, and how to fold the legs' results back into one per item."""

    def __init__(self, columns: TransferColumns, first: np.ndarray, legs: list[list[Leg]],
                 versions: list[int], locks: list[asyncio.Lock]):
        self.columns = columns
        self.first = first  # per item: its first row in `columns`
        self.legs = legs  # per item: its legs ([] for an item passed through)
        self.versions = versions
        self._locks = locks

    def release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []

    def collapse(self, outcome: Outcome) -> Outcome:
        """One result per request item: the first leg result that is neither OK nor
        LINKED_EVENT_FAILED, else LINKED_EVENT_FAILED if any, else OK; the first leg's
        timestamp."""
        result = np.array(outcome.results, np.int64)
        rows = np.arange(len(result))
        decisive = (result != c.TRANSFER_OK) & (result != c.TRANSFER_LINKED_EVENT_FAILED)
        first_decisive = np.minimum.reduceat(np.where(decisive, rows, len(result)), self.first)
        any_failed = np.maximum.reduceat(result == c.TRANSFER_LINKED_EVENT_FAILED, self.first)
        decided = np.where(first_decisive < len(result),
                           result[np.minimum(first_decisive, len(result) - 1)],
                           np.where(any_failed, c.TRANSFER_LINKED_EVENT_FAILED, c.TRANSFER_OK))
        timestamps = np.array(outcome.timestamps, np.int64)[self.first]
        return Outcome(decided.tolist(), timestamps.tolist(), self.legs, self.versions)


class FeeExpander:
    """Turns fee transfers and refunds into legs; holds the schedule cache and refund locks."""

    def __init__(self, store: Store):
        self.store = store
        self._schedules: dict[tuple[bytes, int], FeeSchedule] = {}
        # One lock per original with a refund in flight: refunds of it commit one at a time,
        # so that each sees every earlier one.
        self._refund_locks: weakref.WeakValueDictionary[bytes, asyncio.Lock] = \
            weakref.WeakValueDictionary()

    async def schedules(self, keys: list[tuple[bytes, int]]) -> dict[tuple[bytes, int], FeeSchedule]:
        """Schedules by (id, version); version 0 is looked up as the latest every time."""
        found = {k: self._schedules[k] for k in keys if k in self._schedules}
        wanted = [k for k in dict.fromkeys(keys) if k not in found]
        if wanted:
            for row in await self.store.fee_schedules(wanted):
                schedule = FeeSchedule.from_json(row["id"], row["version"], row["timestamp"],
                                                 json.loads(row["definition"]))
                found[(row["key_id"], row["key_version"])] = schedule
                if len(self._schedules) < SCHEDULE_CACHE_MAX:
                    self._schedules[(row["id"], row["version"])] = schedule
        return found

    async def expand(self, cols: TransferColumns) -> Expansion:
        """The request with every fee transfer and refund replaced by its legs.

        Refunds of one original wait here for each other: the locks taken are held until
        Expansion.release(), which the caller calls once the request has committed."""
        assert cols.fee_schedule_ids is not None and cols.refund_of is not None
        n = len(cols)
        precheck = cols.precheck.astype(np.uint32)  # a copy: failures decided here go in it
        versions = [0] * n
        fee_items = [i for i in range(n) if cols.fee_schedule_ids[i] != ZERO_ID
                     and cols.refund_of[i] == ZERO_ID and not precheck[i]]
        refund_items = [i for i in range(n) if cols.refund_of[i] != ZERO_ID and not precheck[i]]
        # A payment that pins its schedule version recomputes the same legs on a replay; one
        # that asks for the latest must find the version its first attempt used.
        requested = cols.fee_schedule_versions.tolist()
        named = [cols.ids[i] for i in fee_items if not requested[i]] \
            + [cols.ids[i] for i in refund_items] + [cols.refund_of[i] for i in refund_items]
        records = {r["id"]: r for r in await self.store.fee_transfers(list(set(named)))} if named else {}
        locks = await self._lock([cols.refund_of[i] for i in refund_items])
        try:
            fee_legs, schedules, fee_records = await self._expand_fees(
                cols, fee_items, records, precheck, versions)
            refund_legs, refund_records = await self._expand_refunds(
                cols, refund_items, records, schedules, precheck, versions)
        except BaseException:
            for lock in locks:
                lock.release()
            raise
        table = _LegTable.concat([fee_legs, refund_legs])
        return _assemble(cols, table, precheck, {**fee_records, **refund_records}, versions, locks)

    async def _lock(self, originals: list[bytes]) -> list[asyncio.Lock]:
        locks = []
        for original in sorted(set(originals)):  # one order everywhere: no deadlock
            lock = self._refund_locks.get(original)
            if lock is None:
                lock = self._refund_locks[original] = asyncio.Lock()
            await lock.acquire()
            locks.append(lock)
        return locks

    async def _expand_fees(self, cols, fee_items, records, precheck, versions):
        # A replay uses the version its first attempt recorded, whatever came later.
        keys = []
        requested = cols.fee_schedule_versions.tolist()
        for i in fee_items:
            record = records.get(cols.ids[i])
            replay = record is not None and record["refund_of"] is None
            keys.append((cols.fee_schedule_ids[i], record["schedule_version"] if replay else requested[i]))
        refund_keys = [(r["schedule_id"], r["schedule_version"]) for r in records.values()]
        schedules = await self.schedules(keys + refund_keys)
        runnable, which, plans, plan_row = [], [], [], {}
        amounts = cols.amount.tolist()
        for i, key in zip(fee_items, keys):
            schedule = schedules.get(key)
            if schedule is None:
                precheck[i] = c.TRANSFER_FEE_SCHEDULE_NOT_FOUND
            elif amounts[i] > BALANCE_MAX:
                precheck[i] = c.TRANSFER_OVERFLOWS_DEBITS  # no balance can take it
            else:
                versions[i] = schedule.version
                runnable.append(i)
                row = plan_row.setdefault((schedule.id, schedule.version), len(plans))
                if row == len(plans):
                    plans.append(schedule)
                which.append(row)
        if not runnable:
            return _LegTable.empty(), schedules, {}
        items = np.array(runnable, np.int64)
        which = np.array(which, np.int32)
        t = tables(plans)
        legs = np.zeros((len(items), LEGS_MAX), np.uint64)
        result = np.zeros(len(items), np.uint32)
        _fee.expand_fees(cols.amount[items].astype(np.uint64), which, t.schedules, t.fees,
                         t.tiers, t.split_weights, legs, result)
        failed = result != 0
        precheck[items[failed]] = result[failed]
        items, legs, which = items[~failed], legs[~failed], which[~failed]
        if not len(items):
            return _LegTable.empty(), schedules, {}
        slot_accounts = np.stack([_slot_accounts(p) for p in plans])[which]
        reserve_timeout = np.array([p.reserve_timeout_seconds for p in plans], np.uint32)[which]
        table = _LegTable.build(cols, items, legs, slot_accounts, reserve_timeout, refund=False)
        return table, schedules, _records(cols, table, {
            i: (plans[w].id, plans[w].version, None) for i, w in zip(items.tolist(), which.tolist())})

    async def _expand_refunds(self, cols, refund_items, records, schedules, precheck, versions):
        if not refund_items:
            return _LegTable.empty(), {}
        originals = {}
        for i in refund_items:
            original = records.get(cols.refund_of[i])
            if (original is None or original["refund_of"] is not None
                    or original["credit_account_id"] != cols.debit_ids[i]
                    or original["debit_account_id"] != cols.credit_ids[i]
                    or original["ledger"] != cols.ledger[i]
                    or (original["schedule_id"], original["schedule_version"]) not in schedules):
                precheck[i] = c.TRANSFER_REFUND_ORIGINAL_NOT_FOUND
            else:
                originals[i] = original
        refunded: dict[bytes, list[int]] = {}
        if originals:
            for row in await self.store.refunds_of(list({r["id"] for r in originals.values()})):
                _add(refunded.setdefault(row["refund_of"], [0] * LEGS_MAX), row)
        rows: dict[int, list[int]] = {}
        # Refunds of one original in one request are allocated one after the other.
        pending = [i for i in refund_items if i in originals]
        while pending:
            seen, now, later = set(), [], []
            for i in pending:
                (later if cols.refund_of[i] in seen else now).append(i)
                seen.add(cols.refund_of[i])
            self._allocate(cols, now, originals, records, refunded, precheck, rows)
            pending = later
        if not rows:
            return _LegTable.empty(), {}
        items = np.array(sorted(rows), np.int64)
        legs = np.array([rows[i] for i in items.tolist()], np.uint64).reshape(-1, LEGS_MAX)
        plans = [schedules[(originals[i]["schedule_id"], originals[i]["schedule_version"])]
                 for i in items.tolist()]
        for i, plan in zip(items.tolist(), plans):
            versions[i] = plan.version
        slot_accounts = np.stack([_slot_accounts(p) for p in plans])
        table = _LegTable.build(cols, items, legs, slot_accounts,
                                np.zeros(len(items), np.uint32), refund=True)
        return table, _records(cols, table, {
            i: (p.id, p.version, originals[i]["id"]) for i, p in zip(items.tolist(), plans)})

    @staticmethod
    def _allocate(cols, batch, originals, records, refunded, precheck, rows) -> None:
        original_legs = np.zeros((len(batch), LEGS_MAX), np.uint64)
        refunded_legs = np.zeros((len(batch), LEGS_MAX), np.uint64)
        for k, i in enumerate(batch):
            original = originals[i]
            for slot, value in zip(original["slots"], original["amounts"]):
                if slot != SLOT_RESERVE:  # the reserve is the credit account's own hold
                    original_legs[k, slot] = value
            own = records.get(cols.ids[i])
            done = [0] * LEGS_MAX if own is None else _add([0] * LEGS_MAX, own, sign=-1)
            for slot, value in enumerate(refunded.get(original["id"], [0] * LEGS_MAX)):
                refunded_legs[k, slot] = value + done[slot]  # a replay does not count itself
        out = np.zeros((len(batch), LEGS_MAX), np.uint64)
        result = np.zeros(len(batch), np.uint32)
        amount = np.minimum(cols.amount[batch].astype(np.uint64), np.uint64(BALANCE_MAX))
        _fee.allocate_refunds(original_legs, refunded_legs, amount, out, result)
        for k, i in enumerate(batch):
            own = records.get(cols.ids[i])
            if own is not None and own["amount"] == cols.amount[i]:
                row = [0] * LEGS_MAX  # a replay reproduces what was recorded
                for slot, value in zip(own["slots"], own["amounts"]):
                    row[slot] = value
            elif result[k] or cols.amount[i] == 0:
                precheck[i] = result[k]  # zero: the balance kernel says AMOUNT_MUST_NOT_BE_ZERO
                continue
            else:
                row = out[k].tolist()
                _add(refunded.setdefault(originals[i]["id"], [0] * LEGS_MAX),
                     {"slots": range(LEGS_MAX), "amounts": row})
            rows[i] = row


def _slot_accounts(schedule: FeeSchedule) -> np.ndarray:
    """LEGS_MAX x 16: the account each slot credits (zero for SLOT_NET and unused slots)."""
    accounts = np.zeros((LEGS_MAX, ID_BYTES), np.uint8)
    for slot, account in schedule.slot_credit_accounts().items():
        accounts[slot] = np.frombuffer(account, np.uint8)
    return accounts


def _records(cols: TransferColumns, table: _LegTable, origin: dict[int, tuple]) -> dict[int, tuple]:
    """fee_transfers rows (without the commit timestamp) of the items of a leg table."""
    out: dict[int, tuple] = {}
    if not len(table.item):
        return out
    starts = np.flatnonzero(np.concatenate([[True], table.item[1:] != table.item[:-1]]))
    ends = np.concatenate([starts[1:], [len(table.item)]])
    slots, amounts = table.slot.tolist(), table.amount.tolist()
    items = table.item[starts].tolist()
    ledgers, gross = cols.ledger[items].tolist(), cols.amount[items].tolist()
    for i, start, end, ledger, amount in zip(items, starts.tolist(), ends.tolist(), ledgers, gross):
        schedule_id, version, refund_of = origin[i]
        out[i] = (cols.ids[i], schedule_id, version, refund_of, cols.debit_ids[i],
                  cols.credit_ids[i], ledger, amount, slots[start:end], amounts[start:end])
    return out


def _assemble(cols: TransferColumns, table: _LegTable, precheck: np.ndarray,
              records: dict[int, tuple], versions: list[int], locks) -> Expansion:
    """Every item that has legs replaced by them, every other item as it came, in order."""
    n = len(cols)
    through = np.ones(n, bool)
    through[table.item] = False
    kept = np.flatnonzero(through)
    # Rows: the items passed through, then the legs; a stable sort by item puts them in order.
    item = np.concatenate([kept, table.item])
    order = np.argsort(item, kind="stable")
    kept_list = kept.tolist()

    def merge(own, legs):
        return np.concatenate([own, legs])[order]

    ids = [cols.ids[i] for i in kept_list] + table.ids
    debit = np.concatenate([_as_array([cols.debit_ids[i] for i in kept_list]), table.debit])[order]
    credit = np.concatenate([_as_array([cols.credit_ids[i] for i in kept_list]), table.credit])[order]
    pending = [cols.pending_ids[i] for i in kept_list] + [ZERO_ID] * len(table.ids)
    item_sorted = item[order]
    order_list = order.tolist()
    expanded = TransferColumns(
        ids=[ids[k] for k in order_list], debit_ids=_as_list(debit), credit_ids=_as_list(credit),
        pending_ids=[pending[k] for k in order_list],
        amount=merge(cols.amount[kept].astype(np.uint64), table.amount),
        ledger=cols.ledger[item_sorted].astype(np.uint32),
        code=cols.code[item_sorted].astype(np.uint32),
        flags=merge(cols.flags[kept].astype(np.uint32), table.flags),
        timeout_seconds=merge(cols.timeout_seconds[kept].astype(np.uint32), table.timeout),
        user_data=[cols.user_data[i] for i in item_sorted.tolist()],
        # Items with legs have no precheck: a failure decided here passes the item through.
        precheck=precheck[item_sorted],
    )
    first = np.flatnonzero(np.concatenate([[True], item_sorted[1:] != item_sorted[:-1]]))
    first_list = first.tolist()
    expanded.fee_records = [(first_list[i], record) for i, record in records.items()]
    legs: list[list[Leg]] = [[] for _ in range(n)]
    slots, amounts = table.slot.tolist(), table.amount.tolist()
    flags, timeouts = table.flags.tolist(), table.timeout.tolist()
    debit_ids, credit_ids = _as_list(table.debit), _as_list(table.credit)
    for k, i in enumerate(table.item.tolist()):
        legs[i].append(Leg(table.ids[k], debit_ids[k], credit_ids[k], amounts[k],
                           SLOT_KINDS[slots[k]], slots[k], flags[k], timeouts[k]))
    return Expansion(expanded, first, legs, versions, locks)


def _add(total: list[int], record, sign: int = 1) -> list[int]:
    for slot, value in zip(record["slots"], record["amounts"]):
        total[slot] += sign * value
    return total
