"""Two-phase transfers, expiry, balancing and closed accounts through the real server, as a card
programme, a wallet and a marketplace use them: exact balances after each step, exactly-once
resolution under concurrency, expiry by the engine's own commit loop (in-process with a moved
clock, and across a restart of a subprocess engine), sweeping with balancing transfers, and
closing an account with reservations still open.

Per-result precedence is tests/integration/test_results.py; random sequences against the
reference model are tests/integration/test_model.py.
"""
from __future__ import annotations

import asyncio
import random
import time
import uuid

import grpc
import pytest

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from harness import EngineProcess, account, transfer

MAX = 2**63 - 1
PENDING = pb.TRANSFER_FLAGS_PENDING
POST = pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER
VOID = pb.TRANSFER_FLAGS_VOID_PENDING_TRANSFER
BAL_DR = pb.TRANSFER_FLAGS_BALANCING_DEBIT
BAL_CR = pb.TRANSFER_FLAGS_BALANCING_CREDIT
DMNEC = pb.ACCOUNT_FLAGS_DEBITS_MUST_NOT_EXCEED_CREDITS
HISTORY = pb.ACCOUNT_FLAGS_HISTORY
CLOSED = pb.ACCOUNT_FLAGS_CLOSED
R = pb.TransferResult
BOTH = pb.ACCOUNT_FILTER_FLAGS_DEBITS | pb.ACCOUNT_FILTER_FLAGS_CREDITS
# transfers.pending_status
ST_PENDING, ST_POSTED, ST_VOIDED, ST_EXPIRED = 1, 2, 3, 4


def name(value: int) -> str:
    return R.Name(value).removeprefix("TRANSFER_RESULT_")


def resolution(flag: int, pending_id: bytes, amount: int = 0, **fields) -> pb.Transfer:
    return pb.Transfer(id=fields.pop("id", None) or new_id(), pending_id=pending_id,
                       amount=amount, flags=flag, **fields)


async def open_accounts(stub, *flags: int) -> list[bytes]:
    accounts = [account(flags=f) for f in flags]
    response = await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=accounts))
    assert [r.result for r in response.results] == [pb.ACCOUNT_RESULT_OK] * len(accounts)
    return [a.id for a in accounts]


async def submit(stub, *transfers: pb.Transfer) -> list[str]:
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=list(transfers)))
    return [name(r.result) for r in response.results]


async def commit(stub, *transfers: pb.Transfer) -> list[int]:
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=list(transfers)))
    assert [name(r.result) for r in response.results] == ["OK"] * len(transfers)
    return [r.timestamp for r in response.results]


async def balances(stub, *ids: bytes) -> list[tuple[int, int, int, int]]:
    """(debits_pending, debits_posted, credits_pending, credits_posted) per account."""
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=list(ids)))
    assert [a.id for a in found.accounts] == list(ids)
    return [(a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)
            for a in found.accounts]


async def stored(stub, *ids: bytes) -> list[pb.Transfer]:
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=list(ids)))
    assert [t.id for t in found.transfers] == list(ids)
    return list(found.transfers)


async def history(stub, account_id: bytes) -> list[tuple[int, int, int, int, int]]:
    response = await stub.GetAccountBalances(pb.GetAccountBalancesRequest(filter=pb.AccountFilter(
        account_id=account_id, limit=8190, flags=BOTH)))
    return [(b.timestamp, b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted)
            for b in response.balances]


async def fund(stub, bank: bytes, target: bytes, amount: int) -> None:
    await commit(stub, transfer(bank, target, amount))


