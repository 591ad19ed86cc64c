"""Entitlement checks of one request, on every item and on both sides of every transfer.

The security interceptor puts the authenticated caller in the `CALLER` context variable; the
servicer asks the guard before anything reaches the posting engine. One unentitled item
rejects the whole request (`NotEntitled`, PERMISSION_DENIED) and nothing of it is applied.
Reads are filtered instead: what the caller may not see is left out, as if it did not exist.

Whether an account is entitled may depend on its ledger and code, which the guard looks up
(and keeps: they never change once an account exists). An account that does not exist is not
entitled, so a refusal never tells a caller whether an account outside its entitlement exists.
"""
from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Iterable

from engine.ids import ZERO_ID
from engine.posting.accounts import NewAccount
from engine.posting.batch import TransferColumns, shards_of
from engine.results import TransferFlags
from engine.security.policy import Entitlement, Policy
from engine.security.ratelimit import Rate, RateLimiter
from engine.storage.store import Store

# Account (ledger, code) pairs kept; the cache starts over when full.
ACCOUNT_ATTRIBUTES_MAX = 1_000_000
# Items named in a refusal; the rest are counted.
REFUSED_ITEMS_REPORTED_MAX = 20
RESOLVES_PENDING = TransferFlags.POST_PENDING_TRANSFER | TransferFlags.VOID_PENDING_TRANSFER
# The side of a post or void whose pending transfer is unknown: not an id, never entitled.
UNKNOWN_ACCOUNT = b"unknown"


@dataclasses.dataclass(frozen=True)
class Caller:
    """The authenticated principal of an RPC and its entitlement (None: unrestricted)."""

    principal: str
    entitlement: Entitlement | None


CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


class NotEntitled(Exception):
    """The caller may not do this; nothing of the request was applied."""

    def __init__(self, fields: list[str], reason: str = "not entitled"):
        shown = ", ".join(fields[:REFUSED_ITEMS_REPORTED_MAX])
        more = len(fields) - REFUSED_ITEMS_REPORTED_MAX
        super().__init__(f"{reason}: {shown}" + (f" and {more} more" if more > 0 else ""))
        self.fields = fields


def restricted() -> Entitlement | None:
    """The caller's entitlement when it restricts ledgers or accounts, else None."""
    caller = CALLER.get()
    if caller is None or caller.entitlement is None or caller.entitlement.unrestricted:
        return None
    return caller.entitlement


