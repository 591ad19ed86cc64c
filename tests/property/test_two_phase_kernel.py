"""Pending, post, void and balancing transfers: the compiled apply_transfers against its oracle.

The harness (columns, run_both, the double-entry check) is test_balance_kernel's. Every batch
here runs through both implementations, which must agree on every output, the statuses, the
expiry times and the balances before any other assertion is made. Random batches start from
ledgers that balance (every account's balances are the sum of a history of transfers and of
the open committed pending transfers), so Σ debits = Σ credits per ledger must hold after any
batch, not only in its movements.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_balance_kernel import (
    BALANCING_CREDIT,
    BALANCING_DEBIT,
    CLOSED,
    CMNED,
    DMNEC,
    LINKED,
    MAX,
    PENDING,
    POST,
    RESERVED,
    TIMESTAMP_BASE,
    VOID,
    ZERO_ID,
    Account,
    Committed,
    Id,
    Outcome,
    Transfer,
    account_id,
    assert_double_entry,
    assert_outputs_consistent,
    run_both,
)

from engine.kernels import _balance, results
from engine.kernels import reference as ref

OK = results.TRANSFER_OK
FAILED = results.TRANSFER_LINKED_EVENT_FAILED
NS = ref.NANOSECONDS_PER_SECOND
TIMEOUT_MAX = 2**32 - 1
STATUS_NONE = ref.PENDING_STATUS_NONE
STATUS_PENDING = ref.PENDING_STATUS_PENDING
STATUS_POSTED = ref.PENDING_STATUS_POSTED
STATUS_VOIDED = ref.PENDING_STATUS_VOIDED
STATUS_EXPIRED = ref.PENDING_STATUS_EXPIRED

A, B, C, D = (0, 0xA), (0, 0xB), (0xC, 0), (0, 0xD)
P_ID, X, X2, PLAIN_ID, UNKNOWN_ID = (5, 1), (1, 0x7), (1, 0x8), (5, 2), (5, 99)


def test_pending_statuses_agree_with_the_reference() -> None:
    assert _balance.pending_statuses() == {
        name: getattr(ref, name) for name in (
            "PENDING_STATUS_NONE", "PENDING_STATUS_PENDING", "PENDING_STATUS_POSTED",
            "PENDING_STATUS_VOIDED", "PENDING_STATUS_EXPIRED")
    }


# ---------------------------------------------------------------------------------------------
# Random batches over ledgers that balance.

LEDGERS = (1, 2)
ACCOUNT_FLAGS = [0] * 8 + [DMNEC, DMNEC, CMNED, CMNED, DMNEC | CMNED, CLOSED]
# Mostly small, sometimes large enough for two or three to overflow a balance.
AMOUNTS = st.one_of(*[st.integers(1, 100)] * 12, st.integers(1, MAX),
                    st.integers(MAX // 3, MAX // 2), st.integers(MAX - 100, MAX))
TIMEOUTS = st.sampled_from([0, 0, 1, 60, TIMEOUT_MAX])
# Far enough from the end of int64 that a timeout of a few billion seconds overflows it.
LATE_TIMESTAMP_BASE = 2**63 - 4 * 10**18


@dataclass
class Scenario:
    accounts: list[Account]
    transfers: list[Transfer]
    committed: list[Committed]
    chain_break: list[int]
    timestamp_base: int


def fits(account_debit: Account, account_credit: Account, amount: int) -> bool:
    """Whether amount fits both sides within pending + posted <= BALANCE_MAX."""
    return (account_debit.debits_pending + account_debit.debits_posted + amount <= MAX
            and account_credit.credits_pending + account_credit.credits_posted + amount <= MAX)


@st.composite
def account_pairs(draw: st.DrawFn, accounts: list[Account]) -> tuple[Account, Account]:
    """Two distinct accounts of one ledger (accounts 0 and 1 are both on ledger 1)."""
    debit = draw(st.sampled_from(accounts))
    others = [a for a in accounts if a.ledger == debit.ledger and a.id != debit.id]
    if not others:
        debit, others = accounts[0], [accounts[1]]
    return debit, draw(st.sampled_from(others))


@st.composite
def balanced_accounts(draw: st.DrawFn) -> list[Account]:
    """Accounts whose posted balances are a history of transfers that fit BALANCE_MAX."""
    count = draw(st.integers(2, 8))
    accounts = [Account(id=account_id(k), ledger=1 if k < 2 else draw(st.sampled_from(LEDGERS)),
                        flags=draw(st.sampled_from(ACCOUNT_FLAGS)))
                for k in range(count)]
    for _ in range(draw(st.integers(0, 12))):
        debit, credit = draw(account_pairs(accounts))
        amount = draw(AMOUNTS)
        if fits(debit, credit, amount):
            debit.debits_posted += amount
            credit.credits_posted += amount
    return accounts


@st.composite
def committed_rows(
    draw: st.DrawFn, accounts: list[Account], ids: list[Id], timestamp_base: int
) -> list[Committed]:
    """Pending transfers in every state (open ones held in their accounts' pending balances),
    the posts and voids that resolved some of them, and plain transfers."""
    committed: list[Committed] = []
    free_ids = list(ids)

    def add(transfer: Transfer, **kwargs: int) -> None:
        committed.append(Committed(transfer, timestamp=timestamp_base - 1000 + len(committed),
                                   **kwargs))

    for _ in range(draw(st.integers(0, 5))):
        if not free_ids:
            break
        debit, credit = draw(account_pairs(accounts))
        amount = draw(AMOUNTS)
        status = draw(st.sampled_from([STATUS_PENDING] * 3 + [STATUS_POSTED, STATUS_VOIDED,
                                                               STATUS_EXPIRED]))
        if status == STATUS_PENDING:
            if not fits(debit, credit, amount):
                continue
            debit.debits_pending += amount
            credit.credits_pending += amount
        pending = Transfer(
            id=free_ids.pop(draw(st.integers(0, len(free_ids) - 1))), debit=debit.id,
            credit=credit.id, amount=amount, ledger=debit.ledger,
            code=draw(st.sampled_from([1, 2])), flags=PENDING | draw(st.sampled_from([0, LINKED])),
            timeout_seconds=draw(st.sampled_from([0, 5])),
            user_data_key=draw(st.sampled_from([0, 1])))
        # Expiry times around the batch's item timestamps, so that it passes mid-batch.
        expires_at = draw(st.sampled_from([0] * 8 + [timestamp_base - 1, timestamp_base,
                                                     timestamp_base + 5, timestamp_base + 20]))
        add(pending, status=status, expires_at=expires_at)
        if status in (STATUS_POSTED, STATUS_VOIDED) and free_ids and draw(st.booleans()):
            # Stored as the caller stores it: with the pending transfer's fields filled in.
            posted = draw(st.integers(1, amount)) if status == STATUS_POSTED else amount
            add(replace(pending, id=free_ids.pop(), amount=posted, pending=pending.id,
                        flags=POST if status == STATUS_POSTED else VOID, timeout_seconds=0))
    for _ in range(draw(st.integers(0, 2))):
        if not free_ids:
            break
        debit, credit = draw(account_pairs(accounts))
        add(Transfer(id=free_ids.pop(), debit=debit.id, credit=credit.id, amount=draw(AMOUNTS),
                     ledger=debit.ledger,
                     flags=draw(st.sampled_from([0, BALANCING_DEBIT, BALANCING_CREDIT]))))
    return committed


def _pending_fields(draw: st.DrawFn, pending: Transfer | None) -> dict[str, object]:
    """Debit, credit, ledger and code of a post or void: zero or the pending's, sometimes
    one of them another."""
    fields: dict[str, object] = {}
    others = {"debit": (ZERO_ID, A), "credit": (ZERO_ID, A), "ledger": (0, 3), "code": (0, 3)}
    for name, (zero, _) in others.items():
        choices = [zero] if pending is None else [zero, getattr(pending, name)]
        fields[name] = draw(st.sampled_from(choices))
    wrong = draw(st.sampled_from([None] * 8 + list(others)))
    if wrong is not None:
        fields[wrong] = others[wrong][1]
    return fields


@st.composite
def items(
    draw: st.DrawFn, accounts: list[Account], fresh_id: Id, pendings: list[Transfer],
    sources: list[Transfer],
) -> Transfer:
    """One batch item of a random kind, sometimes with one rule broken.

    Its id is fresh_id or, one time in eight, the id of one of sources (the batch so far
    and the committed rows), so that duplicates of every kind of transfer come up.
    """
    used_ids = [source.id for source in sources]
    kind = draw(st.sampled_from(["plain", "pending", "pending", "post", "post", "post",
                                 "void", "void", "balancing", "repeat"]))
    if kind == "repeat" and not sources:
        kind = "plain"
    if kind == "repeat":
        # Repeat an earlier or committed transfer, whole or with one field changed.
        source = draw(st.sampled_from(sources))
        changed = draw(st.sampled_from([None, None, "amount", "debit", "user_data_key",
                                        "ledger", "code", "timeout_seconds", "flags",
                                        "pending"]))
        if changed is None:
            return source
        return replace(source, **{changed: {
            "amount": draw(st.sampled_from([0, 1, source.amount + 1])),
            "debit": draw(st.sampled_from([ZERO_ID, A, C])),
            "user_data_key": 9,
            "ledger": draw(st.sampled_from([0, 1, 2])),
            "code": draw(st.sampled_from([0, 1, 2])),
            "timeout_seconds": draw(st.sampled_from([0, 1, 7])),
            "flags": source.flags ^ draw(st.sampled_from([LINKED, PENDING, BALANCING_DEBIT])),
            "pending": draw(st.sampled_from([ZERO_ID, UNKNOWN_ID] + [p.id for p in pendings])),
        }[changed]})
    flags = draw(st.sampled_from([0] * 5 + [LINKED]))
    transfer_id = fresh_id
    if used_ids and draw(st.integers(0, 7)) == 0:
        transfer_id = draw(st.sampled_from(used_ids))
    if kind in ("post", "void"):
        pending = draw(st.sampled_from(pendings)) if pendings and draw(st.integers(0, 9)) else None
        held = pending.amount if pending is not None else 10
        if kind == "post":
            amount = draw(st.sampled_from([0, 0, held, held + 1]) | st.integers(1, max(1, held)))
        else:
            amount = draw(st.sampled_from([0, 0, 0, held, max(0, held - 1)]))
        transfer = Transfer(id=transfer_id, amount=amount,
                            pending=pending.id if pending else draw(
                                st.sampled_from([UNKNOWN_ID, *used_ids])),
                            flags=flags | (POST if kind == "post" else VOID),
                            user_data_key=draw(st.sampled_from([0, 0, 1])),
                            **_pending_fields(draw, pending))
    else:
        debit, credit = draw(account_pairs(accounts))
        kind_flags = {"plain": 0, "pending": PENDING,
                      "balancing": draw(st.sampled_from([BALANCING_DEBIT, BALANCING_CREDIT,
                                                         BALANCING_DEBIT | BALANCING_CREDIT,
                                                         PENDING | BALANCING_DEBIT]))}[kind]
        # Reservations are mostly small, so that posts and voids often find them committed.
        amount = draw(st.one_of(*[st.integers(1, 100)] * 4, AMOUNTS) if kind == "pending"
                      else AMOUNTS)
        transfer = Transfer(id=transfer_id, debit=debit.id, credit=credit.id,
                            amount=amount, ledger=debit.ledger,
                            code=draw(st.sampled_from([1, 2])), flags=flags | kind_flags,
                            timeout_seconds=draw(TIMEOUTS) if kind_flags & PENDING else 0,
                            user_data_key=draw(st.sampled_from([0, 0, 1])))
    defect = draw(st.sampled_from([None] * 40 + ["precheck", "flags", "id", "timeout",
                                                 "pending_is_self"]))
    if defect == "precheck":
        transfer.precheck = results.TRANSFER_TIMESTAMP_MUST_BE_ZERO
    elif defect == "flags":
        transfer.flags |= draw(st.sampled_from([RESERVED, PENDING | POST, POST | VOID,
                                                POST | BALANCING_CREDIT]))
    elif defect == "id":
        transfer.id = ZERO_ID
    elif defect == "timeout":
        transfer.timeout_seconds = draw(st.integers(1, TIMEOUT_MAX))
    elif defect == "pending_is_self":
        transfer.pending = transfer.id
    return transfer


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    timestamp_base = draw(st.sampled_from([TIMESTAMP_BASE] * 4 + [LATE_TIMESTAMP_BASE]))
    accounts = draw(balanced_accounts())
    committed_ids = [(k % 2, k) for k in range(1, 13)]
    committed = draw(committed_rows(accounts, committed_ids, timestamp_base))
    pendings = [c.transfer for c in committed if c.transfer.flags & PENDING]
    transfers: list[Transfer] = []
    for i in range(draw(st.integers(0, 40))):
        transfer = draw(items(accounts, (1, 1000 + i), pendings,
                              transfers + [c.transfer for c in committed]))
        transfers.append(transfer)
        if transfer.flags & PENDING:
            pendings.append(transfer)
    chain_break = [int(draw(st.integers(0, 3)) == 0) for _ in transfers]
    if chain_break:
        chain_break[-1] = 1
    return Scenario(accounts, transfers, committed, chain_break, timestamp_base)


PROPERTY = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def run_scenario(scenario: Scenario) -> Outcome:
    return run_both(scenario.accounts, scenario.transfers, scenario.committed,
                    scenario.chain_break, scenario.timestamp_base)


@PROPERTY
@given(scenarios())
def test_kernel_matches_reference_and_invariants_hold(scenario: Scenario) -> None:
    outcome = run_scenario(scenario)
    accounts, committed, n = scenario.accounts, scenario.committed, len(scenario.transfers)
    assert_outputs_consistent(outcome, scenario.timestamp_base)
    assert_double_entry(outcome, accounts, committed)

    # The ledgers balanced before the batch, so they balance after it.
    for ledger in LEDGERS:
        in_ledger = [k for k, a in enumerate(accounts) if a.ledger == ledger]
        assert (sum(outcome.debits_pending[k] for k in in_ledger)
                == sum(outcome.credits_pending[k] for k in in_ledger))
        assert (sum(outcome.debits_posted[k] for k in in_ledger)
                == sum(outcome.credits_posted[k] for k in in_ledger))

    # A status changes only for the pending transfer an OK item created or resolved.
    resolved_by = {p: i for i, p in enumerate(outcome.resolved) if p >= 0}
    assert len(resolved_by) == sum(1 for p in outcome.resolved if p >= 0), "resolved twice"
    for row, status in enumerate(outcome.status):
        before = (STATUS_NONE if row < n else
                  outcome.columns["status"][row])
        created = row < n and outcome.results[row] == OK and scenario.transfers[row].flags & PENDING
        if row in resolved_by:
            assert created or row >= n and before == STATUS_PENDING
            flags = scenario.transfers[resolved_by[row]].flags
            assert status == (STATUS_POSTED if flags & POST else STATUS_VOIDED)
        elif created:
            assert status == STATUS_PENDING
        else:
            assert status == before
    for i, transfer in enumerate(scenario.transfers):
        if outcome.results[i] == OK and transfer.flags & PENDING:
            assert outcome.expires_at[i] == (
                scenario.timestamp_base + i + transfer.timeout_seconds * NS
                if transfer.timeout_seconds else 0)

    for k, before in enumerate(accounts):
        debits = outcome.debits_pending[k] + outcome.debits_posted[k]
        credits = outcome.credits_pending[k] + outcome.credits_posted[k]
        assert debits <= MAX and credits <= MAX
        # A guarded account that was within its limit stays within it.
        if before.flags & DMNEC and (before.debits_pending + before.debits_posted
                                     <= before.credits_posted):
            assert debits <= outcome.credits_posted[k]
        if before.flags & CMNED and (before.credits_pending + before.credits_posted
                                     <= before.debits_posted):
            assert credits <= outcome.debits_posted[k]


# ---------------------------------------------------------------------------------------------
# Precedence of a post: one item that breaks every rule, repaired one rule at a time (as in
# test_balance_kernel). The pending transfer P (A -> B, 10) is committed; so are a plain
# transfer PLAIN_ID and an original with the item's id X that differs in every field.

@dataclass
class PostCase:
    accounts: list[Account]
    item: Transfer
    pending: Committed
    original: Transfer


def _post_case() -> PostCase:
    # Closed and over their limits: a post resolves a reservation whatever the accounts' state.
    # Posted balances this high break the caller's invariant (pending + posted <= BALANCE_MAX)
    # and are the only way to reach a post's overflow checks, which the kernel makes anyway.
    accounts = [Account(A, flags=CLOSED | DMNEC, debits_pending=10, debits_posted=MAX - 3),
                Account(B, flags=CLOSED | CMNED, credits_pending=10, credits_posted=MAX - 3),
                Account(C)]
    item = Transfer(id=ZERO_ID, debit=C, credit=C, amount=11, pending=ZERO_ID, ledger=2, code=2,
                    flags=RESERVED | POST | VOID, timeout_seconds=9,
                    precheck=results.TRANSFER_TIMESTAMP_MUST_BE_ZERO)
    pending = Committed(Transfer(id=P_ID, debit=A, credit=B, amount=10, flags=PENDING),
                        timestamp=40, status=STATUS_POSTED)
    original = Transfer(id=X, debit=C, credit=C, amount=4, pending=UNKNOWN_ID, ledger=2, code=2,
                        flags=VOID, timeout_seconds=1, user_data_key=1)
    return PostCase(accounts, item, pending, original)


def _item(attr: str, value: object):
    return lambda case: setattr(case.item, attr, value)


def _original(attr: str, value: object):
    return lambda case: setattr(case.original, attr, value)


def _pending(attr: str, value: int):
    return lambda case: setattr(case.pending, attr, value)


def _account(slot: int, attr: str, value: int):
    return lambda case: setattr(case.accounts[slot], attr, value)


def _both(*repairs):
    def change(case: PostCase) -> None:
        for repair in repairs:
            repair(case)
    return change


POST_PRECEDENCE = [
    (results.TRANSFER_TIMESTAMP_MUST_BE_ZERO, _item("precheck", 0)),
    (results.TRANSFER_RESERVED_FLAG, _item("flags", POST | VOID)),
    (results.TRANSFER_ID_MUST_NOT_BE_ZERO, _item("id", X)),
    (results.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE, _item("flags", POST | BALANCING_DEBIT)),
    (results.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE, _item("flags", POST)),
    (results.TRANSFER_PENDING_ID_MUST_NOT_BE_ZERO, _item("pending", X)),
    (results.TRANSFER_PENDING_ID_MUST_BE_DIFFERENT, _item("pending", UNKNOWN_ID)),
    (results.TRANSFER_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER, _item("timeout_seconds", 0)),
    (results.TRANSFER_PENDING_TRANSFER_NOT_FOUND, _item("pending", PLAIN_ID)),
    (results.TRANSFER_PENDING_TRANSFER_NOT_PENDING, _item("pending", P_ID)),
    (results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID, _item("debit", A)),
    (results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID, _item("credit", B)),
    (results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_LEDGER, _item("ledger", 1)),
    (results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_CODE, _item("code", 1)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_FLAGS, _original("flags", POST)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID, _original("debit", A)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID, _original("credit", B)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_AMOUNT, _original("amount", 11)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_PENDING_ID, _original("pending", P_ID)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_USER_DATA, _original("user_data_key", 0)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_TIMEOUT, _original("timeout_seconds", 0)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_CODE, _original("code", 1)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_LEDGER, _original("ledger", 1)),
    (results.TRANSFER_EXISTS, _item("id", X2)),
    (results.TRANSFER_EXCEEDS_PENDING_TRANSFER_AMOUNT, _item("amount", 4)),
    (results.TRANSFER_PENDING_TRANSFER_ALREADY_POSTED, _pending("status", STATUS_VOIDED)),
    (results.TRANSFER_PENDING_TRANSFER_ALREADY_VOIDED, _pending("status", STATUS_EXPIRED)),
    # The item's timestamp is TIMESTAMP_BASE: the reservation expires at that very instant.
    (results.TRANSFER_PENDING_TRANSFER_EXPIRED,
     _both(_pending("status", STATUS_PENDING), _pending("expires_at", TIMESTAMP_BASE))),
    (results.TRANSFER_PENDING_TRANSFER_EXPIRED, _pending("expires_at", TIMESTAMP_BASE + 1)),
    (results.TRANSFER_OVERFLOWS_DEBITS_POSTED, _account(0, "debits_posted", 0)),
    (results.TRANSFER_OVERFLOWS_CREDITS_POSTED, _account(1, "credits_posted", 0)),
    (results.TRANSFER_OK, None),
]


def _run_post_case(case: PostCase) -> Outcome:
    plain = Committed(Transfer(id=PLAIN_ID, debit=A, credit=B, amount=3), timestamp=41)
    return run_both(case.accounts, [case.item],
                    [case.pending, plain, Committed(case.original, timestamp=42)])


@pytest.mark.parametrize("step", range(len(POST_PRECEDENCE)),
                         ids=[f"{k}-{r}" for k, (r, _) in enumerate(POST_PRECEDENCE)])
def test_post_precedence(step: int) -> None:
    case = _post_case()
    for _, repair in POST_PRECEDENCE[:step]:
        repair(case)
    outcome = _run_post_case(case)
    expected = POST_PRECEDENCE[step][0]
    assert outcome.results == [expected]
    if expected == results.TRANSFER_EXISTS:
        assert outcome.timestamps == [42]
    if expected == OK:
        assert outcome.resolved == [1] and outcome.amounts == [4]
        assert outcome.status[1] == STATUS_POSTED
        # The whole reservation of 10 is released; 4 of it is posted.
        assert outcome.balances_after == [[0, 4, 0, 0, 0, 0, 0, 4]]
    else:
        assert outcome.status[1] == case.pending.status
        assert outcome.debits_pending[0] == 10 and outcome.credits_pending[1] == 10


@pytest.mark.parametrize(("amount", "expected"), [
    (0, OK), (10, OK), (3, results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT),
    (11, results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT),
])
def test_void_amount_is_zero_or_the_whole_reservation(amount: int, expected: int) -> None:
    accounts = [Account(A, debits_pending=10), Account(B, credits_pending=10)]
    pending = Committed(Transfer(id=P_ID, debit=A, credit=B, amount=10, flags=PENDING),
                        timestamp=40)
    void = Transfer(id=X, debit=ZERO_ID, credit=ZERO_ID, amount=amount, pending=P_ID,
                    ledger=0, code=0, flags=VOID)
    outcome = run_both(accounts, [void], [pending])
    assert outcome.results == [expected]
    if expected == OK:
        assert outcome.amounts == [10] and outcome.status[1] == STATUS_VOIDED
        assert outcome.debits_pending == [0, 0] and outcome.credits_pending == [0, 0]
        assert outcome.debits_posted == [0, 0] and outcome.credits_posted == [0, 0]
        assert outcome.balances_after == [[0] * 8]


# ---------------------------------------------------------------------------------------------
# Precedence of a pending transfer with a timeout, from the closed accounts on.

@dataclass
class PendingCase:
    accounts: list[Account]
    item: Transfer


def _pending_case() -> PendingCase:
    accounts = [Account(A, flags=CLOSED | DMNEC, debits_pending=MAX - 10, debits_posted=10),
                Account(B, flags=CLOSED | CMNED, credits_pending=MAX - 10, credits_posted=10)]
    item = Transfer(id=X, debit=A, credit=B, amount=20, flags=PENDING,
                    timeout_seconds=TIMEOUT_MAX)
    return PendingCase(accounts, item)


def _balances(slot: int, **balances: int):
    def change(case: PendingCase) -> None:
        for attr, value in balances.items():
            setattr(case.accounts[slot], attr, value)
    return change


PENDING_PRECEDENCE = [
    (results.TRANSFER_DEBIT_ACCOUNT_CLOSED, _balances(0, flags=DMNEC)),
    (results.TRANSFER_CREDIT_ACCOUNT_CLOSED, _balances(1, flags=CMNED)),
    (results.TRANSFER_OVERFLOWS_DEBITS_PENDING,
     _balances(0, debits_pending=0, debits_posted=MAX - 15)),
    (results.TRANSFER_OVERFLOWS_CREDITS_PENDING,
     _balances(1, credits_pending=0, credits_posted=MAX - 15)),
    (results.TRANSFER_OVERFLOWS_DEBITS, _balances(0, debits_posted=10)),
    (results.TRANSFER_OVERFLOWS_CREDITS, _balances(1, credits_posted=10)),
    (results.TRANSFER_OVERFLOWS_TIMEOUT, lambda case: setattr(case.item, "timeout_seconds", 60)),
    # The pending amount counts against the limits: 10 posted + 20 pending > 0.
    (results.TRANSFER_EXCEEDS_CREDITS, _balances(0, credits_posted=30)),
    (results.TRANSFER_EXCEEDS_DEBITS, _balances(1, debits_posted=30)),
    (OK, None),
]


@pytest.mark.parametrize("step", range(len(PENDING_PRECEDENCE)),
                         ids=[str(r) for r, _ in PENDING_PRECEDENCE])
def test_pending_precedence(step: int) -> None:
    case = _pending_case()
    for _, repair in PENDING_PRECEDENCE[:step]:
        repair(case)
    outcome = run_both(case.accounts, [case.item], timestamp_base=LATE_TIMESTAMP_BASE)
    expected = PENDING_PRECEDENCE[step][0]
    assert outcome.results == [expected]
    if expected == OK:
        assert outcome.status == [STATUS_PENDING]
        assert outcome.expires_at == [LATE_TIMESTAMP_BASE + 60 * NS]
        assert outcome.amounts == [20]
        assert outcome.balances_after == [[20, 10, 0, 30, 0, 30, 20, 10]]
    else:
        assert outcome.status == [STATUS_NONE] and outcome.expires_at == [0]


@pytest.mark.parametrize(("timestamp_base", "expected"), [
    (2**63 - 1 - TIMEOUT_MAX * NS, OK),  # expires at the largest int64: still representable
    (2**63 - TIMEOUT_MAX * NS, results.TRANSFER_OVERFLOWS_TIMEOUT),
])
def test_timeout_overflow_boundary(timestamp_base: int, expected: int) -> None:
    accounts = [Account(A), Account(B)]
    item = Transfer(id=X, debit=A, credit=B, amount=1, flags=PENDING, timeout_seconds=TIMEOUT_MAX)
    outcome = run_both(accounts, [item], timestamp_base=timestamp_base)
    assert outcome.results == [expected]
    if expected == OK:
        assert outcome.expires_at == [2**63 - 1]


@pytest.mark.parametrize(("flags", "timeout", "pending", "expected"), [
    (0, 5, ZERO_ID, results.TRANSFER_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER),
    (BALANCING_DEBIT, 5, ZERO_ID, results.TRANSFER_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER),
    (PENDING, 5, P_ID, results.TRANSFER_PENDING_ID_MUST_BE_ZERO),
    (PENDING | BALANCING_DEBIT | BALANCING_CREDIT, 5, ZERO_ID, OK),
    (PENDING | POST, 0, P_ID, results.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    (PENDING | VOID, 0, P_ID, results.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    (POST | VOID, 0, P_ID, results.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    (PENDING | POST | VOID, 0, P_ID, results.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    (POST | BALANCING_CREDIT, 0, P_ID, results.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    (VOID | BALANCING_DEBIT, 0, P_ID, results.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE),
    (PENDING | BALANCING_CREDIT, 0, ZERO_ID, OK),
])
def test_flag_combinations(flags: int, timeout: int, pending: Id, expected: int) -> None:
    accounts = [Account(A, credits_posted=50), Account(B, debits_posted=50)]
    item = Transfer(id=X, debit=A, credit=B, amount=5, pending=pending, flags=flags,
                    timeout_seconds=timeout)
    outcome = run_both(accounts, [item])
    assert outcome.results == [expected]


@pytest.mark.parametrize("kind", [POST, VOID])
def test_post_or_void_checks_its_own_fields_first(kind: int) -> None:
    accounts = [Account(A, debits_pending=10), Account(B, credits_pending=10)]
    pending = Committed(Transfer(id=P_ID, debit=A, credit=B, amount=10, flags=PENDING),
                        timestamp=40)
    base = Transfer(id=X, debit=ZERO_ID, credit=ZERO_ID, amount=0, pending=P_ID, ledger=0,
                    code=0, flags=kind)
    cases = [
        (replace(base, pending=ZERO_ID), results.TRANSFER_PENDING_ID_MUST_NOT_BE_ZERO),
        (replace(base, pending=X), results.TRANSFER_PENDING_ID_MUST_BE_DIFFERENT),
        (replace(base, timeout_seconds=1),
         results.TRANSFER_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER),
        (replace(base, pending=UNKNOWN_ID), results.TRANSFER_PENDING_TRANSFER_NOT_FOUND),
        (replace(base, debit=B), results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID),
        (replace(base, credit=A),
         results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID),
        (replace(base, ledger=2), results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_LEDGER),
        (replace(base, code=2), results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_CODE),
        (replace(base, debit=A, credit=B, ledger=1, code=1), OK),
    ]
    for item, expected in cases:
        assert run_both(accounts, [item], [pending]).results == [expected], item


# ---------------------------------------------------------------------------------------------
# Posts and voids of pending transfers.

def _reserve(amount: int, transfer_id: Id = P_ID, **fields: object) -> Transfer:
    return Transfer(id=transfer_id, debit=A, credit=B, amount=amount, flags=PENDING, **fields)


def _post(transfer_id: Id, amount: int = 0, pending: Id = P_ID, flags: int = POST) -> Transfer:
    return Transfer(id=transfer_id, debit=ZERO_ID, credit=ZERO_ID, amount=amount,
                    pending=pending, ledger=0, code=0, flags=flags)


def test_partial_post_releases_the_remainder() -> None:
    accounts = [Account(A, credits_posted=100), Account(B)]
    transfers = [_reserve(100), _post((0, 1), 30), _post((0, 2), 30),
                 _post((0, 3), flags=VOID)]
    outcome = run_both(accounts, transfers)
    assert outcome.results == [OK, OK, results.TRANSFER_PENDING_TRANSFER_ALREADY_POSTED,
                               results.TRANSFER_PENDING_TRANSFER_ALREADY_POSTED]
    assert outcome.status[:2] == [STATUS_POSTED, STATUS_NONE]
    assert outcome.amounts[:2] == [100, 30] and outcome.resolved[:2] == [-1, 0]
    assert outcome.debits_pending == [0, 0] and outcome.credits_pending == [0, 0]
    assert outcome.debits_posted == [30, 0] and outcome.credits_posted == [100, 30]
    assert outcome.balances_after[:2] == [[100, 0, 0, 100, 0, 0, 100, 0],
                                          [0, 30, 0, 100, 0, 0, 0, 30]]


def test_post_of_zero_posts_the_whole_reservation() -> None:
    outcome = run_both([Account(A), Account(B)], [_reserve(40), _post(X)])
    assert outcome.results == [OK, OK] and outcome.amounts == [40, 40]
    assert outcome.debits_posted == [40, 0] and outcome.credits_posted == [0, 40]
    assert outcome.debits_pending == [0, 0] and outcome.credits_pending == [0, 0]


def test_post_finds_the_pending_transfer_that_committed() -> None:
    # The first item with id P_ID fails, the second commits: the post resolves the second.
    transfers = [
        Transfer(id=P_ID, debit=A, credit=D, amount=5, flags=PENDING),  # D does not exist
        _reserve(7),
        _post(X),
    ]
    outcome = run_both([Account(A), Account(B)], transfers)
    assert outcome.results == [results.TRANSFER_CREDIT_ACCOUNT_NOT_FOUND, OK, OK]
    assert outcome.resolved == [-1, -1, 1] and outcome.amounts == [0, 7, 7]


def test_post_of_a_failed_batch_pending_falls_back_to_the_committed_one() -> None:
    accounts = [Account(A, debits_pending=9), Account(B, credits_pending=9)]
    committed = [Committed(_reserve(9), timestamp=40)]
    # The batch repeats P_ID with another amount: it fails, so the committed one is posted.
    outcome = run_both(accounts, [_reserve(8), _post(X)], committed)
    assert outcome.results == [results.TRANSFER_EXISTS_WITH_DIFFERENT_AMOUNT, OK]
    assert outcome.resolved == [-1, 2] and outcome.amounts == [0, 9]
    assert outcome.status == [STATUS_NONE, STATUS_NONE, STATUS_POSTED]


def test_post_of_a_plain_transfer_is_not_pending() -> None:
    transfers = [Transfer(id=P_ID, debit=A, credit=B, amount=5), _post(X)]
    outcome = run_both([Account(A), Account(B)], transfers)
    assert outcome.results == [OK, results.TRANSFER_PENDING_TRANSFER_NOT_PENDING]


@pytest.mark.parametrize(("expires_at", "status", "expected"), [
    (0, STATUS_PENDING, OK),
    (TIMESTAMP_BASE + 1, STATUS_PENDING, OK),  # the post's timestamp is TIMESTAMP_BASE + 0
    (TIMESTAMP_BASE, STATUS_PENDING, results.TRANSFER_PENDING_TRANSFER_EXPIRED),
    (TIMESTAMP_BASE - 1, STATUS_PENDING, results.TRANSFER_PENDING_TRANSFER_EXPIRED),
    (0, STATUS_EXPIRED, results.TRANSFER_PENDING_TRANSFER_EXPIRED),
    (0, STATUS_POSTED, results.TRANSFER_PENDING_TRANSFER_ALREADY_POSTED),
    (0, STATUS_VOIDED, results.TRANSFER_PENDING_TRANSFER_ALREADY_VOIDED),
])
def test_committed_pending_states(expires_at: int, status: int, expected: int) -> None:
    held = 6 if status == STATUS_PENDING else 0
    accounts = [Account(A, debits_pending=held), Account(B, credits_pending=held)]
    committed = [Committed(_reserve(6), timestamp=40, status=status, expires_at=expires_at)]
    outcome = run_both(accounts, [_post(X, flags=VOID)], committed)
    assert outcome.results == [expected]
    assert outcome.status[1] == (STATUS_VOIDED if expected == OK else status)
    assert outcome.expires_at[1] == expires_at


def test_expiry_of_a_batch_pending_with_a_timeout() -> None:
    transfers = [_reserve(5, timeout_seconds=2), _reserve(5, (0, 9))]
    outcome = run_both([Account(A), Account(B)], transfers)
    assert outcome.results == [OK, OK]
    assert outcome.expires_at == [TIMESTAMP_BASE + 2 * NS, 0]
    assert outcome.status == [STATUS_PENDING, STATUS_PENDING]


def test_duplicate_of_a_post_matches_its_zero_fields() -> None:
    accounts = [Account(A, debits_pending=10), Account(B, credits_pending=10)]
    pending = Committed(_reserve(10), timestamp=40)
    # The committed post stores the fields it took from the pending transfer.
    stored = Committed(Transfer(id=X2, debit=A, credit=B, amount=10, pending=P_ID,
                                flags=POST), timestamp=41)
    transfers = [
        _post(X, 4, pending=(0, 3)),  # a post of a batch pending: NOT_FOUND yet
        _reserve(10, (0, 3)),
        _post(X, 4, pending=(0, 3)),  # posts 4 of (0, 3)
        replace(_post(X, 4, pending=(0, 3)), debit=A, credit=B, ledger=1, code=1),  # EXISTS
        _post(X, 0, pending=(0, 3)),  # EXISTS: 0 matches the stored amount
        _post(X, 5, pending=(0, 3)),  # a different amount
        _post(X2),  # EXISTS with the committed post
        replace(_post(X2), debit=A, amount=10),  # EXISTS
        replace(_post(X2), credit=A),  # the pending's credit is B
    ]
    outcome = run_both(accounts, transfers, [pending, stored])
    assert outcome.results == [
        results.TRANSFER_PENDING_TRANSFER_NOT_FOUND, OK, OK, results.TRANSFER_EXISTS,
        results.TRANSFER_EXISTS, results.TRANSFER_EXISTS_WITH_DIFFERENT_AMOUNT,
        results.TRANSFER_EXISTS, results.TRANSFER_EXISTS,
        results.TRANSFER_PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID,
    ]
    assert outcome.timestamps[3:5] == [TIMESTAMP_BASE + 2] * 2
    assert outcome.timestamps[6:8] == [41, 41]


def test_duplicate_of_a_post_of_another_pending_differs_in_debit() -> None:
    accounts = [Account(A), Account(B), Account(C)]
    transfers = [
        _reserve(5, (0, 1)),
        Transfer(id=(0, 2), debit=C, credit=B, amount=5, flags=PENDING),
        _post(X, pending=(0, 1)),  # stored with debit A, taken from (0, 1)
        replace(_post(X, pending=(0, 2)), debit=C),
    ]
    outcome = run_both(accounts, transfers)
    assert outcome.results == [OK, OK, OK, results.TRANSFER_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID]


# ---------------------------------------------------------------------------------------------
# Linked chains undo every effect.

def test_rolled_back_chain_restores_a_committed_pending() -> None:
    accounts = [Account(A, debits_pending=10, credits_posted=50), Account(B, credits_pending=10)]
    committed = [Committed(_reserve(10), timestamp=40)]
    transfers = [
        replace(_post((0, 1), 4), flags=POST | LINKED),
        Transfer(id=(0, 2), debit=A, credit=B, amount=3, flags=LINKED),
        Transfer(id=(0, 3), debit=A, credit=D, amount=1),  # fails: D does not exist
        _post((0, 4), flags=VOID),  # a chain of its own: the reservation is open again
    ]
    outcome = run_both(accounts, transfers, committed)
    assert outcome.results == [FAILED, FAILED, results.TRANSFER_CREDIT_ACCOUNT_NOT_FOUND, OK]
    assert outcome.status == [STATUS_NONE] * 4 + [STATUS_VOIDED]
    assert outcome.amounts == [0, 0, 0, 10] and outcome.resolved == [-1, -1, -1, 4]
    assert outcome.balances_after[:3] == [[0] * 8] * 3
    assert outcome.debits_pending == [0, 0] and outcome.credits_pending == [0, 0]
    assert outcome.debits_posted == [0, 0] and outcome.credits_posted == [50, 0]


def test_rolled_back_chain_removes_its_own_pending_and_its_post() -> None:
    accounts = [Account(A, credits_posted=50), Account(B)]
    transfers = [
        replace(_reserve(20), flags=PENDING | LINKED, timeout_seconds=9),
        replace(_post((0, 1), 5), flags=POST | LINKED),
        Transfer(id=(0, 2), debit=A, credit=B, amount=1, flags=LINKED),
        Transfer(id=(0, 3), debit=A, credit=B, amount=0),  # fails
        _post((0, 4)),  # the pending transfer no longer exists
        _reserve(20),  # the id is free again
    ]
    outcome = run_both(accounts, transfers)
    assert outcome.results == [FAILED, FAILED, FAILED, results.TRANSFER_AMOUNT_MUST_NOT_BE_ZERO,
                               results.TRANSFER_PENDING_TRANSFER_NOT_FOUND, OK]
    # The rolled-back pending's expiry stays as written: its status says it does not exist.
    assert outcome.status == [STATUS_NONE] * 5 + [STATUS_PENDING]
    assert outcome.expires_at[0] == TIMESTAMP_BASE + 9 * NS
    assert outcome.debits_pending == [20, 0] and outcome.credits_pending == [0, 20]
    assert outcome.debits_posted == [0, 0] and outcome.credits_posted == [50, 0]


def test_chain_that_voids_and_reserves_again_commits_whole() -> None:
    accounts = [Account(A, debits_pending=10, credits_posted=15), Account(B, credits_pending=10)]
    accounts[0].flags = DMNEC
    committed = [Committed(_reserve(10), timestamp=40)]
    transfers = [
        replace(_post((0, 1)), flags=VOID | LINKED),
        _reserve(15, (0, 2)),  # fits only because the void released 10 of A's limit
    ]
    outcome = run_both(accounts, transfers, committed)
    assert outcome.results == [OK, OK]
    assert outcome.debits_pending == [15, 0] and outcome.credits_pending == [0, 15]


# ---------------------------------------------------------------------------------------------
# Balancing transfers.

def test_balancing_debit_sweeps_an_account_to_exactly_zero() -> None:
    accounts = [Account(A, flags=DMNEC, debits_posted=20, credits_posted=70), Account(B)]
    sweep = Transfer(id=(0, 1), debit=A, credit=B, amount=1000, flags=BALANCING_DEBIT)
    outcome = run_both(accounts, [sweep, replace(sweep, id=(0, 2))])
    assert outcome.results == [OK, OK]
    assert outcome.amounts == [50, 0]  # the second finds nothing left: a transfer of 0
    assert outcome.debits_posted[0] == outcome.credits_posted[0] == 70
    assert outcome.balances_after[1] == [0, 70, 0, 70, 0, 0, 0, 50]


def test_balancing_credit_sweeps_an_account_without_limit_flags() -> None:
    accounts = [Account(A, credits_posted=100), Account(B, debits_posted=80, credits_posted=30)]
    sweep = Transfer(id=(0, 1), debit=A, credit=B, amount=1000, flags=BALANCING_CREDIT)
    outcome = run_both(accounts, [sweep])
    assert outcome.results == [OK] and outcome.amounts == [50]
    assert outcome.debits_posted[1] == outcome.credits_posted[1] == 80


def test_balancing_both_sides_takes_the_smaller_cap() -> None:
    accounts = [Account(A, credits_posted=30), Account(B, debits_posted=12)]
    item = Transfer(id=(0, 1), debit=A, credit=B, amount=100,
                    flags=BALANCING_DEBIT | BALANCING_CREDIT)
    outcome = run_both(accounts, [item])
    assert outcome.amounts == [12]


def test_balancing_counts_pending_and_keeps_the_request_amount_as_a_maximum() -> None:
    accounts = [Account(A, debits_pending=5, credits_posted=40), Account(B)]
    transfers = [
        Transfer(id=(0, 1), debit=A, credit=B, amount=20, flags=PENDING | BALANCING_DEBIT),
        Transfer(id=(0, 2), debit=A, credit=B, amount=99, flags=BALANCING_DEBIT),
        # Repeats of (0, 2), which moved 15: a request of at least 15 may have moved it.
        Transfer(id=(0, 2), debit=A, credit=B, amount=15, flags=BALANCING_DEBIT),
        Transfer(id=(0, 2), debit=A, credit=B, amount=14, flags=BALANCING_DEBIT),
    ]
    outcome = run_both(accounts, transfers)
    assert outcome.results == [OK, OK, results.TRANSFER_EXISTS,
                               results.TRANSFER_EXISTS_WITH_DIFFERENT_AMOUNT]
    assert outcome.amounts == [20, 15, 0, 0]
    assert outcome.debits_pending[0] + outcome.debits_posted[0] == outcome.credits_posted[0]


def test_balancing_amount_zero_is_invalid() -> None:
    item = Transfer(id=(0, 1), debit=A, credit=B, amount=0, flags=BALANCING_DEBIT)
    outcome = run_both([Account(A, credits_posted=9), Account(B)], [item])
    assert outcome.results == [results.TRANSFER_AMOUNT_MUST_NOT_BE_ZERO]


def test_balancing_still_checks_the_other_side() -> None:
    accounts = [Account(A, credits_posted=30), Account(B, flags=CMNED, debits_posted=10)]
    item = Transfer(id=(0, 1), debit=A, credit=B, amount=100, flags=BALANCING_DEBIT)
    outcome = run_both(accounts, [item])
    assert outcome.results == [results.TRANSFER_EXCEEDS_DEBITS]


def test_balancing_on_an_account_already_past_its_limit_fails_the_limit() -> None:
    # Nothing is left to sweep (a = 0), and the account breaks its limit even so.
    accounts = [Account(A, flags=DMNEC, debits_posted=50, credits_posted=40), Account(B)]
    item = Transfer(id=(0, 1), debit=A, credit=B, amount=100, flags=BALANCING_DEBIT)
    outcome = run_both(accounts, [item])
    assert outcome.results == [results.TRANSFER_EXCEEDS_CREDITS]