async def pending_status(db, transfer_id: bytes) -> int:
    return await db.fetchval("SELECT pending_status FROM transfers WHERE id = $1",
                             uuid.UUID(bytes=transfer_id))


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05):
    """Poll an async predicate until it is truthy; the value, or AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(interval)


# -- authorize / capture / void --------------------------------------------------------------------

async def test_authorize_then_partial_capture_releases_the_rest(stub):
    bank, card, merchant = await open_accounts(stub, 0, DMNEC, 0)
    await fund(stub, bank, card, 1_000)
    auth = transfer(card, merchant, 300, flags=PENDING, code=3, user_data=b"auth-1")
    await commit(stub, auth)
    assert await balances(stub, card, merchant) == [(300, 0, 0, 1_000), (0, 0, 300, 0)]
    # The reservation counts against the card's limit: 700 left, not 1,000.
    assert await submit(stub, transfer(card, merchant, 701)) == ["EXCEEDS_CREDITS"]

    capture = resolution(POST, auth.id, 120, user_data=b"capture-1")
    (stamp,) = await commit(stub, capture)
    assert await balances(stub, card, merchant) == [(0, 120, 0, 1_000), (0, 0, 0, 120)]
    pending, posted = await stored(stub, auth.id, capture.id)
    assert pending.amount == 300 and pending.flags == PENDING
    assert posted == pb.Transfer(
        id=capture.id, debit_account_id=card, credit_account_id=merchant, amount=120,
        pending_id=auth.id, ledger=1, code=3, flags=POST, user_data=b"capture-1", timestamp=stamp)
    # The released 180 is spendable again; the rest of the reservation cannot be captured later.
    assert await submit(stub, resolution(POST, auth.id, 10)) == ["PENDING_TRANSFER_ALREADY_POSTED"]
    assert await submit(stub, transfer(card, merchant, 881), transfer(card, merchant, 880)) == [
        "EXCEEDS_CREDITS", "OK"]
    assert await balances(stub, card) == [(0, 1_000, 0, 1_000)]


async def test_post_amount_zero_posts_all_of_it(stub):
    a, b = await open_accounts(stub, 0, 0)
    auth = transfer(a, b, 250, flags=PENDING)
    await commit(stub, auth)
    capture = resolution(POST, auth.id)
    await commit(stub, capture)
    assert (await stored(stub, capture.id))[0].amount == 250
    assert await balances(stub, a, b) == [(0, 250, 0, 0), (0, 0, 0, 250)]


async def test_void_releases_everything(stub, db):
    bank, card, merchant = await open_accounts(stub, 0, DMNEC, 0)
    await fund(stub, bank, card, 500)
    auth = transfer(card, merchant, 500, flags=PENDING)
    await commit(stub, auth)
    assert await submit(stub, transfer(card, merchant, 1)) == ["EXCEEDS_CREDITS"]
    cancel = resolution(VOID, auth.id)
    await commit(stub, cancel)
    assert await balances(stub, card, merchant) == [(0, 0, 0, 500), (0, 0, 0, 0)]
    assert (await stored(stub, cancel.id))[0].amount == 500
    assert await submit(stub, resolution(POST, auth.id), resolution(VOID, auth.id)) == [
        "PENDING_TRANSFER_ALREADY_VOIDED"] * 2
    assert await submit(stub, transfer(card, merchant, 500)) == ["OK"]
    assert await pending_status(db, auth.id) == ST_VOIDED


async def test_pending_counts_against_debits_must_not_exceed_credits(stub):
    bank, wallet, shop = await open_accounts(stub, 0, DMNEC, 0)
    await fund(stub, bank, wallet, 100)
    hold = transfer(wallet, shop, 70, flags=PENDING)
    assert await submit(stub, hold) == ["OK"]
    assert await submit(stub, transfer(wallet, shop, 31, flags=PENDING),
                        transfer(wallet, shop, 31)) == ["EXCEEDS_CREDITS"] * 2
    assert await submit(stub, transfer(wallet, shop, 30)) == ["OK"]
    assert await balances(stub, wallet) == [(70, 30, 0, 100)]
    # A partial post of 50 releases 20, which is spendable; nothing more.
    assert await submit(stub, resolution(POST, hold.id, 50)) == ["OK"]
    assert await submit(stub, transfer(wallet, shop, 21), transfer(wallet, shop, 20)) == [
        "EXCEEDS_CREDITS", "OK"]
    assert await balances(stub, wallet) == [(0, 100, 0, 100)]


# -- exactly one resolution under concurrency --------------------------------------------------------

async def test_concurrent_post_and_void_of_the_same_pending_exactly_one_wins(engine_app, stub, db):
    """Many clients (separate channels) resolve the same pending transfers at once: per pending,
    six different posts and voids, each sent twice (an identical replay). Exactly one of the six
    commits; its two sends get OK and EXISTS; every other send gets ALREADY_POSTED or
    ALREADY_VOIDED after the winner's kind; balances and storage reflect the winner alone."""
    pendings_count, clients = 8, 8
    bank, payer, payee = await open_accounts(stub, 0, DMNEC, 0)
    await fund(stub, bank, payer, 10_000)
    pendings = [transfer(payer, payee, 100 + k, flags=PENDING) for k in range(pendings_count)]
    await commit(stub, *pendings)

    candidates: dict[bytes, list[pb.Transfer]] = {}
    sends: list[pb.Transfer] = []
    for k, p in enumerate(pendings):
        options = [resolution(POST, p.id, amount) for amount in (0, 10 + k, p.amount)]
        options += [resolution(VOID, p.id), resolution(VOID, p.id, p.amount),
                    resolution(VOID, p.id, debit_account_id=payer)]
        candidates[p.id] = options
        sends += options + options  # each one twice: an identical replay
    random.Random(7).shuffle(sends)

    channels = [grpc.aio.insecure_channel(engine_app.address) for _ in range(clients)]
    try:
        stubs = [ledger_pb2_grpc.LedgerServiceStub(c) for c in channels]
        start = asyncio.Event()

        async def send(k: int, t: pb.Transfer) -> tuple[bytes, str]:
            await start.wait()
            response = await stubs[k % clients].CreateTransfers(
                pb.CreateTransfersRequest(transfers=[t]))
            return t.id, name(response.results[0].result)

        tasks = [asyncio.ensure_future(send(k, t)) for k, t in enumerate(sends)]
        await asyncio.sleep(0)
        start.set()
        outcomes = await asyncio.gather(*tasks)
    finally:
        for c in channels:
            await c.close()

    by_id: dict[bytes, list[str]] = {}
    for transfer_id, result in outcomes:
        by_id.setdefault(transfer_id, []).append(result)
    expected_payer = [0, 0, 0, 10_000]
    for p in pendings:
        options = candidates[p.id]
        winners = [t for t in options if "OK" in by_id[t.id]]
        assert len(winners) == 1, [by_id[t.id] for t in options]
        winner = winners[0]
        assert sorted(by_id[winner.id]) == ["EXISTS", "OK"]
        lost = "PENDING_TRANSFER_ALREADY_POSTED" if winner.flags & POST else \
            "PENDING_TRANSFER_ALREADY_VOIDED"
        for t in options:
            if t is not winner:
                assert by_id[t.id] == [lost, lost], by_id[t.id]
        rows = await db.fetch("SELECT id, amount FROM transfers WHERE pending_id = $1",
                              uuid.UUID(bytes=p.id))
        assert [r["id"].bytes for r in rows] == [winner.id]
        moved = (winner.amount or p.amount) if winner.flags & POST else 0
        assert rows[0]["amount"] == (moved if winner.flags & POST else p.amount)
        expected_payer[1] += moved
        assert await pending_status(db, p.id) == (ST_POSTED if winner.flags & POST else ST_VOIDED)
    assert await balances(stub, payer, payee) == [
        tuple(expected_payer), (0, 0, 0, expected_payer[1])]


