"""The compiled apply_transfers against its plain-Python oracle, and the rules they share.

Every batch in this file, random or hand-made, runs through both implementations on copies of
the same columns (run_both); the two must agree on every output and the final balances before
any other assertion is made. This file holds the harness and the single-phase rules;
test_two_phase_kernel.py uses the harness for pending, post, void and balancing transfers.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.kernels import apply_transfers, results
from engine.kernels.reference import (
    BALANCES_AFTER_COLUMNS,
    PENDING_STATUS_NONE,
    PENDING_STATUS_PENDING,
    apply_transfers_reference,
)

MAX = results.BALANCE_MAX
LINKED = results.TRANSFER_FLAG_LINKED
PENDING = results.TRANSFER_FLAG_PENDING
POST = results.TRANSFER_FLAG_POST_PENDING_TRANSFER
VOID = results.TRANSFER_FLAG_VOID_PENDING_TRANSFER
BALANCING_DEBIT = results.TRANSFER_FLAG_BALANCING_DEBIT
BALANCING_CREDIT = results.TRANSFER_FLAG_BALANCING_CREDIT
RESERVED = 64  # the lowest bit of Transfer.flags with no meaning
DMNEC = results.ACCOUNT_FLAG_DEBITS_MUST_NOT_EXCEED_CREDITS
CMNED = results.ACCOUNT_FLAG_CREDITS_MUST_NOT_EXCEED_DEBITS
CLOSED = results.ACCOUNT_FLAG_CLOSED
TIMESTAMP_BASE = 1_700_000_000_000_000_000
ZERO_ID = (0, 0)

Id = tuple[int, int]


@dataclass
class Account:
    id: Id
    ledger: int = 1
    flags: int = 0
    debits_pending: int = 0
    debits_posted: int = 0
    credits_pending: int = 0
    credits_posted: int = 0


@dataclass
class Transfer:
    id: Id
    debit: Id
    credit: Id
    amount: int = 1
    pending: Id = ZERO_ID
    ledger: int = 1
    code: int = 1
    flags: int = 0
    timeout_seconds: int = 0
    user_data_key: int = 0
    # The result the control plane decided before the kernel (batch items only), or 0.
    precheck: int = 0


@dataclass
class Committed:
    transfer: Transfer
    timestamp: int
    # PendingStatus; None: PENDING for a pending transfer, else NONE.
    status: int | None = None
    expires_at: int = 0


# Every output of apply_transfers, and the account columns it modifies.
OUTPUTS = ("result", "timestamp_out", "amount_out", "resolved_row", "balances_after", "status",
           "expires_at", "acc_debits_pending", "acc_debits_posted", "acc_credits_pending",
           "acc_credits_posted")


@dataclass
class Outcome:
    results: list[int]
    timestamps: list[int]
    ok_count: int
    amounts: list[int]  # amount_out
    resolved: list[int]  # resolved_row
    balances_after: list[list[int]]
    status: list[int]  # per row: batch items, then committed transfers
    expires_at: list[int]  # per row
    debits_pending: list[int]
    debits_posted: list[int]
    credits_pending: list[int]
    credits_posted: list[int]
    columns: dict[str, object] = field(repr=False)


def _default_status(committed: Committed) -> int:
    if committed.status is not None:
        return committed.status
    if committed.transfer.flags & PENDING:
        return PENDING_STATUS_PENDING
    return PENDING_STATUS_NONE


def make_columns(
    accounts: list[Account],
    transfers: list[Transfer],
    committed: list[Committed],
    chain_break: list[int] | None,
    timestamp_base: int = TIMESTAMP_BASE,
) -> dict[str, object]:
    """Columns as the control plane would build them: slots, duplicates, committed rows."""
    n = len(transfers)
    rows = transfers + [c.transfer for c in committed]
    slot_of = {a.id: k for k, a in enumerate(accounts)}
    assert len(slot_of) == len(accounts), "account ids must be distinct"
    assert all(t.debit in slot_of and t.credit in slot_of for t in rows[n:]), (
        "a committed transfer's accounts exist")
    committed_row = {c.transfer.id: n + k for k, c in enumerate(committed)}
    assert len(committed_row) == len(committed), "committed ids must be distinct"
    last_seen: dict[Id, int] = {}
    dup_prev, pending_prev = [], []
    for i, t in enumerate(transfers):
        dup_prev.append(last_seen.get(t.id, -1))
        pending_prev.append(last_seen.get(t.pending, -1))
        last_seen[t.id] = i
    if chain_break is None:
        chain_break = [0] * n
        if n:
            chain_break[-1] = 1

    def u64(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.uint64)

    def u32(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.uint32)

    def i64(values: list[int]) -> np.ndarray:
        return np.array(values, dtype=np.int64)

    return {
        "id_hi": u64([t.id[0] for t in rows]), "id_lo": u64([t.id[1] for t in rows]),
        "debit_hi": u64([t.debit[0] for t in rows]), "debit_lo": u64([t.debit[1] for t in rows]),
        "credit_hi": u64([t.credit[0] for t in rows]),
        "credit_lo": u64([t.credit[1] for t in rows]),
        "pending_hi": u64([t.pending[0] for t in rows]),
        "pending_lo": u64([t.pending[1] for t in rows]),
        "amount": u64([t.amount for t in rows]),
        "ledger": u32([t.ledger for t in rows]), "code": u32([t.code for t in rows]),
        "flags": u32([t.flags for t in rows]),
        "timeout_seconds": u32([t.timeout_seconds for t in rows]),
        "user_data_key": i64([t.user_data_key for t in rows]),
        "debit_slot": i64([slot_of.get(t.debit, -1) for t in rows]),
        "credit_slot": i64([slot_of.get(t.credit, -1) for t in rows]),
        "chain_break": np.array(chain_break, dtype=np.uint8),
        "dup_prev": i64(dup_prev),
        "exists_row": i64([committed_row.get(t.id, -1) for t in transfers]),
        "pending_prev": i64(pending_prev),
        "pending_row": i64([committed_row.get(t.pending, -1) for t in transfers]),
        "existing_timestamp": i64([c.timestamp for c in committed]),
        "precheck": u32([t.precheck for t in transfers]),
        "timestamp_base": timestamp_base,
        "acc_ledger": u32([a.ledger for a in accounts]),
        "acc_flags": u32([a.flags for a in accounts]),
        "acc_debits_pending": u64([a.debits_pending for a in accounts]),
        "acc_debits_posted": u64([a.debits_posted for a in accounts]),
        "acc_credits_pending": u64([a.credits_pending for a in accounts]),
        "acc_credits_posted": u64([a.credits_posted for a in accounts]),
        "status": np.array([PENDING_STATUS_NONE] * n + [_default_status(c) for c in committed],
                           dtype=np.uint8),
        "expires_at": i64([0] * n + [c.expires_at for c in committed]),
        # Outputs start as garbage: the kernel must write every one of them.
        "result": np.zeros(n, dtype=np.uint32),
        "timestamp_out": np.full(n, -7, dtype=np.int64),
        "amount_out": np.full(n, 7, dtype=np.uint64),
        "resolved_row": np.full(n, -7, dtype=np.int64),
        "balances_after": np.full((n, BALANCES_AFTER_COLUMNS), 7, dtype=np.uint64),
    }


def copy_columns(columns: dict[str, object]) -> dict[str, object]:
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in columns.items()}


def run_columns(columns: dict[str, object]) -> Outcome:
    """Run kernel and reference on copies of columns, assert they agree, return the outcome."""
    kernel = copy_columns(columns)
    reference = copy_columns(columns)
    ok_kernel = apply_transfers(**kernel)
    ok_reference = apply_transfers_reference(**reference)
    for name in OUTPUTS:
        assert kernel[name].tolist() == reference[name].tolist(), name
    assert ok_kernel == ok_reference
    return Outcome(
        results=kernel["result"].tolist(),
        timestamps=kernel["timestamp_out"].tolist(),
        ok_count=ok_kernel,
        amounts=kernel["amount_out"].tolist(),
        resolved=kernel["resolved_row"].tolist(),
        balances_after=kernel["balances_after"].tolist(),
        status=kernel["status"].tolist(),
        expires_at=kernel["expires_at"].tolist(),
        debits_pending=kernel["acc_debits_pending"].tolist(),
        debits_posted=kernel["acc_debits_posted"].tolist(),
        credits_pending=kernel["acc_credits_pending"].tolist(),
        credits_posted=kernel["acc_credits_posted"].tolist(),
        columns=columns,
    )


def run_both(
    accounts: list[Account],
    transfers: list[Transfer],
    committed: list[Committed] | None = None,
    chain_break: list[int] | None = None,
    timestamp_base: int = TIMESTAMP_BASE,
) -> Outcome:
    """Run kernel and reference on one batch, assert they agree, return the outcome."""
    return run_columns(make_columns(accounts, transfers, committed or [], chain_break,
                                    timestamp_base))


def assert_outputs_consistent(outcome: Outcome, timestamp_base: int = TIMESTAMP_BASE) -> None:
    """What every item's outputs say about each other, whatever the batch."""
    for i, r in enumerate(outcome.results):
        assert r != results.TRANSFER_UNSPECIFIED
        if r == results.TRANSFER_OK:
            assert outcome.timestamps[i] == timestamp_base + i
        else:
            assert outcome.amounts[i] == 0
            assert outcome.resolved[i] == -1
            assert outcome.balances_after[i] == [0] * BALANCES_AFTER_COLUMNS
            if r != results.TRANSFER_EXISTS:
                assert outcome.timestamps[i] == 0
    assert outcome.ok_count == outcome.results.count(results.TRANSFER_OK)