class Guard:
    """Decides entitlements of requests against the caller in `CALLER`."""

    def __init__(self, store: Store, policy: Policy | None = None,
                 limiter: RateLimiter | None = None):
        self.store = store
        self.policy = policy
        self.limiter = limiter
        self._attributes: dict[bytes, tuple[int, int]] = {}

    async def charge_items(self, count: int) -> None:
        """Charge `count` transfers or accounts to the caller's item rate (RateLimited)."""
        caller = CALLER.get()
        if caller is None or self.policy is None or self.limiter is None:
            return
        limits = self.policy.limits(caller.principal)
        await self.limiter.acquire("transfer", [Rate(
            f"{caller.principal}:transfers", limits.transfers_per_second, limits.burst_seconds,
            count)])

    async def _accounts(self, ids: Iterable[bytes]) -> dict[bytes, tuple[int, int]]:
        """(ledger, code) of each existing account among `ids`."""
        wanted = set(ids)
        wanted.discard(ZERO_ID)
        wanted.discard(UNKNOWN_ACCOUNT)
        missing = [i for i in wanted if i not in self._attributes]
        if missing:
            if len(self._attributes) + len(missing) > ACCOUNT_ATTRIBUTES_MAX:
                self._attributes.clear()
            shards = shards_of(missing, self.store.shard_count).tolist()
            for row in await self.store.lookup_accounts(shards, missing):
                self._attributes[row["id"]] = (row["ledger"], row["code"])
        return {i: self._attributes[i] for i in wanted if i in self._attributes}

    async def _entitled(self, entitlement: Entitlement, ids: Iterable[bytes]) -> set[bytes]:
        ids = set(ids)
        known = await self._accounts(ids)
        return {i for i in ids if i in known and entitlement.account_ok(i, *known[i])}

    # -- writes ----------------------------------------------------------------------------

    async def check_transfers(self, columns: TransferColumns) -> None:
        entitlement = restricted()
        if entitlement is None:
            return
        sides = await self._sides(columns)
        entitled = await self._entitled(entitlement, (i for pair in sides for i in pair))
        refused = []
        for index, (debit, credit) in enumerate(sides):
            ledger = int(columns.ledger[index])
            if ledger and not entitlement.ledger_ok(ledger):
                refused.append(f"transfers[{index}].ledger")
            if debit != ZERO_ID and debit not in entitled:
                refused.append(f"transfers[{index}].debit_account_id")
            if credit != ZERO_ID and credit not in entitled:
                refused.append(f"transfers[{index}].credit_account_id")
        if refused:
            raise NotEntitled(refused)

    async def _sides(self, columns: TransferColumns) -> list[tuple[bytes, bytes]]:
        """The accounts each transfer moves money between. A post or void that leaves an
        account empty takes it from its pending transfer (earlier in the request, or
        committed); when that is unknown the side stays unknown, which is never entitled."""
        sides = list(zip(columns.debit_ids, columns.credit_ids))
        resolving = [i for i, flags in enumerate(columns.flags.tolist())
                     if flags & RESOLVES_PENDING and ZERO_ID in sides[i]]
        if not resolving:
            return sides
        earlier: dict[bytes, tuple[bytes, bytes]] = {}
        for index, transfer_id in enumerate(columns.ids):
            earlier.setdefault(transfer_id, sides[index])
        pending_ids = [columns.pending_ids[i] for i in resolving
                       if columns.pending_ids[i] not in earlier]
        committed: dict[bytes, tuple[bytes, bytes]] = {}
        if pending_ids:
            shards = shards_of(pending_ids, self.store.shard_count).tolist()
            for row in await self.store.lookup_transfers(shards, pending_ids):
                committed[row["id"]] = (row["debit_account_id"], row["credit_account_id"])
        unknown = (UNKNOWN_ACCOUNT, UNKNOWN_ACCOUNT)
        for i in resolving:
            pending = earlier.get(columns.pending_ids[i]) or committed.get(columns.pending_ids[i])
            debit, credit = sides[i]
            pending_debit, pending_credit = pending or unknown
            sides[i] = (debit if debit != ZERO_ID else pending_debit,
                        credit if credit != ZERO_ID else pending_credit)
        return sides

    def check_accounts(self, accounts: list[NewAccount]) -> None:
        entitlement = restricted()
        if entitlement is None:
            return
        refused = [f"accounts[{index}]" for index, a in enumerate(accounts)
                   if a.ledger and a.code and not entitlement.account_ok(a.id, a.ledger, a.code)]
        if refused:
            raise NotEntitled(refused)

    async def check_account_ids(self, ids: list[bytes]) -> None:
        entitlement = restricted()
        if entitlement is None:
            return
        entitled = await self._entitled(entitlement, ids)
        refused = [f"ids[{index}]" for index, i in enumerate(ids)
                   if i != ZERO_ID and i not in entitled]
        if refused:
            raise NotEntitled(refused)

    # -- reads -----------------------------------------------------------------------------

    async def visible_accounts(self, rows: list) -> list:
        entitlement = restricted()
        if entitlement is None:
            return rows
        return [r for r in rows if entitlement.account_ok(r["id"], r["ledger"], r["code"])]

    async def visible_transfers(self, rows: list) -> list:
        """Transfers on an entitled ledger that touch at least one entitled account."""
        entitlement = restricted()
        if entitlement is None:
            return rows
        entitled = await self._entitled(
            entitlement, (i for r in rows for i in (r["debit_account_id"], r["credit_account_id"])))
        return [r for r in rows if entitlement.ledger_ok(r["ledger"])
                and (r["debit_account_id"] in entitled or r["credit_account_id"] in entitled)]

    def visible_account_messages(self, accounts: list) -> list:
        """visible_accounts for Account messages (the Redis projection's)."""
        entitlement = restricted()
        if entitlement is None:
            return accounts
        return [a for a in accounts if entitlement.account_ok(a.id, a.ledger, a.code)]

    def event_ledgers(self, what: str) -> frozenset[int] | None:
        """The ledgers whose events the caller may follow (None: every ledger).

        The event stream and webhooks carry every change of a ledger, so an entitlement that
        names accounts (by code or id) cannot follow them at all (NotEntitled, naming `what`);
        one that names ledgers gets the events of those ledgers."""
        entitlement = restricted()
        if entitlement is None:
            return None
        if not entitlement.all_accounts:
            raise NotEntitled([what], "events carry every account of a ledger, and the "
                                      "entitlement names accounts")
        return entitlement.ledgers

    async def account_visible(self, account_id: bytes) -> bool:
        entitlement = restricted()
        if entitlement is None:
            return True
        return account_id in await self._entitled(entitlement, [account_id])