# -- expiry ------------------------------------------------------------------------------------------

async def test_timeout_expiry_by_the_engine_releases_the_reservation(engine_app, stub, db):
    """With the commit clock moved past the timeout, the engine's own loop expires the
    reservation without any request; a later post or void gets PENDING_TRANSFER_EXPIRED; the
    release is a row in the history of both HISTORY accounts, and no transfer is written."""
    bank, card, merchant = await open_accounts(stub, 0, DMNEC | HISTORY, HISTORY)
    await fund(stub, bank, card, 1_000)
    auth = transfer(card, merchant, 400, flags=PENDING, timeout_seconds=60)
    keep = transfer(card, merchant, 100, flags=PENDING)  # no timeout: never expires
    soon = transfer(card, merchant, 50, flags=PENDING, timeout_seconds=3600)
    stamps = await commit(stub, auth, keep, soon)
    assert await balances(stub, card, merchant) == [(550, 0, 0, 1_000), (0, 0, 550, 0)]
    transfers_before = await db.fetchval("SELECT count(*) FROM transfers")

    moved = time.time_ns() + 120 * 10**9  # past 60 s, before 3,600 s
    engine_app.engine.clock = lambda: moved

    async def released():
        return (await balances(stub, card))[0][0] == 150
    await wait_for(released, timeout=10)
    assert await balances(stub, card, merchant) == [(150, 0, 0, 1_000), (0, 0, 150, 0)]
    assert await pending_status(db, auth.id) == ST_EXPIRED
    assert await pending_status(db, keep.id) == ST_PENDING
    assert await pending_status(db, soon.id) == ST_PENDING
    assert await db.fetchval("SELECT count(*) FROM transfers") == transfers_before

    card_history = await history(stub, card)
    merchant_history = await history(stub, merchant)
    assert [row[1:] for row in card_history] == [
        (0, 0, 0, 1_000), (400, 0, 0, 1_000), (500, 0, 0, 1_000), (550, 0, 0, 1_000),
        (150, 0, 0, 1_000)]
    assert [row[1:] for row in merchant_history] == [
        (0, 0, 400, 0), (0, 0, 500, 0), (0, 0, 550, 0), (0, 0, 150, 0)]
    expiry_stamp = card_history[-1][0]
    assert merchant_history[-1][0] == expiry_stamp
    assert expiry_stamp > stamps[-1] and expiry_stamp >= moved

    assert await submit(stub, resolution(POST, auth.id), resolution(VOID, auth.id)) == [
        "PENDING_TRANSFER_EXPIRED"] * 2
    # The released 400 is spendable; the reservations still open still count.
    assert await submit(stub, transfer(card, merchant, 851), transfer(card, merchant, 850)) == [
        "EXCEEDS_CREDITS", "OK"]
    assert await submit(stub, resolution(POST, keep.id), resolution(VOID, soon.id)) == ["OK", "OK"]
    assert await balances(stub, card) == [(0, 950, 0, 1_000)]
    assert len(await history(stub, card)) == len(card_history) + 3


