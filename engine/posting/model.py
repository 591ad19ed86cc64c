"""A plain-Python model of the whole ledger: the specification the engine is checked against.

It applies accounts and transfers one at a time with dictionaries and Python ints, written from
the contract (README "Results and their precedence", two-phase and balancing semantics), not
from the kernels. Stateful tests drive the engine and this model side by side; the offline
history checker replays committed transfers through it in timestamp order.
"""
from __future__ import annotations

import dataclasses

from engine.limits import BALANCE_MAX, ID_BYTES
from engine.results import AccountFlags as AF
from engine.results import AccountResult as AR
from engine.results import ClosureResult as CR
from engine.results import TransferFlags as TF
from engine.results import TransferResult as TR

ZERO = bytes(ID_BYTES)
TIMESTAMP_MAX = 2**63 - 1
PENDING, POSTED, VOIDED, EXPIRED = 1, 2, 3, 4
_KNOWN_TRANSFER_FLAGS = sum(TF)
_KNOWN_ACCOUNT_FLAGS = sum(AF)
_LIMITS = AF.DEBITS_MUST_NOT_EXCEED_CREDITS | AF.CREDITS_MUST_NOT_EXCEED_DEBITS


@dataclasses.dataclass
class ModelAccount:
    id: bytes
    ledger: int
    code: int
    flags: int
    user_data: bytes = b""
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0
    timestamp: int = 0
    history: list[tuple[int, int, int, int, int]] = dataclasses.field(default_factory=list)

    def balances(self) -> tuple[int, int, int, int]:
        return (self.debits_pending, self.debits_posted, self.credits_pending, self.credits_posted)


@dataclasses.dataclass
class ModelTransfer:
    id: bytes
    debit_account_id: bytes = ZERO
    credit_account_id: bytes = ZERO
    amount: int = 0
    pending_id: bytes = ZERO
    ledger: int = 0
    code: int = 0
    flags: int = 0
    timeout_seconds: int = 0
    user_data: bytes = b""
    timestamp: int = 0
    # State of a committed pending transfer; expires_at 0 means never.
    status: int = 0
    expires_at: int = 0