def expected_movements(
    outcome: Outcome, accounts: list[Account], committed: list[Committed]
) -> dict[int, tuple[int, int]]:
    """Per ledger, (pending, posted) by which debits and credits must each have grown.

    Worked out from the outputs alone: an OK pending item reserves its amount_out, an OK post
    or void releases the whole amount of the pending transfer it resolved, and every other OK
    item (posts included) posts its amount_out.
    """
    columns = outcome.columns
    n = len(outcome.results)
    flags = columns["flags"].tolist()
    debit_slot = columns["debit_slot"].tolist()
    committed_amounts = [c.transfer.amount for c in committed]
    movements: dict[int, list[int]] = {a.ledger: [0, 0] for a in accounts}
    for i, r in enumerate(outcome.results):
        if r != results.TRANSFER_OK:
            continue
        p = outcome.resolved[i]
        moved_on = movements[accounts[debit_slot[p if p >= 0 else i]].ledger]
        if p >= 0:
            moved_on[0] -= outcome.amounts[p] if p < n else committed_amounts[p - n]
        if flags[i] & PENDING:
            moved_on[0] += outcome.amounts[i]
        elif not flags[i] & VOID:
            moved_on[1] += outcome.amounts[i]
    return {ledger: (pending, posted) for ledger, (pending, posted) in movements.items()}