async def test_a_post_past_the_timeout_is_expired_without_waiting(engine_app, stub, db):
    """A post sent right after the clock passed the timeout gets PENDING_TRANSFER_EXPIRED,
    whether the commit loop expired the reservation while idle or does it in the post's own
    commit (before the batch's items)."""
    a, b = await open_accounts(stub, 0, 0)
    auth = transfer(a, b, 40, flags=PENDING, timeout_seconds=30)
    await commit(stub, auth)
    moved = time.time_ns() + 31 * 10**9
    engine_app.engine.clock = lambda: moved
    assert await submit(stub, resolution(POST, auth.id)) == ["PENDING_TRANSFER_EXPIRED"]
    assert await balances(stub, a, b) == [(0, 0, 0, 0), (0, 0, 0, 0)]
    assert await pending_status(db, auth.id) == ST_EXPIRED


class SteppingClock:
    """A commit clock held at `start`, then `step` ns later at every reading once armed."""

    def __init__(self, start: int, step: int):
        self.now, self.step, self.armed = start, step, False

    def __call__(self) -> int:
        if self.armed:
            self.now += self.step
        return self.now


@pytest.mark.parametrize("before_ms, step_ms", [(300, 0), (300, 250), (300, 299), (300, 600),
                                                (20, 7), (1, 1)])
async def test_a_reservation_lapses_between_the_items_before_and_after_its_expiry(
        engine_app, stub, before_ms, step_ms):
    """However the clock moves while a commit is prepared, an item stamped at or after a
    reservation's expiry sees it released and an item stamped before sees it held: a balancing
    debit then takes all of the balance, or all but the reservation. (A commit whose clock
    crossed the expiry between its expiry check and its stamps once took the reservation as
    held at a timestamp past its expiry.)"""
    bank, card, merchant, sweep = await open_accounts(stub, 0, DMNEC, 0, 0)
    await fund(stub, bank, card, 1_000)
    auth = transfer(card, merchant, 298, flags=PENDING, timeout_seconds=1)
    [stamp] = await commit(stub, auth)
    expiry = stamp + 10**9
    clock = SteppingClock(expiry - before_ms * 10**6, step_ms * 10**6)
    engine_app.engine.clock = clock
    await asyncio.sleep(0.05)  # the loop goes idle on the held clock
    clock.armed = True
    drain = transfer(card, sweep, 1_000, flags=BAL_DR)
    [taken] = await commit(stub, drain)
    [swept] = await stored(stub, drain.id)
    assert swept.amount == (1_000 if taken >= expiry else 702), (taken - expiry, swept.amount)