class LedgerModel:
    """Accounts and transfers by id; every operation returns per-item (result, timestamp)."""

    def __init__(self) -> None:
        self.accounts: dict[bytes, ModelAccount] = {}
        self.transfers: dict[bytes, ModelTransfer] = {}

    # -- accounts --------------------------------------------------------------------------

    def create_accounts(self, items: list[ModelAccount], timestamps: list[int]) -> list[tuple[int, int]]:
        """`timestamps[i]` is the commit timestamp item i gets if it is created."""
        return self._chains(items, timestamps, self._create_account, AF.LINKED)

    def _create_account(self, a: ModelAccount, timestamp: int, undo: list) -> tuple[int, int]:
        if a.timestamp:
            return AR.TIMESTAMP_MUST_BE_ZERO, 0
        if a.flags & ~_KNOWN_ACCOUNT_FLAGS:
            return AR.RESERVED_FLAG, 0
        if a.id == ZERO:
            return AR.ID_MUST_NOT_BE_ZERO, 0
        if a.flags & _LIMITS == _LIMITS:
            return AR.FLAGS_ARE_MUTUALLY_EXCLUSIVE, 0
        for value, result in ((a.debits_pending, AR.DEBITS_PENDING_MUST_BE_ZERO),
                              (a.debits_posted, AR.DEBITS_POSTED_MUST_BE_ZERO),
                              (a.credits_pending, AR.CREDITS_PENDING_MUST_BE_ZERO),
                              (a.credits_posted, AR.CREDITS_POSTED_MUST_BE_ZERO)):
            if value:
                return result, 0
        if a.ledger == 0:
            return AR.LEDGER_MUST_NOT_BE_ZERO, 0
        if a.code == 0:
            return AR.CODE_MUST_NOT_BE_ZERO, 0
        e = self.accounts.get(a.id)
        if e is not None:
            for same, result in ((a.flags == e.flags, AR.EXISTS_WITH_DIFFERENT_FLAGS),
                                 (a.user_data == e.user_data, AR.EXISTS_WITH_DIFFERENT_USER_DATA),
                                 (a.ledger == e.ledger, AR.EXISTS_WITH_DIFFERENT_LEDGER),
                                 (a.code == e.code, AR.EXISTS_WITH_DIFFERENT_CODE)):
                if not same:
                    return result, 0
            return AR.EXISTS, e.timestamp
        self.accounts[a.id] = dataclasses.replace(a, timestamp=timestamp, history=[])
        undo.append(lambda: self.accounts.pop(a.id))
        return AR.OK, timestamp

    def set_closed(self, ids: list[bytes], close: bool) -> list[int]:
        """CloseAccounts / ReopenAccounts: results per id."""
        results = []
        for account_id in ids:
            account = self.accounts.get(account_id)
            if account_id == ZERO:
                results.append(CR.ID_MUST_NOT_BE_ZERO)
            elif account is None:
                results.append(CR.ACCOUNT_NOT_FOUND)
            else:
                account.flags = account.flags | AF.CLOSED if close else account.flags & ~AF.CLOSED
                results.append(CR.OK)
        return results

    # -- transfers -------------------------------------------------------------------------

    def create_transfers(self, items: list[ModelTransfer], timestamps: list[int]) -> list[tuple[int, int]]:
        """Apply one request; `timestamps[i]` is the commit timestamp of item i."""
        return self._chains(items, timestamps, self._create_transfer, TF.LINKED)

    def expire(self, now: int) -> list[bytes]:
        """Release every open reservation whose expiry is at or before `now`."""
        lapsed = sorted((t for t in self.transfers.values()
                         if t.status == PENDING and t.expires_at and t.expires_at <= now),
                        key=lambda t: t.expires_at)
        for t in lapsed:
            dr, cr = self.accounts[t.debit_account_id], self.accounts[t.credit_account_id]
            dr.debits_pending -= t.amount
            cr.credits_pending -= t.amount
            t.status = EXPIRED
            self._record_history(dr, cr, now)
        return [t.id for t in lapsed]

    def _chains(self, items, timestamps, apply_one, linked_flag) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        i = 0
        while i < len(items):
            end = i
            while end < len(items) - 1 and items[end].flags & linked_flag:
                end += 1
            failed_result = TR.LINKED_EVENT_FAILED  # same number in both enums
            if items[end].flags & linked_flag:  # the request ends inside the chain
                out.extend([(failed_result, 0)] * (end - i) + [(TR.LINKED_EVENT_CHAIN_OPEN, 0)])
                i = end + 1
                continue
            undo: list = []
            chain: list[tuple[int, int]] = []
            for k in range(i, end + 1):
                result, ts = apply_one(items[k], timestamps[k], undo)
                chain.append((result, ts))
                if result not in (TR.OK, TR.EXISTS) and end > i:
                    for step in reversed(undo):
                        step()
                    chain = [(failed_result, 0)] * (k - i) + [(result, 0)]
                    chain += [(failed_result, 0)] * (end - k)
                    break
            out.extend(chain)
            i = end + 1
        return out

    def _create_transfer(self, t: ModelTransfer, timestamp: int, undo: list) -> tuple[int, int]:
        result = self._validate(t)
        if result != TR.OK:
            return result, 0
        if t.flags & (TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER):
            return self._post_or_void(t, timestamp, undo)
        dr = self.accounts.get(t.debit_account_id)
        if dr is None:
            return TR.DEBIT_ACCOUNT_NOT_FOUND, 0
        cr = self.accounts.get(t.credit_account_id)
        if cr is None:
            return TR.CREDIT_ACCOUNT_NOT_FOUND, 0
        if dr.ledger != cr.ledger:
            return TR.ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER, 0
        if t.ledger != dr.ledger:
            return TR.TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS, 0
        if t.id in self.transfers:
            return self._exists(t, self.transfers[t.id])
        if dr.flags & AF.CLOSED:
            return TR.DEBIT_ACCOUNT_CLOSED, 0
        if cr.flags & AF.CLOSED:
            return TR.CREDIT_ACCOUNT_CLOSED, 0
        amount = t.amount
        if t.flags & TF.BALANCING_DEBIT:
            amount = min(amount, max(0, dr.credits_posted - dr.debits_posted - dr.debits_pending))
        if t.flags & TF.BALANCING_CREDIT:
            amount = min(amount, max(0, cr.debits_posted - cr.credits_posted - cr.credits_pending))
        pending = bool(t.flags & TF.PENDING)
        if pending:
            if amount > BALANCE_MAX - dr.debits_pending:
                return TR.OVERFLOWS_DEBITS_PENDING, 0
            if amount > BALANCE_MAX - cr.credits_pending:
                return TR.OVERFLOWS_CREDITS_PENDING, 0
        else:
            if amount > BALANCE_MAX - dr.debits_posted:
                return TR.OVERFLOWS_DEBITS_POSTED, 0
            if amount > BALANCE_MAX - cr.credits_posted:
                return TR.OVERFLOWS_CREDITS_POSTED, 0
        if dr.debits_pending + dr.debits_posted + amount > BALANCE_MAX:
            return TR.OVERFLOWS_DEBITS, 0
        if cr.credits_pending + cr.credits_posted + amount > BALANCE_MAX:
            return TR.OVERFLOWS_CREDITS, 0
        if pending and t.timeout_seconds and timestamp + t.timeout_seconds * 10**9 > TIMESTAMP_MAX:
            return TR.OVERFLOWS_TIMEOUT, 0
        if (dr.flags & AF.DEBITS_MUST_NOT_EXCEED_CREDITS
                and dr.debits_pending + dr.debits_posted + amount > dr.credits_posted):
            return TR.EXCEEDS_CREDITS, 0
        if (cr.flags & AF.CREDITS_MUST_NOT_EXCEED_DEBITS
                and cr.credits_pending + cr.credits_posted + amount > cr.debits_posted):
            return TR.EXCEEDS_DEBITS, 0
        stored = dataclasses.replace(t, amount=amount, timestamp=timestamp)
        if pending:
            stored.status = PENDING
            stored.expires_at = timestamp + t.timeout_seconds * 10**9 if t.timeout_seconds else 0
            self._move(dr, cr, pending_delta=amount, posted_delta=0, undo=undo)
        else:
            self._move(dr, cr, pending_delta=0, posted_delta=amount, undo=undo)
        self._commit(stored, dr, cr, undo)
        return TR.OK, timestamp

    def _validate(self, t: ModelTransfer) -> int:
        if t.timestamp:
            return TR.TIMESTAMP_MUST_BE_ZERO
        if t.flags & ~_KNOWN_TRANSFER_FLAGS:
            return TR.RESERVED_FLAG
        if t.id == ZERO:
            return TR.ID_MUST_NOT_BE_ZERO
        phases = sum(bool(t.flags & f) for f in (TF.PENDING, TF.POST_PENDING_TRANSFER,
                                                  TF.VOID_PENDING_TRANSFER))
        resolving = t.flags & (TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER)
        balancing = t.flags & (TF.BALANCING_DEBIT | TF.BALANCING_CREDIT)
        if phases > 1 or (resolving and balancing):
            return TR.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        if resolving:
            if t.pending_id == ZERO:
                return TR.PENDING_ID_MUST_NOT_BE_ZERO
            if t.pending_id == t.id:
                return TR.PENDING_ID_MUST_BE_DIFFERENT
            if t.timeout_seconds:
                return TR.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
            return TR.OK
        if t.debit_account_id == ZERO:
            return TR.DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if t.credit_account_id == ZERO:
            return TR.CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO
        if t.debit_account_id == t.credit_account_id:
            return TR.ACCOUNTS_MUST_BE_DIFFERENT
        if t.pending_id != ZERO:
            return TR.PENDING_ID_MUST_BE_ZERO
        if t.timeout_seconds and not t.flags & TF.PENDING:
            return TR.TIMEOUT_RESERVED_FOR_PENDING_TRANSFER
        if t.ledger == 0:
            return TR.LEDGER_MUST_NOT_BE_ZERO
        if t.code == 0:
            return TR.CODE_MUST_NOT_BE_ZERO
        if t.amount == 0:
            return TR.AMOUNT_MUST_NOT_BE_ZERO
        return TR.OK

    def _post_or_void(self, t: ModelTransfer, timestamp: int, undo: list) -> tuple[int, int]:
        p = self.transfers.get(t.pending_id)
        if p is None:
            return TR.PENDING_TRANSFER_NOT_FOUND, 0
        if not p.flags & TF.PENDING:
            return TR.PENDING_TRANSFER_NOT_PENDING, 0
        for mine, theirs, result in (
                (t.debit_account_id, p.debit_account_id, TR.PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID),
                (t.credit_account_id, p.credit_account_id, TR.PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID),
                (t.ledger, p.ledger, TR.PENDING_TRANSFER_HAS_DIFFERENT_LEDGER),
                (t.code, p.code, TR.PENDING_TRANSFER_HAS_DIFFERENT_CODE)):
            if mine not in (0, ZERO) and mine != theirs:
                return result, 0
        if t.id in self.transfers:
            return self._exists(t, self.transfers[t.id])
        post = bool(t.flags & TF.POST_PENDING_TRANSFER)
        if post and t.amount > p.amount:
            return TR.EXCEEDS_PENDING_TRANSFER_AMOUNT, 0
        if not post and t.amount not in (0, p.amount):
            return TR.PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT, 0
        if p.status == POSTED:
            return TR.PENDING_TRANSFER_ALREADY_POSTED, 0
        if p.status == VOIDED:
            return TR.PENDING_TRANSFER_ALREADY_VOIDED, 0
        if p.status == EXPIRED or (p.expires_at and timestamp >= p.expires_at):
            return TR.PENDING_TRANSFER_EXPIRED, 0
        dr, cr = self.accounts[p.debit_account_id], self.accounts[p.credit_account_id]
        amount = (t.amount or p.amount) if post else p.amount
        if post and amount > BALANCE_MAX - dr.debits_posted:
            return TR.OVERFLOWS_DEBITS_POSTED, 0
        if post and amount > BALANCE_MAX - cr.credits_posted:
            return TR.OVERFLOWS_CREDITS_POSTED, 0
        self._move(dr, cr, pending_delta=-p.amount, posted_delta=amount if post else 0, undo=undo)
        before = p.status
        p.status = POSTED if post else VOIDED
        undo.append(lambda: setattr(p, "status", before))
        stored = dataclasses.replace(
            t, debit_account_id=p.debit_account_id, credit_account_id=p.credit_account_id,
            ledger=p.ledger, code=p.code, amount=amount, timestamp=timestamp, status=0,
            expires_at=0)
        self._commit(stored, dr, cr, undo)
        return TR.OK, timestamp

    def _exists(self, t: ModelTransfer, e: ModelTransfer) -> tuple[int, int]:
        resolving = t.flags & (TF.POST_PENDING_TRANSFER | TF.VOID_PENDING_TRANSFER)

        def same_id(mine: bytes, theirs: bytes) -> bool:
            return mine == theirs or (bool(resolving) and mine == ZERO)

        if t.flags != e.flags:
            return TR.EXISTS_WITH_DIFFERENT_FLAGS, 0
        if not same_id(t.debit_account_id, e.debit_account_id):
            return TR.EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID, 0
        if not same_id(t.credit_account_id, e.credit_account_id):
            return TR.EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID, 0
        if t.flags & (TF.BALANCING_DEBIT | TF.BALANCING_CREDIT):
            amount_same = t.amount >= e.amount
        elif resolving:
            amount_same = t.amount in (0, e.amount)
        else:
            amount_same = t.amount == e.amount
        if not amount_same:
            return TR.EXISTS_WITH_DIFFERENT_AMOUNT, 0
        if t.pending_id != e.pending_id:
            return TR.EXISTS_WITH_DIFFERENT_PENDING_ID, 0
        if t.user_data != e.user_data:
            return TR.EXISTS_WITH_DIFFERENT_USER_DATA, 0
        if t.timeout_seconds != e.timeout_seconds:
            return TR.EXISTS_WITH_DIFFERENT_TIMEOUT, 0
        if t.code != e.code and not (resolving and t.code == 0):
            return TR.EXISTS_WITH_DIFFERENT_CODE, 0
        if t.ledger != e.ledger and not (resolving and t.ledger == 0):
            return TR.EXISTS_WITH_DIFFERENT_LEDGER, 0
        return TR.EXISTS, e.timestamp

    def _move(self, dr: ModelAccount, cr: ModelAccount, *, pending_delta: int, posted_delta: int,
              undo: list) -> None:
        before = (dr.balances(), cr.balances())
        dr.debits_pending += pending_delta
        cr.credits_pending += pending_delta
        dr.debits_posted += posted_delta
        cr.credits_posted += posted_delta

        def restore() -> None:
            (dr.debits_pending, dr.debits_posted, dr.credits_pending, dr.credits_posted), \
                (cr.debits_pending, cr.debits_posted, cr.credits_pending, cr.credits_posted) = before
        undo.append(restore)

    def _commit(self, stored: ModelTransfer, dr: ModelAccount, cr: ModelAccount, undo: list) -> None:
        self.transfers[stored.id] = stored
        marks = (len(dr.history), len(cr.history))
        self._record_history(dr, cr, stored.timestamp)

        def forget() -> None:
            del self.transfers[stored.id]
            del dr.history[marks[0]:]
            del cr.history[marks[1]:]
        undo.append(forget)

    @staticmethod
    def _record_history(dr: ModelAccount, cr: ModelAccount, timestamp: int) -> None:
        for account in (dr, cr):
            if account.flags & AF.HISTORY:
                account.history.append((timestamp, *account.balances()))

    # -- invariants ------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Double entry per ledger, limits respected, balances within range."""
        sums: dict[int, list[int]] = {}
        for a in self.accounts.values():
            s = sums.setdefault(a.ledger, [0, 0, 0, 0])
            for k, v in enumerate(a.balances()):
                assert 0 <= v <= BALANCE_MAX
                s[k] += v
            if a.flags & AF.DEBITS_MUST_NOT_EXCEED_CREDITS:
                assert a.debits_pending + a.debits_posted <= a.credits_posted, a
            if a.flags & AF.CREDITS_MUST_NOT_EXCEED_DEBITS:
                assert a.credits_pending + a.credits_posted <= a.debits_posted, a
        for ledger, (dp, dpo, cp, cpo) in sums.items():
            assert dp == cp and dpo == cpo, f"ledger {ledger} does not balance"
