"""In-memory accounts of the shards this process owns, and the rules for creating accounts.

While the process holds the shard lease its cache is authoritative: balances are read and
changed here, and each commit writes the changed rows. Balances sit in columnar numpy arrays
indexed by slot so the balance kernel works on them in place.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from engine.limits import ACCOUNT_CACHE_MAX
from engine.results import AccountFlags, ClosureResult
from engine.results import AccountResult as AR

ACCOUNT_FLAGS_KNOWN = sum(AccountFlags)
_LIMIT_FLAGS = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS | AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS


class AccountCacheFull(Exception):
    """More accounts than ACCOUNT_CACHE_MAX would be in memory."""


@dataclasses.dataclass(frozen=True)
class NewAccount:
    """One account of a CreateAccounts request, validated for shape by the servicer."""

    id: bytes
    ledger: int
    code: int
    flags: int
    user_data: bytes
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    timestamp: int = 0


class AccountCache:
    """Columnar account state: slot -> fields; id -> slot."""

    _GROW = 1024

    def __init__(self) -> None:
        self.slot_of: dict[bytes, int] = {}
        self.ids: list[bytes] = []
        self.user_data: list[bytes] = []
        self.size = 0
        capacity = self._GROW
        self.shard = np.zeros(capacity, np.int32)
        self.ledger = np.zeros(capacity, np.uint32)
        self.code = np.zeros(capacity, np.uint32)
        self.flags = np.zeros(capacity, np.uint32)
        self.debits_pending = np.zeros(capacity, np.uint64)
        self.debits_posted = np.zeros(capacity, np.uint64)
        self.credits_pending = np.zeros(capacity, np.uint64)
        self.credits_posted = np.zeros(capacity, np.uint64)
        self.timestamp = np.zeros(capacity, np.int64)

    _ARRAYS = ("shard", "ledger", "code", "flags", "debits_pending", "debits_posted",
               "credits_pending", "credits_posted", "timestamp")

    def _reserve(self, count: int) -> None:
        needed = self.size + count
        if needed > ACCOUNT_CACHE_MAX:
            raise AccountCacheFull(f"{needed} accounts exceed the cache limit {ACCOUNT_CACHE_MAX}")
        capacity = len(self.shard)
        if needed <= capacity:
            return
        while capacity < needed:
            capacity *= 2
        for name in self._ARRAYS:
            old = getattr(self, name)
            new = np.zeros(capacity, old.dtype)
            new[: self.size] = old[: self.size]
            setattr(self, name, new)

    def add(self, shard: int, id: bytes, ledger: int, code: int, flags: int, user_data: bytes,
            timestamp: int, debits_pending: int = 0, debits_posted: int = 0,
            credits_pending: int = 0, credits_posted: int = 0) -> int:
        assert id not in self.slot_of
        self._reserve(1)
        slot = self.size
        self.size += 1
        self.slot_of[id] = slot
        self.ids.append(id)
        self.user_data.append(user_data)
        self.shard[slot] = shard
        self.ledger[slot] = ledger
        self.code[slot] = code
        self.flags[slot] = flags
        self.debits_pending[slot] = debits_pending
        self.debits_posted[slot] = debits_posted
        self.credits_pending[slot] = credits_pending
        self.credits_posted[slot] = credits_posted
        self.timestamp[slot] = timestamp
        return slot

    def row(self, slot: int) -> tuple:
        """The account as a storage row (ACCOUNT_COLUMNS order)."""
        return (
            int(self.shard[slot]), self.ids[slot], int(self.ledger[slot]), int(self.code[slot]),
            int(self.flags[slot]), int(self.debits_pending[slot]), int(self.debits_posted[slot]),
            int(self.credits_pending[slot]), int(self.credits_posted[slot]),
            self.user_data[slot], int(self.timestamp[slot]),
        )

    def balances(self, slots: np.ndarray) -> tuple[list, list, list, list, list, list]:
        """(shard, id, debits_pending, debits_posted, credits_pending, credits_posted) columns."""
        return (
            self.shard[slots].tolist(), [self.ids[s] for s in slots.tolist()],
            self.debits_pending[slots].astype(np.int64).tolist(),
            self.debits_posted[slots].astype(np.int64).tolist(),
            self.credits_pending[slots].astype(np.int64).tolist(),
            self.credits_posted[slots].astype(np.int64).tolist(),
        )


def _validate(account: NewAccount) -> int:
    """Field checks, in the documented precedence; OK means go on to the existence check."""
    if account.timestamp != 0:
        return AR.TIMESTAMP_MUST_BE_ZERO
    if account.flags & ~ACCOUNT_FLAGS_KNOWN:
        return AR.RESERVED_FLAG
    if account.id == bytes(16):
        return AR.ID_MUST_NOT_BE_ZERO
    if account.flags & _LIMIT_FLAGS == _LIMIT_FLAGS:
        return AR.FLAGS_ARE_MUTUALLY_EXCLUSIVE
    if account.debits_pending:
        return AR.DEBITS_PENDING_MUST_BE_ZERO
    if account.debits_posted:
        return AR.DEBITS_POSTED_MUST_BE_ZERO
    if account.credits_pending:
        return AR.CREDITS_PENDING_MUST_BE_ZERO
    if account.credits_posted:
        return AR.CREDITS_POSTED_MUST_BE_ZERO
    if account.ledger == 0:
        return AR.LEDGER_MUST_NOT_BE_ZERO
    if account.code == 0:
        return AR.CODE_MUST_NOT_BE_ZERO
    return AR.OK


def _compare(account: NewAccount, flags: int, user_data: bytes, ledger: int, code: int) -> int:
    if account.flags != flags:
        return AR.EXISTS_WITH_DIFFERENT_FLAGS
    if account.user_data != user_data:
        return AR.EXISTS_WITH_DIFFERENT_USER_DATA
    if account.ledger != ledger:
        return AR.EXISTS_WITH_DIFFERENT_LEDGER
    if account.code != code:
        return AR.EXISTS_WITH_DIFFERENT_CODE
    return AR.EXISTS


def create_accounts(
    cache: AccountCache, accounts: list[NewAccount], shards: list[int], timestamp_base: int
) -> tuple[list[int], list[int], list[int]]:
    """Apply one CreateAccounts request to the cache, as if one account at a time.

    Returns (results, timestamps, slots created). Every id must already be loaded into the
    cache if it exists in storage. Linked chains commit entirely or not at all.
    """
    n = len(accounts)
    results = [0] * n
    timestamps = [0] * n
    created: list[int] = []
    start = 0
    while start < n:
        end = start
        while end < n - 1 and accounts[end].flags & AccountFlags.LINKED:
            end += 1
        chain = range(start, end + 1)
        if accounts[end].flags & AccountFlags.LINKED:  # the request ends inside a chain
            for i in chain:
                results[i] = AR.LINKED_EVENT_FAILED
            results[end] = AR.LINKED_EVENT_CHAIN_OPEN
            start = end + 1
            continue
        tentative: dict[bytes, int] = {}  # id -> index of the chain item that creates it
        failed_at = -1
        for i in chain:
            account = accounts[i]
            result = _validate(account)
            if result == AR.OK:
                if account.id in tentative:
                    first = accounts[tentative[account.id]]
                    result = _compare(account, first.flags, first.user_data, first.ledger, first.code)
                    timestamps[i] = timestamp_base + tentative[account.id]
                elif account.id in cache.slot_of:
                    slot = cache.slot_of[account.id]
                    result = _compare(account, int(cache.flags[slot]), cache.user_data[slot],
                                      int(cache.ledger[slot]), int(cache.code[slot]))
                    timestamps[i] = int(cache.timestamp[slot])
                else:
                    tentative[account.id] = i
                    timestamps[i] = timestamp_base + i
            if result not in (AR.OK, AR.EXISTS):
                timestamps[i] = 0
            results[i] = result
            if result not in (AR.OK, AR.EXISTS) and len(chain) > 1:
                failed_at = i
                break
        if failed_at >= 0:
            for i in chain:
                if i != failed_at:
                    results[i] = AR.LINKED_EVENT_FAILED
                    timestamps[i] = 0
        else:
            for account_id, i in tentative.items():
                account = accounts[i]
                created.append(cache.add(
                    shards[i], account_id, account.ledger, account.code, account.flags,
                    account.user_data, timestamps[i],
                ))
        start = end + 1
    return results, timestamps, created


def set_closed(cache: AccountCache, ids: list[bytes], close: bool,
               timestamp_base: int) -> tuple[list[int], list[int], list[int]]:
    """Set or clear CLOSED on existing accounts; returns (results, timestamps, slots changed).

    Idempotent: an account already in the requested state is OK and unchanged. Every id must
    already be loaded into the cache if it exists in storage.
    """
    results, timestamps, changed = [], [], []
    for index, account_id in enumerate(ids):
        slot = cache.slot_of.get(account_id)
        if account_id == bytes(16):
            results.append(ClosureResult.ID_MUST_NOT_BE_ZERO)
            timestamps.append(0)
            continue
        if slot is None:
            results.append(ClosureResult.ACCOUNT_NOT_FOUND)
            timestamps.append(0)
            continue
        flags = int(cache.flags[slot])
        wanted = flags | AccountFlags.CLOSED if close else flags & ~AccountFlags.CLOSED
        if wanted != flags:
            cache.flags[slot] = wanted
            changed.append(slot)
        results.append(ClosureResult.OK)
        timestamps.append(timestamp_base + index)
    return results, timestamps, changed