async def test_expiry_is_durable_and_happens_once_across_restarts(database_url, redis_url, db):
    """A subprocess engine (its clock cannot be moved): reservations of 1 s are created, the
    engine is killed before they lapse and started again after; the new process expires them
    exactly once, and a further restart does not expire or release anything again."""
    engine = EngineProcess(database_url, redis_url)
    engine.start()
    try:
        async with grpc.aio.insecure_channel(engine.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            bank, card, merchant = await open_accounts(stub, 0, DMNEC | HISTORY, HISTORY)
            await fund(stub, bank, card, 1_000)
            lapsing = transfer(card, merchant, 300, flags=PENDING, timeout_seconds=1)
            captured = transfer(card, merchant, 200, flags=PENDING, timeout_seconds=1)
            kept = transfer(card, merchant, 100, flags=PENDING)
            await commit(stub, lapsing, captured, kept, resolution(POST, captured.id, 150))
            created = time.monotonic()
        engine.kill()  # before the reservation lapses

        await asyncio.sleep(max(0.0, 1.2 - (time.monotonic() - created)))
        await asyncio.to_thread(engine.start)
        async with grpc.aio.insecure_channel(engine.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)

            async def released():
                return (await balances(stub, card))[0][0] == 100
            await wait_for(released, timeout=15)
            after_expiry = await balances(stub, card, merchant)
            assert after_expiry == [(100, 150, 0, 1_000), (0, 0, 100, 150)]
            card_history = await history(stub, card)
        assert await pending_status(db, lapsing.id) == ST_EXPIRED
        assert await pending_status(db, captured.id) == ST_POSTED
        assert await pending_status(db, kept.id) == ST_PENDING

        # Restart again, well past the expiry: nothing lapses or is released a second time.
        assert engine.terminate() == 0
        await asyncio.to_thread(engine.start)
        async with grpc.aio.insecure_channel(engine.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            await asyncio.sleep(1.2)  # longer than the idle wake-up of the commit loop
            assert await balances(stub, card, merchant) == after_expiry
            assert await history(stub, card) == card_history
            assert await submit(stub, resolution(POST, lapsing.id)) == ["PENDING_TRANSFER_EXPIRED"]
            assert await submit(stub, resolution(VOID, kept.id)) == ["OK"]
            assert await balances(stub, card) == [(0, 150, 0, 1_000)]
    finally:
        engine.kill()
    assert [row[1:] for row in card_history] == [
        (0, 0, 0, 1_000), (300, 0, 0, 1_000), (500, 0, 0, 1_000), (600, 0, 0, 1_000),
        (400, 150, 0, 1_000), (100, 150, 0, 1_000)]
    expiries = [line for line in engine.lines if '"reservations expired"' in line]
    assert len(expiries) == 1, expiries
    assert await db.fetchval(
        "SELECT count(*) FROM account_balances WHERE account_id = $1",
        uuid.UUID(bytes=card)) == len(card_history) + 1


# -- balancing and closing ---------------------------------------------------------------------------

async def test_sweep_an_account_to_zero_with_balancing_debit(stub):
    bank, wallet, shop, settlement = await open_accounts(stub, 0, 0, 0, 0)
    await commit(stub, transfer(bank, wallet, 1_000), transfer(wallet, shop, 300))
    hold = transfer(wallet, shop, 100, flags=PENDING)
    await commit(stub, hold)

    sweep = transfer(wallet, settlement, MAX, flags=BAL_DR)
    (stamp,) = await commit(stub, sweep)
    (swept,) = await stored(stub, sweep.id)
    assert swept == pb.Transfer(id=sweep.id, debit_account_id=wallet, credit_account_id=settlement,
                                amount=600, ledger=1, code=1, flags=BAL_DR, timestamp=stamp)
    assert await balances(stub, wallet, settlement) == [(100, 900, 0, 1_000), (0, 0, 0, 600)]
    # A replay with the requested amount is the same transfer, and moves nothing more.
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[sweep]))
    assert [(name(r.result), r.timestamp) for r in response.results] == [("EXISTS", stamp)]

    # Once the hold is voided, a second sweep takes the rest; a third moves 0.
    second, third = transfer(wallet, settlement, MAX, flags=BAL_DR), \
        transfer(wallet, settlement, MAX, flags=BAL_DR)
    await commit(stub, resolution(VOID, hold.id), second, third)
    assert [t.amount for t in await stored(stub, second.id, third.id)] == [100, 0]
    wallet_balances = (await balances(stub, wallet))[0]
    assert wallet_balances == (0, 1_000, 0, 1_000)
    assert wallet_balances[3] - wallet_balances[1] - wallet_balances[0] == 0