def assert_double_entry(
    outcome: Outcome, accounts: list[Account], committed: list[Committed]
) -> None:
    """Per ledger, debits and credits grew alike, by what the OK items say they moved."""
    for ledger, (pending, posted) in expected_movements(outcome, accounts, committed).items():
        in_ledger = [k for k, a in enumerate(accounts) if a.ledger == ledger]

        def grown(after: list[int], attr: str) -> int:
            return sum(after[k] - getattr(accounts[k], attr) for k in in_ledger)

        assert grown(outcome.debits_pending, "debits_pending") == pending
        assert grown(outcome.credits_pending, "credits_pending") == pending
        assert grown(outcome.debits_posted, "debits_posted") == posted
        assert grown(outcome.credits_posted, "credits_posted") == posted


# ---------------------------------------------------------------------------------------------
# Random batches.

ACCOUNT_FLAG_COMBOS = [0, DMNEC, CMNED, DMNEC | CMNED, CLOSED, DMNEC | CLOSED, CMNED | CLOSED]
TRANSFER_FIELDS = ["debit", "credit", "amount", "pending", "ledger", "code", "flags",
                   "timeout_seconds", "user_data_key"]


def up_to(limit: int) -> st.SearchStrategy[int]:
    """Integers in 0..limit, often at either end of the range."""
    small = st.integers(0, min(limit, 1000))
    return st.one_of(
        st.just(0), small, small, small, small,
        st.just(limit), st.integers(max(0, limit - 1000), limit), st.integers(0, limit),
    )


@st.composite
def pending_and_posted(draw: st.DrawFn) -> tuple[int, int]:
    """One side of an account, within the invariant pending + posted <= BALANCE_MAX."""
    posted = draw(up_to(MAX))
    pending = draw(up_to(MAX - posted))
    return (pending, posted) if draw(st.booleans()) else (posted, pending)


def account_id(slot: int) -> Id:
    return (slot % 2, slot + 1)


@st.composite
def account_lists(draw: st.DrawFn) -> list[Account]:
    """Mostly plain accounts with room to move, some at the edges (closed, near BALANCE_MAX)."""
    accounts = []
    for slot in range(draw(st.integers(1, 30))):
        if draw(st.integers(0, 3)):
            debits_pending, credits_pending = 0, 0
            debits_posted, credits_posted = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
            flags = draw(st.sampled_from([0, 0, DMNEC, CMNED]))
        else:
            debits_pending, debits_posted = draw(pending_and_posted())
            credits_pending, credits_posted = draw(pending_and_posted())
            flags = draw(st.sampled_from(ACCOUNT_FLAG_COMBOS))
        accounts.append(Account(
            id=account_id(slot), ledger=draw(st.sampled_from([1, 2])), flags=flags,
            debits_pending=debits_pending, debits_posted=debits_posted,
            credits_pending=credits_pending, credits_posted=credits_posted,
        ))
    return accounts


UNKNOWN_ACCOUNT_IDS = [(7, 1000), (0, 999)]

# Breaking one rule at a time keeps most items valid, so that the later rules (duplicates,
# closed accounts, overflow, limits) and linked chains that commit are reached often.
DEFECTS = {
    "id": lambda t: st.just(ZERO_ID),
    "debit": lambda t: st.sampled_from([ZERO_ID, t.credit, *UNKNOWN_ACCOUNT_IDS]),
    "credit": lambda t: st.sampled_from([ZERO_ID, t.debit, *UNKNOWN_ACCOUNT_IDS]),
    "amount": lambda t: st.one_of(st.just(0), st.just(2**64 - 1),
                                  st.integers(2**63 - 1000, 2**64 - 1)),
    "pending": lambda t: st.sampled_from([(0, 5), (5, 0)]),
    "ledger": lambda t: st.sampled_from([0, 1, 2, 3]),
    "code": lambda t: st.just(0),
    "flags": lambda t: st.sampled_from([PENDING, POST, VOID, BALANCING_DEBIT, BALANCING_CREDIT,
                                        RESERVED, 1 << 31, LINKED | PENDING, PENDING | POST]),
    "timeout_seconds": lambda t: st.integers(1, 2**32 - 1),
    "precheck": lambda t: st.sampled_from([results.TRANSFER_TIMESTAMP_MUST_BE_ZERO,
                                           results.TRANSFER_PENDING_TRANSFER_NOT_FOUND]),
}

