"""Expansion of fee transfers and refunds into linked chains of legs, before the balance kernel.

A transfer that names a fee schedule becomes the legs the fee kernel computes, in slot order:
the first carries the transfer's id, the others an id derived from (transfer id, slot), so a
replay yields the same ids and the balance kernel answers EXISTS. The legs are LINKED to each
other, and the last carries the transfer's own LINKED bit, so the chain commits entirely or not
at all and a caller's own chain still spans it. A refund reverses the legs of its original in
proportion to its amount (allocate_refunds). Every other item passes through unchanged, and a
request without fees never comes here.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import weakref

import numpy as np

from engine.fees.schedule import (LEGS_MAX, SLOT_NET, SLOT_RESERVE, FeeSchedule, LegKind,
                                  slot_kind, tables)
from engine.ids import ZERO_ID
from engine.kernels import _fee
from engine.kernels import constants as c
from engine.posting.batch import Outcome, TransferColumns
from engine.storage.store import Store

LINKED = c.TRANSFER_FLAG_LINKED
PENDING = c.TRANSFER_FLAG_PENDING
# Immutable schedule versions kept in memory, (id, version) -> schedule.
SCHEDULE_CACHE_MAX = 4_096


def leg_id(transfer_id: bytes, slot: int) -> bytes:
    """The id of a leg other than the first: a hash of the transfer id and the slot."""
    return hashlib.blake2b(transfer_id + bytes([slot]), digest_size=16,
                           person=b"txengine-leg").digest()


@dataclasses.dataclass(frozen=True)
class Leg:
    id: bytes
    debit_account_id: bytes
    credit_account_id: bytes
    amount: int
    kind: LegKind
    slot: int
    flags: int
    timeout_seconds: int


@dataclasses.dataclass
class _Item:
    """One request item and what it became: legs (or a single failed item) and a record."""

    legs: list[Leg] | None = None
    precheck: int = 0
    version: int = 0
    record: tuple | None = None


class Expansion:
    """The expanded request, and how to fold the legs' results back into one per item."""

    def __init__(self, columns: TransferColumns, spans: list[tuple[int, int]],
                 items: list[_Item | None], locks: list[asyncio.Lock]):
        self.columns = columns
        self.spans = spans  # per item: (first leg, leg count) in `columns`
        self.items = items  # per item: None for an item without fees
        self._locks = locks

    def release(self) -> None:
        for lock in self._locks:
            lock.release()
        self._locks = []

    def collapse(self, outcome: Outcome) -> Outcome:
        """One result per request item: the first leg result that is neither OK nor
        LINKED_EVENT_FAILED, else LINKED_EVENT_FAILED if any, else OK; the first leg's
        timestamp."""
        results, timestamps, legs, versions = [], [], [], []
        for (first, count), item in zip(self.spans, self.items):
            span = outcome.results[first:first + count]
            decided = next((r for r in span if r not in (c.TRANSFER_OK, c.TRANSFER_LINKED_EVENT_FAILED)),
                           c.TRANSFER_LINKED_EVENT_FAILED if c.TRANSFER_LINKED_EVENT_FAILED in span
                           else c.TRANSFER_OK)
            results.append(decided)
            timestamps.append(outcome.timestamps[first])
            legs.append((item.legs or []) if item is not None else [])
            versions.append(item.version if item is not None else 0)
        return Outcome(results, timestamps, legs, versions)


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
        items: list[_Item | None] = [None] * n
        fee_items = [i for i in range(n) if cols.fee_schedule_ids[i] != ZERO_ID
                     and cols.refund_of[i] == ZERO_ID]
        refund_items = [i for i in range(n) if cols.refund_of[i] != ZERO_ID]
        named = [cols.ids[i] for i in fee_items + refund_items] + [cols.refund_of[i] for i in refund_items]
        records = {r["id"]: r for r in await self.store.fee_transfers(list(set(named)))} if named else {}
        locks = await self._lock([cols.refund_of[i] for i in refund_items])
        try:
            schedules = await self._expand_fees(cols, fee_items, records, items)
            await self._expand_refunds(cols, refund_items, records, schedules, items)
        except BaseException:
            for lock in locks:
                lock.release()
            raise
        return self._assemble(cols, items, locks)

    async def _lock(self, originals: list[bytes]) -> list[asyncio.Lock]:
        locks = []
        for original in sorted(set(originals)):  # one order everywhere: no deadlock
            lock = self._refund_locks.get(original)
            if lock is None:
                lock = self._refund_locks[original] = asyncio.Lock()
            await lock.acquire()
            locks.append(lock)
        return locks

    async def _expand_fees(self, cols, fee_items, records, items) -> dict:
        # A replay uses the version its first attempt recorded, whatever came later.
        keys = []
        for i in fee_items:
            record = records.get(cols.ids[i])
            version = record["schedule_version"] if record is not None and record["refund_of"] is None \
                else int(cols.fee_schedule_versions[i])
            keys.append((cols.fee_schedule_ids[i], version))
        refund_keys = [(r["schedule_id"], r["schedule_version"]) for r in records.values()]
        schedules = await self.schedules(keys + refund_keys)
        runnable = [(i, schedules[k]) for i, k in zip(fee_items, keys) if k in schedules]
        for i, k in zip(fee_items, keys):
            if k not in schedules:
                items[i] = _Item(precheck=c.TRANSFER_FEE_SCHEDULE_NOT_FOUND)
        if not runnable:
            return schedules
        plans = list({id(s): s for _, s in runnable}.values())
        row_of = {id(s): k for k, s in enumerate(plans)}
        t = tables(plans)
        amount = np.array([cols.amount[i] for i, _ in runnable], np.uint64)
        legs = np.zeros((len(runnable), LEGS_MAX), np.uint64)
        result = np.zeros(len(runnable), np.uint32)
        # No balance can take more than 2^63-1: such an item fails as the balance kernel says.
        over = amount > np.uint64(2**63 - 1)
        amount[over] = 1
        _fee.expand_fees(amount, np.array([row_of[id(s)] for _, s in runnable], np.int32),
                         t.schedules, t.fees, t.tiers, t.split_weights, legs, result)
        for k, (i, schedule) in enumerate(runnable):
            if over[k] or result[k]:
                items[i] = _Item(precheck=c.TRANSFER_OVERFLOWS_DEBITS if over[k] else int(result[k]),
                                 version=schedule.version)
                continue
            row = legs[k].tolist()
            accounts = schedule.slot_credit_accounts()
            debit, credit = cols.debit_ids[i], cols.credit_ids[i]
            built = []
            for slot in range(LEGS_MAX):
                if not row[slot]:
                    continue
                if slot == SLOT_RESERVE:
                    built.append((slot, credit, accounts[slot], PENDING,
                                  schedule.reserve_timeout_seconds))
                else:
                    built.append((slot, debit, credit if slot == SLOT_NET else accounts[slot], 0, 0))
            items[i] = _Item(
                legs=self._legs(cols.ids[i], cols.flags[i], built, row), version=schedule.version,
                record=(cols.ids[i], schedule.id, schedule.version, None, debit, credit,
                        int(cols.ledger[i]), int(cols.amount[i]),
                        [s for s in range(LEGS_MAX) if row[s]], [v for v in row if v]))
        return schedules

    async def _expand_refunds(self, cols, refund_items, records, schedules, items) -> None:
        if not refund_items:
            return
        originals = {}
        for i in refund_items:
            original = records.get(cols.refund_of[i])
            if (original is None or original["refund_of"] is not None
                    or original["credit_account_id"] != cols.debit_ids[i]
                    or original["debit_account_id"] != cols.credit_ids[i]
                    or original["ledger"] != cols.ledger[i]
                    or (original["schedule_id"], original["schedule_version"]) not in schedules):
                items[i] = _Item(precheck=c.TRANSFER_REFUND_ORIGINAL_NOT_FOUND)
            else:
                originals[i] = original
        earlier = await self.store.refunds_of(list({r["id"] for r in originals.values()}))
        refunded: dict[bytes, list[int]] = {}
        for row in earlier:
            _add(refunded.setdefault(row["refund_of"], [0] * LEGS_MAX), row)
        # Refunds of one original in one request are allocated one after the other.
        pending = [i for i in refund_items if i in originals]
        while pending:
            seen, now, later = set(), [], []
            for i in pending:
                (later if cols.refund_of[i] in seen else now).append(i)
                seen.add(cols.refund_of[i])
            self._allocate(cols, now, originals, records, refunded, schedules, items)
            pending = later

    def _allocate(self, cols, batch, originals, records, refunded, schedules, items) -> None:
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
        amount = np.minimum(np.array([cols.amount[i] for i in batch], np.uint64), np.uint64(2**63 - 1))
        _fee.allocate_refunds(original_legs, refunded_legs, amount, out, result)
        for k, i in enumerate(batch):
            original = originals[i]
            own = records.get(cols.ids[i])
            if own is not None and own["amount"] == cols.amount[i]:
                row = [0] * LEGS_MAX  # a replay reproduces what was recorded
                for slot, value in zip(own["slots"], own["amounts"]):
                    row[slot] = value
            elif result[k] or cols.amount[i] == 0:
                items[i] = _Item(precheck=int(result[k]))
                continue
            else:
                row = out[k].tolist()
                _add(refunded.setdefault(original["id"], [0] * LEGS_MAX),
                     {"slots": range(LEGS_MAX), "amounts": row})
            schedule = schedules[(original["schedule_id"], original["schedule_version"])]
            accounts = schedule.slot_credit_accounts()
            payer, merchant = original["debit_account_id"], original["credit_account_id"]
            built = [(slot, merchant if slot == SLOT_NET else accounts[slot], payer, 0, 0)
                     for slot in range(LEGS_MAX) if row[slot]]
            items[i] = _Item(
                legs=self._legs(cols.ids[i], cols.flags[i], built, row),
                version=schedule.version,
                record=(cols.ids[i], schedule.id, schedule.version, original["id"],
                        cols.debit_ids[i], cols.credit_ids[i], int(cols.ledger[i]),
                        int(cols.amount[i]), [s for s in range(LEGS_MAX) if row[s]],
                        [v for v in row if v]))

    @staticmethod
    def _legs(transfer_id: bytes, flags, built, row) -> list[Leg]:
        legs = []
        for k, (slot, debit, credit, extra_flags, timeout) in enumerate(built):
            last = k == len(built) - 1
            link = int(flags) & LINKED if last else LINKED
            legs.append(Leg(id=transfer_id if k == 0 else leg_id(transfer_id, slot),
                            debit_account_id=debit, credit_account_id=credit,
                            amount=int(row[slot]), kind=slot_kind(slot), slot=slot,
                            flags=link | extra_flags, timeout_seconds=timeout))
        return legs

    @staticmethod
    def _assemble(cols: TransferColumns, items: list[_Item | None], locks) -> Expansion:
        ids, debit_ids, credit_ids, pending_ids, user_data = [], [], [], [], []
        amount, ledger, code, flags, timeout, precheck = [], [], [], [], [], []
        spans, records = [], []
        for i, item in enumerate(items):
            spans.append((len(ids), len(item.legs) if item is not None and item.legs else 1))
            if item is None or not item.legs:
                ids.append(cols.ids[i])
                debit_ids.append(cols.debit_ids[i])
                credit_ids.append(cols.credit_ids[i])
                pending_ids.append(cols.pending_ids[i])
                user_data.append(cols.user_data[i])
                amount.append(cols.amount[i])
                ledger.append(cols.ledger[i])
                code.append(cols.code[i])
                flags.append(cols.flags[i])
                timeout.append(cols.timeout_seconds[i])
                precheck.append(cols.precheck[i] or (item.precheck if item is not None else 0))
                continue
            records.append((len(ids), item.record))
            for leg in item.legs:
                ids.append(leg.id)
                debit_ids.append(leg.debit_account_id)
                credit_ids.append(leg.credit_account_id)
                pending_ids.append(ZERO_ID)
                user_data.append(cols.user_data[i])
                amount.append(leg.amount)
                ledger.append(cols.ledger[i])
                code.append(cols.code[i])
                flags.append(leg.flags)
                timeout.append(leg.timeout_seconds)
                precheck.append(cols.precheck[i])
        expanded = TransferColumns(
            ids=ids, debit_ids=debit_ids, credit_ids=credit_ids, pending_ids=pending_ids,
            amount=np.array(amount, np.uint64), ledger=np.array(ledger, np.uint32),
            code=np.array(code, np.uint32), flags=np.array(flags, np.uint32),
            timeout_seconds=np.array(timeout, np.uint32), user_data=user_data,
            precheck=np.array(precheck, np.uint32), fee_records=records,
        )
        return Expansion(expanded, spans, items, locks)


def _add(total: list[int], record, sign: int = 1) -> list[int]:
    for slot, value in zip(record["slots"], record["amounts"]):
        total[slot] += sign * value
    return total