async def test_sweep_with_balancing_credit(stub):
    """BALANCING_CREDIT caps at what the credit account owes (debits minus credits)."""
    loan, borrower, funding = await open_accounts(stub, 0, 0, 0)
    await commit(stub, transfer(loan, borrower, 750))
    repay = transfer(funding, loan, MAX, flags=BAL_CR)
    await commit(stub, repay)
    assert (await stored(stub, repay.id))[0].amount == 750
    assert await balances(stub, loan) == [(0, 750, 0, 750)]


async def test_closed_account(stub, db):
    """Created CLOSED: no transfers either way. Closed with reservations open: new transfers of
    any kind are rejected, but the reservations can still be posted or voided. Reopened: new
    transfers commit again."""
    bank, shop, born_closed = await open_accounts(stub, 0, 0, CLOSED)
    assert await submit(stub, transfer(bank, born_closed, 1), transfer(born_closed, bank, 1),
                        transfer(born_closed, bank, MAX, flags=BAL_DR),
                        transfer(bank, born_closed, 1, flags=PENDING)) == [
        "CREDIT_ACCOUNT_CLOSED", "DEBIT_ACCOUNT_CLOSED", "DEBIT_ACCOUNT_CLOSED",
        "CREDIT_ACCOUNT_CLOSED"]
    assert await balances(stub, born_closed) == [(0, 0, 0, 0)]

    (store,) = await open_accounts(stub, 0)
    await commit(stub, transfer(bank, store, 500))
    hold_out = transfer(store, shop, 120, flags=PENDING)
    hold_in = transfer(bank, store, 80, flags=PENDING)
    hold_void = transfer(store, shop, 30, flags=PENDING)
    await commit(stub, hold_out, hold_in, hold_void)
    closed = await stub.CloseAccounts(pb.CloseAccountsRequest(ids=[store, store]))
    assert [r.result for r in closed.results] == [pb.CLOSURE_RESULT_OK] * 2
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[store]))
    assert found.accounts[0].flags == CLOSED

    assert await submit(stub, transfer(store, shop, 1), transfer(shop, store, 1),
                        transfer(store, shop, 1, flags=PENDING),
                        transfer(store, shop, MAX, flags=BAL_DR)) == [
        "DEBIT_ACCOUNT_CLOSED", "CREDIT_ACCOUNT_CLOSED", "DEBIT_ACCOUNT_CLOSED",
        "DEBIT_ACCOUNT_CLOSED"]
    assert await submit(stub, resolution(POST, hold_out.id, 100), resolution(POST, hold_in.id),
                        resolution(VOID, hold_void.id)) == ["OK", "OK", "OK"]
    assert await balances(stub, store) == [(0, 100, 0, 580)]

    reopened = await stub.ReopenAccounts(pb.ReopenAccountsRequest(ids=[store]))
    assert [r.result for r in reopened.results] == [pb.CLOSURE_RESULT_OK]
    assert await submit(stub, transfer(store, shop, 480, flags=BAL_DR)) == ["OK"]
    assert await balances(stub, store) == [(0, 580, 0, 580)]