AMOUNTS = st.one_of(st.integers(1, 1000), st.integers(1, 1000), st.integers(1, 1000),
                    st.integers(1, MAX))


@st.composite
def fresh_transfers(
    draw: st.DrawFn, id_pool: list[Id], accounts: list[Account], valid_weight: int
) -> Transfer:
    """A valid transfer, or (1 in valid_weight + 1 times per defect) one that breaks a rule."""
    debit = draw(st.sampled_from(accounts))
    same_ledger = [a for a in accounts if a.ledger == debit.ledger and a.id != debit.id]
    if same_ledger and draw(st.integers(0, 5)):
        credit = draw(st.sampled_from(same_ledger))
    else:
        credit = draw(st.sampled_from(accounts))
    transfer = Transfer(
        id=draw(st.sampled_from(id_pool)), debit=debit.id, credit=credit.id,
        amount=draw(AMOUNTS), ledger=debit.ledger, code=draw(st.sampled_from([1, 2])),
        flags=draw(st.sampled_from([0, 0, LINKED])), user_data_key=draw(st.sampled_from([0, 1])),
    )
    defect = draw(st.sampled_from([None] * valid_weight + list(DEFECTS)))
    if defect is not None:
        transfer = replace(transfer, **{defect: draw(DEFECTS[defect](transfer))})
    return transfer


def with_known_accounts(transfer: Transfer, accounts: list[Account]) -> Transfer:
    """The transfer, on known accounts: a committed transfer's accounts exist."""
    known = {a.id for a in accounts}
    return replace(transfer,
                   debit=transfer.debit if transfer.debit in known else accounts[0].id,
                   credit=transfer.credit if transfer.credit in known else accounts[-1].id)


@dataclass
class Scenario:
    accounts: list[Account]
    transfers: list[Transfer]
    committed: list[Committed]
    chain_break: list[int]


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    accounts = draw(account_lists())
    # A pool from 1 id (every item a duplicate) to more ids than items (few duplicates).
    id_pool = [(p % 3, p) for p in range(1, draw(st.integers(1, 80)) + 1)]
    fresh = fresh_transfers(id_pool, accounts, valid_weight=16)
    # Committed rows break rules more often: an item that repeats one with a fixed field
    # is how EXISTS_WITH_DIFFERENT_PENDING_ID, _TIMEOUT and _LEDGER are reached.
    fresh_committed = fresh_transfers(id_pool, accounts, valid_weight=2)

    committed_ids = draw(st.lists(st.sampled_from(id_pool), unique=True))
    committed = [
        Committed(with_known_accounts(replace(draw(fresh_committed), id=tid), accounts),
                  timestamp=TIMESTAMP_BASE - 1000 + k)
        for k, tid in enumerate(committed_ids)
    ]
    transfers: list[Transfer] = []
    for _ in range(draw(st.integers(0, 60))):
        transfer = draw(fresh)
        sources = transfers + [c.transfer for c in committed]
        # Repeat an earlier transfer, whole or with one field changed, so that EXISTS and
        # each EXISTS_WITH_DIFFERENT_* come up often.
        if sources and draw(st.integers(0, 2)) == 0:
            source = draw(st.sampled_from(sources))
            changed = draw(st.sampled_from([None, None, *TRANSFER_FIELDS]))
            transfer = replace(source, **({changed: getattr(transfer, changed)} if changed else {}))
        transfers.append(transfer)
    chain_break = [int(draw(st.integers(0, 6)) == 0) for _ in transfers]
    if chain_break:
        chain_break[-1] = 1
    return Scenario(accounts, transfers, committed, chain_break)


PROPERTY = settings(max_examples=400, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(scenarios())
def test_kernel_matches_reference_and_invariants_hold(scenario: Scenario) -> None:
    accounts, transfers = scenario.accounts, scenario.transfers
    outcome = run_both(accounts, transfers, scenario.committed, scenario.chain_break)
    committed_timestamps = {c.timestamp for c in scenario.committed}

    for i, (r, ts) in enumerate(zip(outcome.results, outcome.timestamps)):
        if r == results.TRANSFER_EXISTS:
            assert ts in committed_timestamps or (
                ts - TIMESTAMP_BASE in range(i)
                and outcome.results[ts - TIMESTAMP_BASE] == results.TRANSFER_OK
            )
    assert_outputs_consistent(outcome)
    assert_double_entry(outcome, accounts, scenario.committed)

    resolved_on = {s for i, p in enumerate(outcome.resolved) if p >= 0
                   for s in (outcome.columns["debit_slot"][p], outcome.columns["credit_slot"][p])}
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
        # Only resolving a reservation moves a closed account's balances.
        if before.flags & CLOSED and k not in resolved_on:
            assert (outcome.debits_pending[k], outcome.debits_posted[k],
                    outcome.credits_pending[k], outcome.credits_posted[k]) == (
                before.debits_pending, before.debits_posted,
                before.credits_pending, before.credits_posted)


# ---------------------------------------------------------------------------------------------
# Precedence: one transfer that breaks every rule, repaired one rule at a time. Step k checks
# that the k-th result wins over every later rule that the transfer still breaks.

A, B, C = (0, 0xA), (0, 0xB), (0xC, 0)
UNKNOWN_1, UNKNOWN_2 = (9, 1), (9, 2)
X = (1, 0x7)


def _initial_case() -> tuple[list[Account], Transfer, Transfer | None]:
    accounts = [
        Account(A, ledger=1, flags=CLOSED | DMNEC, debits_pending=MAX - 10, debits_posted=10),
        Account(B, ledger=2),
        Account(C, ledger=1, flags=CLOSED | CMNED, credits_pending=MAX - 10, credits_posted=10),
    ]
    transfer = Transfer(id=ZERO_ID, debit=ZERO_ID, credit=ZERO_ID, amount=0, pending=(0, 3),
                        ledger=0, code=0, flags=RESERVED | PENDING | POST, timeout_seconds=9,
                        precheck=results.TRANSFER_TIMESTAMP_MUST_BE_ZERO)
    # The committed original differs from the final transfer in every compared field.
    original = Transfer(id=X, debit=B, credit=A, amount=5, pending=(0, 1), ledger=2, code=2,
                        flags=LINKED, timeout_seconds=1, user_data_key=1)
    return accounts, transfer, original


def _set(attr: str, value: object):
    return lambda accounts, t, original: setattr(t, attr, value)


def _set_original(attr: str, value: object):
    return lambda accounts, t, original: setattr(original, attr, value)


def _set_account(slot: int, attr: str, value: int):
    return lambda accounts, t, original: setattr(accounts[slot], attr, value)


def _drop_original(accounts, t, original):
    t.id = (1, 0x8)


# (expected result, the repair that moves on to the next rule)
PRECEDENCE = [
    (results.TRANSFER_TIMESTAMP_MUST_BE_ZERO, _set("precheck", 0)),
    (results.TRANSFER_RESERVED_FLAG, _set("flags", PENDING | POST)),
    (results.TRANSFER_ID_MUST_NOT_BE_ZERO, _set("id", X)),
    (results.TRANSFER_FLAGS_ARE_MUTUALLY_EXCLUSIVE, _set("flags", 0)),
    (results.TRANSFER_DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO, _set("debit", UNKNOWN_1)),
    (results.TRANSFER_CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO, _set("credit", UNKNOWN_1)),
    (results.TRANSFER_ACCOUNTS_MUST_BE_DIFFERENT, _set("credit", UNKNOWN_2)),
    (results.TRANSFER_PENDING_ID_MUST_BE_ZERO, _set("pending", ZERO_ID)),
    (results.TRANSFER_TIMEOUT_RESERVED_FOR_PENDING_TRANSFER, _set("timeout_seconds", 0)),
    (results.TRANSFER_LEDGER_MUST_NOT_BE_ZERO, _set("ledger", 3)),
    (results.TRANSFER_CODE_MUST_NOT_BE_ZERO, _set("code", 1)),
    (results.TRANSFER_AMOUNT_MUST_NOT_BE_ZERO, _set("amount", MAX)),
    (results.TRANSFER_DEBIT_ACCOUNT_NOT_FOUND, _set("debit", A)),
    (results.TRANSFER_CREDIT_ACCOUNT_NOT_FOUND, _set("credit", B)),
    (results.TRANSFER_ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER, _set("credit", C)),
    (results.TRANSFER_TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS, _set("ledger", 1)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_FLAGS, _set_original("flags", 0)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID, _set_original("debit", A)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID, _set_original("credit", C)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_AMOUNT, _set_original("amount", MAX)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_PENDING_ID, _set_original("pending", ZERO_ID)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_USER_DATA, _set_original("user_data_key", 0)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_TIMEOUT, _set_original("timeout_seconds", 0)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_CODE, _set_original("code", 1)),
    (results.TRANSFER_EXISTS_WITH_DIFFERENT_LEDGER, _set_original("ledger", 1)),
    (results.TRANSFER_EXISTS, _drop_original),
    (results.TRANSFER_DEBIT_ACCOUNT_CLOSED, _set_account(0, "flags", DMNEC)),
    (results.TRANSFER_CREDIT_ACCOUNT_CLOSED, _set_account(2, "flags", CMNED)),
    (results.TRANSFER_OVERFLOWS_DEBITS_POSTED, _set_account(0, "debits_posted", 0)),
    (results.TRANSFER_OVERFLOWS_CREDITS_POSTED, _set_account(2, "credits_posted", 0)),
    (results.TRANSFER_OVERFLOWS_DEBITS, _set_account(0, "debits_pending", 0)),
    (results.TRANSFER_OVERFLOWS_CREDITS, _set_account(2, "credits_pending", 0)),
    (results.TRANSFER_EXCEEDS_CREDITS, _set_account(0, "credits_posted", MAX)),
    (results.TRANSFER_EXCEEDS_DEBITS, _set_account(2, "debits_posted", MAX)),
    (results.TRANSFER_OK, None),
]


@pytest.mark.parametrize("step", range(len(PRECEDENCE)), ids=[str(r) for r, _ in PRECEDENCE])
def test_precedence_of_each_result(step: int) -> None:
    accounts, transfer, original = _initial_case()
    for _, repair in PRECEDENCE[:step]:
        repair(accounts, transfer, original)
    committed = [Committed(original, timestamp=42)]
    outcome = run_both(accounts, [transfer], committed)
    expected = PRECEDENCE[step][0]
    assert outcome.results == [expected]
    if expected == results.TRANSFER_EXISTS:
        assert outcome.timestamps == [42]
    elif expected == results.TRANSFER_OK:
        assert outcome.timestamps == [TIMESTAMP_BASE]
        assert outcome.debits_posted[0] == MAX and outcome.credits_posted[2] == MAX
    else:
        assert outcome.timestamps == [0]


# ---------------------------------------------------------------------------------------------
# Linked chains and duplicates.

def _funded_accounts() -> list[Account]:
    return [Account(A, credits_posted=100), Account(B, debits_posted=100),
            Account(C, ledger=1, flags=DMNEC, credits_posted=50)]


def test_failed_chain_rolls_back_balances_exactly() -> None:
    accounts = _funded_accounts()
    chain = [
        Transfer(id=(0, 1), debit=A, credit=B, amount=30, flags=LINKED),
        Transfer(id=(0, 2), debit=B, credit=C, amount=20, flags=LINKED),
        Transfer(id=(0, 3), debit=C, credit=A, amount=71, flags=LINKED),  # C has only 70
        Transfer(id=(0, 4), debit=A, credit=B, amount=1),
        Transfer(id=(0, 5), debit=A, credit=B, amount=2),  # a chain of one after the chain
    ]
    outcome = run_both(accounts, chain)
    failed = results.TRANSFER_LINKED_EVENT_FAILED
    assert outcome.results == [failed, failed, results.TRANSFER_EXCEEDS_CREDITS, failed,
                               results.TRANSFER_OK]
    assert outcome.timestamps == [0, 0, 0, 0, TIMESTAMP_BASE + 4]
    assert outcome.ok_count == 1
    assert outcome.debits_posted == [2, 100, 0]
    assert outcome.credits_posted == [100, 2, 50]


def test_successful_chain_applies_every_item() -> None:
    chain = [
        Transfer(id=(0, 1), debit=A, credit=C, amount=30, flags=LINKED),
        Transfer(id=(0, 2), debit=C, credit=B, amount=80),  # needs the 30 just credited
    ]
    outcome = run_both(_funded_accounts(), chain)
    assert outcome.results == [results.TRANSFER_OK] * 2
    assert outcome.timestamps == [TIMESTAMP_BASE, TIMESTAMP_BASE + 1]


@pytest.mark.parametrize(
    ("flags", "chain_break", "expected"),
    [
        ([LINKED, LINKED], [0, 1], [2, 3]),  # the batch ends inside the chain
        ([LINKED], [1], [3]),  # a chain of one left open
        ([LINKED, LINKED, 0], [0, 1, 1], [2, 3, 1]),  # a request ends inside the chain
        ([LINKED, 0, LINKED, 0], [0, 1, 0, 1], [1, 1, 1, 1]),  # two closed chains
    ],
)
def test_open_chain_applies_nothing(flags: list[int], chain_break: list[int],
                                    expected: list[int]) -> None:
    accounts = _funded_accounts()
    transfers = [Transfer(id=(0, i + 1), debit=A, credit=B, amount=1, flags=f)
                 for i, f in enumerate(flags)]
    outcome = run_both(accounts, transfers, chain_break=chain_break)
    assert outcome.results == expected
    ok = expected.count(results.TRANSFER_OK)
    assert outcome.debits_posted[0] == ok and outcome.credits_posted[1] == ok
    assert [ts != 0 for ts in outcome.timestamps] == [r == 1 for r in expected]


def test_chain_with_reserved_flag_item_fails_whole_chain() -> None:
    chain = [
        Transfer(id=(0, 1), debit=A, credit=B, amount=1, flags=LINKED),
        Transfer(id=(0, 2), debit=A, credit=B, amount=1, flags=LINKED | RESERVED),
        Transfer(id=(0, 3), debit=A, credit=B, amount=1),
    ]
    outcome = run_both(_funded_accounts(), chain)
    assert outcome.results == [2, results.TRANSFER_RESERVED_FLAG, 2]
    assert outcome.debits_posted[0] == 0


def test_precheck_fails_its_chain() -> None:
    chain = [
        Transfer(id=(0, 1), debit=A, credit=B, amount=1, flags=LINKED),
        Transfer(id=(0, 2), debit=A, credit=B, amount=1, flags=LINKED,
                 precheck=results.TRANSFER_TIMESTAMP_MUST_BE_ZERO),
        Transfer(id=(0, 3), debit=A, credit=B, amount=1),
        Transfer(id=(0, 4), debit=A, credit=B, amount=1, flags=LINKED,
                 precheck=results.TRANSFER_TIMESTAMP_MUST_BE_ZERO),  # open: chain state wins
    ]
    outcome = run_both(_funded_accounts(), chain)
    assert outcome.results == [2, results.TRANSFER_TIMESTAMP_MUST_BE_ZERO, 2,
                               results.TRANSFER_LINKED_EVENT_CHAIN_OPEN]
    assert outcome.debits_posted[0] == 0


def test_duplicate_after_failed_original_is_evaluated_fresh() -> None:
    transfers = [
        Transfer(id=(0, 1), debit=UNKNOWN_1, credit=B, amount=5),  # fails: no such account
        Transfer(id=(0, 1), debit=A, credit=B, amount=6),
        Transfer(id=(0, 1), debit=A, credit=B, amount=6),
    ]
    outcome = run_both(_funded_accounts(), transfers)
    assert outcome.results == [results.TRANSFER_DEBIT_ACCOUNT_NOT_FOUND, results.TRANSFER_OK,
                               results.TRANSFER_EXISTS]
    assert outcome.timestamps == [0, TIMESTAMP_BASE + 1, TIMESTAMP_BASE + 1]
    assert outcome.debits_posted[0] == 6


def test_duplicate_after_rolled_back_original_is_evaluated_fresh() -> None:
    transfers = [
        Transfer(id=(0, 1), debit=A, credit=B, amount=5, flags=LINKED),
        Transfer(id=(0, 2), debit=A, credit=B, amount=0),  # fails, rolls back (0, 1)
        Transfer(id=(0, 1), debit=A, credit=B, amount=7),
    ]
    outcome = run_both(_funded_accounts(), transfers)
    assert outcome.results == [2, results.TRANSFER_AMOUNT_MUST_NOT_BE_ZERO,
                               results.TRANSFER_OK]
    assert outcome.debits_posted[0] == 7


def test_duplicate_of_ok_item_exists_with_its_timestamp() -> None:
    transfers = [
        Transfer(id=(0, 9), debit=C, credit=B, amount=1),  # another id in between
        Transfer(id=(0, 1), debit=A, credit=B, amount=5, user_data_key=3),
        Transfer(id=(0, 1), debit=A, credit=B, amount=5, user_data_key=3),
        Transfer(id=(0, 1), debit=A, credit=B, amount=5, user_data_key=4),
    ]
    outcome = run_both(_funded_accounts(), transfers)
    assert outcome.results == [results.TRANSFER_OK, results.TRANSFER_OK, results.TRANSFER_EXISTS,
                               results.TRANSFER_EXISTS_WITH_DIFFERENT_USER_DATA]
    assert outcome.timestamps == [TIMESTAMP_BASE, TIMESTAMP_BASE + 1, TIMESTAMP_BASE + 1, 0]
    assert outcome.debits_posted[0] == 5


def test_duplicate_of_committed_transfer_exists_with_its_timestamp() -> None:
    original = Transfer(id=(0, 1), debit=A, credit=B, amount=5, flags=LINKED)
    transfers = [
        # EXISTS does not fail a chain, and flags are compared including LINKED.
        Transfer(id=(0, 1), debit=A, credit=B, amount=5, flags=LINKED),
        Transfer(id=(0, 2), debit=A, credit=B, amount=1),
        Transfer(id=(0, 1), debit=A, credit=B, amount=5),
    ]
    outcome = run_both(_funded_accounts(), transfers, [Committed(original, timestamp=77)])
    assert outcome.results == [results.TRANSFER_EXISTS, results.TRANSFER_OK,
                               results.TRANSFER_EXISTS_WITH_DIFFERENT_FLAGS]
    assert outcome.timestamps == [77, TIMESTAMP_BASE + 1, 0]
    assert outcome.ok_count == 1


def test_exists_inside_a_failed_chain_is_reported_as_failed() -> None:
    original = Transfer(id=(0, 1), debit=A, credit=B, amount=5, flags=LINKED)
    transfers = [
        Transfer(id=(0, 1), debit=A, credit=B, amount=5, flags=LINKED),
        Transfer(id=(0, 2), debit=A, credit=B, amount=1, flags=LINKED),
        Transfer(id=(0, 3), debit=A, credit=UNKNOWN_1, amount=1),
    ]
    outcome = run_both(_funded_accounts(), transfers, [Committed(original, timestamp=77)])
    assert outcome.results == [2, 2, results.TRANSFER_CREDIT_ACCOUNT_NOT_FOUND]
    assert outcome.timestamps == [0, 0, 0]
    assert outcome.debits_posted[0] == 0


def test_empty_batch() -> None:
    outcome = run_both(_funded_accounts(), [])
    assert outcome.results == [] and outcome.ok_count == 0


# ---------------------------------------------------------------------------------------------
# Programmer errors: rejected before anything is modified.

def _valid_columns() -> dict[str, object]:
    """Rows 0-2: a batch of two duplicates and a post; rows 3-4: two committed transfers."""
    accounts = [Account(A, debits_pending=5, credits_posted=100),
                Account(B, credits_pending=5, debits_posted=100)]
    transfers = [Transfer(id=(0, 1), debit=A, credit=B, amount=5),
                 Transfer(id=(0, 1), debit=A, credit=B, amount=5),
                 Transfer(id=(0, 2), debit=ZERO_ID, credit=ZERO_ID, amount=0, pending=(0, 9),
                          ledger=0, code=0, flags=POST)]
    original = Committed(Transfer(id=(0, 1), debit=A, credit=B, amount=5), timestamp=1)
    pending = Committed(Transfer(id=(0, 9), debit=A, credit=B, amount=5, flags=PENDING),
                        timestamp=2)
    return make_columns(accounts, transfers, [original, pending], None)


def _shorten(name: str):
    def change(columns: dict[str, object]) -> None:
        columns[name] = columns[name][:-1]
    return change


def _put(name: str, index: int, value: int):
    def change(columns: dict[str, object]) -> None:
        columns[name][index] = value
    return change


def _replace(name: str, value: object):
    def change(columns: dict[str, object]) -> None:
        columns[name] = value
    return change


BAD_ARGUMENTS = {
    **{f"short {name}": _shorten(name) for name in (
        "id_lo", "amount", "ledger", "user_data_key", "debit_slot", "credit_slot", "status",
        "expires_at", "chain_break", "dup_prev", "exists_row", "pending_prev", "pending_row",
        "existing_timestamp", "precheck", "acc_flags", "acc_credits_posted", "result",
        "timestamp_out", "amount_out", "resolved_row", "balances_after")},
    "balances_after with 7 columns": _replace("balances_after", np.zeros((3, 7), np.uint64)),
    "debit_slot past accounts": _put("debit_slot", 0, 2),
    "credit_slot below -1": _put("credit_slot", 1, -2),
    "debit_slot of a committed row unknown": _put("debit_slot", 3, -1),
    "credit_slot of a committed row past accounts": _put("credit_slot", 4, 2),
    "exists_row inside batch": _put("exists_row", 0, 1),
    "exists_row past rows": _put("exists_row", 0, 5),
    "pending_row inside batch": _put("pending_row", 2, 1),
    "pending_row past rows": _put("pending_row", 2, 5),
    "dup_prev forward": _put("dup_prev", 0, 1),
    "dup_prev to itself": _put("dup_prev", 1, 1),
    "pending_prev forward": _put("pending_prev", 0, 2),
    "pending_prev to itself": _put("pending_prev", 2, 2),
    **{f"precheck {value}": _put("precheck", 1, value) for value in (
        results.TRANSFER_OK, results.TRANSFER_LINKED_EVENT_FAILED,
        results.TRANSFER_LINKED_EVENT_CHAIN_OPEN, results.TRANSFER_EXISTS,
        results.TRANSFER_EXCEEDS_REFUNDABLE_AMOUNT + 1)},
    "status of a batch row": _put("status", 0, PENDING_STATUS_PENDING),
    "status of a committed row that is not pending": _put("status", 3, PENDING_STATUS_PENDING),
    "no status for a committed pending row": _put("status", 4, PENDING_STATUS_NONE),
    "status past EXPIRED": _put("status", 4, 5),
    "timestamp_base negative": _replace("timestamp_base", -1),
    "timestamp_base too late for the last item": _replace("timestamp_base", 2**63 - 2),
}


@pytest.mark.parametrize("implementation", [apply_transfers, apply_transfers_reference],
                         ids=["kernel", "reference"])
@pytest.mark.parametrize("change", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_arguments_raise_before_any_change(implementation, change) -> None:
    columns = _valid_columns()
    change(columns)
    before = copy_columns(columns)
    with pytest.raises(ValueError):
        implementation(**columns)
    for name, value in columns.items():
        if isinstance(value, np.ndarray):
            assert value.tolist() == before[name].tolist(), name


def test_valid_arguments_are_accepted() -> None:
    outcome = run_columns(_valid_columns())
    # Both duplicates are of the committed transfer; the post resolves the committed pending.
    assert outcome.results == [results.TRANSFER_EXISTS, results.TRANSFER_EXISTS,
                               results.TRANSFER_OK]
    columns = _valid_columns()
    columns["timestamp_base"] = 2**63 - 3  # the last item's timestamp is the largest int64
    assert run_columns(columns).ok_count == 1


def test_kernel_and_reference_have_one_signature() -> None:
    kernel = list(inspect.signature(apply_transfers).parameters)
    reference = list(inspect.signature(apply_transfers_reference).parameters)
    assert kernel == reference
