"""Exactly once: the id is the idempotency key. Replays return EXISTS with the original
timestamp and change nothing; a changed field returns the matching EXISTS_WITH_DIFFERENT_*;
duplicates in one batch and concurrent duplicates from many clients apply once."""
from __future__ import annotations

import asyncio
import uuid

import grpc
import pytest

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from harness import account, transfer

T_LINKED = pb.TRANSFER_FLAGS_LINKED
A_LINKED = pb.ACCOUNT_FLAGS_LINKED
DMNEC = pb.ACCOUNT_FLAGS_DEBITS_MUST_NOT_EXCEED_CREDITS
CLOSED = pb.ACCOUNT_FLAGS_CLOSED


def tnames(response) -> list[str]:
    return [pb.TransferResult.Name(r.result).removeprefix("TRANSFER_RESULT_")
            for r in response.results]


def anames(response) -> list[str]:
    return [pb.AccountResult.Name(r.result).removeprefix("ACCOUNT_RESULT_")
            for r in response.results]


def mod(message, **changes):
    copy = type(message)()
    copy.CopyFrom(message)
    for field, value in changes.items():
        setattr(copy, field, value)
    return copy


async def create_transfers(stub, *transfers):
    return await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=list(transfers)))


async def create_accounts(stub, *accounts):
    return await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=list(accounts)))


async def state(stub, db, account_ids) -> tuple:
    """Everything a replay must leave unchanged."""
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=list(account_ids)))
    rows = await db.fetch(
        'SELECT id, amount, "timestamp", seq_shard, seq FROM transfers ORDER BY "timestamp"')
    return list(found.accounts), [tuple(r) for r in rows]


@pytest.fixture
async def ledger(stub):
    """Accounts a, b, c of ledger 1, x and y of ledger 2, and a guarded account g (credited 10)."""
    accounts = {name: account(ledger=2 if name in "xy" else 1,
                              flags=DMNEC if name == "g" else 0)
                for name in ("a", "b", "c", "x", "y", "g")}
    response = await create_accounts(stub, *accounts.values())
    assert anames(response) == ["OK"] * len(accounts)
    ids = {name: acc.id for name, acc in accounts.items()}
    response = await create_transfers(stub, transfer(ids["a"], ids["g"], 10))
    assert tnames(response) == ["OK"]
    ids["accounts"] = accounts
    return ids


# -- replays ---------------------------------------------------------------------------------

async def test_identical_replay_returns_exists_with_the_original_timestamp(stub, db, ledger):
    a, b = ledger["a"], ledger["b"]
    t = transfer(a, b, 25, user_data=b"invoice-1", code=3)
    first = await create_transfers(stub, t)
    assert tnames(first) == ["OK"]
    before = await state(stub, db, [a, b])
    for _ in range(3):
        again = await create_transfers(stub, mod(t))
        assert tnames(again) == ["EXISTS"]
        assert again.results[0].timestamp == first.results[0].timestamp
    assert await state(stub, db, [a, b]) == before
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[t.id]))
    assert list(found.transfers) == [mod(t, timestamp=first.results[0].timestamp)]


async def test_replay_after_other_transfers_still_exists(stub, db, ledger):
    a, b, c = ledger["a"], ledger["b"], ledger["c"]
    t = transfer(a, b, 5)
    first = await create_transfers(stub, t)
    await create_transfers(stub, *[transfer(b, c, 1) for _ in range(20)])
    before = await state(stub, db, [a, b, c])
    again = await create_transfers(stub, transfer(c, a, 1), mod(t), transfer(c, a, 1))
    assert tnames(again) == ["OK", "EXISTS", "OK"]
    assert again.results[1].timestamp == first.results[0].timestamp
    accounts, rows = await state(stub, db, [a, b, c])
    assert len(rows) == len(before[1]) + 2
    assert accounts[0].debits_posted == before[0][0].debits_posted
    assert accounts[0].credits_posted == before[0][0].credits_posted + 2


async def test_replay_whose_limit_no_longer_allows_it_is_still_exists(stub, db, ledger):
    """Idempotency precedes balance checks: g's 10 are spent by t, the replay is EXISTS."""
    g, b = ledger["g"], ledger["b"]
    t = transfer(g, b, 10)
    first = await create_transfers(stub, t)
    assert tnames(first) == ["OK"]
    assert tnames(await create_transfers(stub, transfer(g, b, 1))) == ["EXCEEDS_CREDITS"]
    before = await state(stub, db, [g, b])
    again = await create_transfers(stub, mod(t))
    assert tnames(again) == ["EXISTS"]
    assert again.results[0].timestamp == first.results[0].timestamp
    assert await state(stub, db, [g, b]) == before


# Each changed field of a committed transfer. pending_id, timeout_seconds and ledger cannot
# differ from a transfer this version stored without failing validation first (pending_id and
# timeout must be zero, the ledger must be the accounts' one): those rules win, as documented.
CHANGED_FIELDS = [
    ("debit_account_id", lambda ids: ids["c"], "EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID"),
    ("credit_account_id", lambda ids: ids["c"], "EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID"),
    ("amount", lambda ids: 26, "EXISTS_WITH_DIFFERENT_AMOUNT"),
    ("amount", lambda ids: 2**64 - 1, "EXISTS_WITH_DIFFERENT_AMOUNT"),
    ("user_data", lambda ids: b"invoice-2", "EXISTS_WITH_DIFFERENT_USER_DATA"),
    ("user_data", lambda ids: b"", "EXISTS_WITH_DIFFERENT_USER_DATA"),
    ("code", lambda ids: 4, "EXISTS_WITH_DIFFERENT_CODE"),
    ("flags", lambda ids: pb.TRANSFER_FLAGS_LINKED, None),  # see test below
    ("pending_id", lambda ids: new_id(), "PENDING_ID_MUST_BE_ZERO"),
    ("timeout_seconds", lambda ids: 30, "TIMEOUT_RESERVED_FOR_PENDING_TRANSFER"),
    ("ledger", lambda ids: 2, "TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS"),
    ("debit_account_id", lambda ids: ids["x"], "ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER"),
    ("amount", lambda ids: 0, "AMOUNT_MUST_NOT_BE_ZERO"),
]


@pytest.mark.parametrize("field,value,expected", [c for c in CHANGED_FIELDS if c[2]],
                         ids=[f"{c[0]}->{c[2]}" for c in CHANGED_FIELDS if c[2]])
async def test_changed_field(stub, db, ledger, field, value, expected):
    a, b = ledger["a"], ledger["b"]
    t = transfer(a, b, 25, user_data=b"invoice-1", code=3)
    first = await create_transfers(stub, t)
    assert tnames(first) == ["OK"]
    before = await state(stub, db, [a, b, ledger["c"]])
    response = await create_transfers(stub, mod(t, **{field: value(ledger)}))
    assert tnames(response) == [expected]
    assert response.results[0].timestamp == 0
    assert await state(stub, db, [a, b, ledger["c"]]) == before
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[t.id]))
    assert list(found.transfers) == [mod(t, timestamp=first.results[0].timestamp)]
    # The original is still there, unchanged, and an identical replay still says so.
    again = await create_transfers(stub, mod(t))
    assert tnames(again) == ["EXISTS"] and again.results[0].timestamp == first.results[0].timestamp


async def test_changed_ledger_and_accounts_reports_the_first_difference(stub, db, ledger):
    t = transfer(ledger["a"], ledger["b"], 25)
    assert tnames(await create_transfers(stub, t)) == ["OK"]
    moved = mod(t, debit_account_id=ledger["x"], credit_account_id=ledger["y"], ledger=2)
    assert tnames(await create_transfers(stub, moved)) == ["EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID"]


async def test_changed_flags(stub, db, ledger):
    a, b = ledger["a"], ledger["b"]
    t1, t2 = transfer(a, b, 1, flags=T_LINKED), transfer(a, b, 2)
    assert tnames(await create_transfers(stub, t1, t2)) == ["OK", "OK"]
    before = await state(stub, db, [a, b])
    # Dropping LINKED from the first of the chain.
    assert tnames(await create_transfers(stub, mod(t1, flags=0))) == ["EXISTS_WITH_DIFFERENT_FLAGS"]
    # Adding LINKED to the second (and closing the new chain with a new transfer).
    new = transfer(a, b, 3)
    response = await create_transfers(stub, mod(t2, flags=T_LINKED), new)
    assert tnames(response) == ["EXISTS_WITH_DIFFERENT_FLAGS", "LINKED_EVENT_FAILED"]
    assert await state(stub, db, [a, b]) == before
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[new.id]))
    assert list(found.transfers) == []


# -- the same id twice in one batch --------------------------------------------------------------

async def test_same_transfer_twice_in_one_batch(stub, db, ledger):
    a, b = ledger["a"], ledger["b"]
    t = transfer(a, b, 7)
    response = await create_transfers(stub, t, mod(t), transfer(a, b, 1), mod(t))
    assert tnames(response) == ["OK", "EXISTS", "OK", "EXISTS"]
    stamps = [r.timestamp for r in response.results]
    assert stamps[1] == stamps[3] == stamps[0] > 0
    assert await db.fetchval("SELECT count(*) FROM transfers WHERE amount = 7") == 1
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[a]))
    assert found.accounts[0].debits_posted == 10 + 7 + 1


async def test_same_id_with_a_changed_field_in_one_batch(stub, db, ledger):
    a, b = ledger["a"], ledger["b"]
    t = transfer(a, b, 7)
    response = await create_transfers(stub, t, mod(t, amount=8), mod(t, code=9))
    assert tnames(response) == ["OK", "EXISTS_WITH_DIFFERENT_AMOUNT", "EXISTS_WITH_DIFFERENT_CODE"]
    assert [r.timestamp for r in response.results][1:] == [0, 0]
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[t.id]))
    assert found.transfers[0].amount == 7 and found.transfers[0].code == t.code


async def test_after_a_failed_first_the_second_is_evaluated_fresh(stub, db, ledger):
    b, g = ledger["b"], ledger["g"]
    tid = new_id()
    response = await create_transfers(
        stub,
        transfer(g, b, 11, id=tid),           # exceeds g's 10
        transfer(g, b, 10, id=tid),           # a different amount: evaluated as new, fits
        transfer(g, b, 10, id=tid),           # now a replay of the second
    )
    assert tnames(response) == ["EXCEEDS_CREDITS", "OK", "EXISTS"]
    assert response.results[2].timestamp == response.results[1].timestamp
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[tid]))
    assert found.transfers[0].amount == 10
    assert await db.fetchval("SELECT count(*) FROM transfers WHERE id = $1::uuid",
                             uuid.UUID(bytes=tid)) == 1


async def test_after_a_failed_chain_the_same_id_is_evaluated_fresh(stub, db, ledger):
    a, b = ledger["a"], ledger["b"]
    t = transfer(a, b, 4, flags=T_LINKED)
    response = await create_transfers(
        stub, t, transfer(a, a, 1),                    # chain fails: t is not applied
        mod(t, flags=0),                               # the same id, not linked: new
        mod(t, flags=0))                               # and its replay
    assert tnames(response) == ["LINKED_EVENT_FAILED", "ACCOUNTS_MUST_BE_DIFFERENT", "OK", "EXISTS"]
    assert response.results[3].timestamp == response.results[2].timestamp
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[t.id]))
    assert found.transfers[0].flags == 0


async def test_invalid_first_then_valid_same_id(stub, ledger):
    a, b = ledger["a"], ledger["b"]
    tid = new_id()
    response = await create_transfers(stub, transfer(a, new_id(), 3, id=tid), transfer(a, b, 3, id=tid))
    assert tnames(response) == ["CREDIT_ACCOUNT_NOT_FOUND", "OK"]


async def test_duplicate_in_the_same_chain(stub, ledger):
    a, b = ledger["a"], ledger["b"]
    t = transfer(a, b, 2, flags=T_LINKED)
    response = await create_transfers(stub, t, mod(t), transfer(a, b, 1))
    assert tnames(response) == ["OK", "EXISTS", "OK"]
    assert response.results[1].timestamp == response.results[0].timestamp


# -- concurrency ---------------------------------------------------------------------------------

CLIENTS = 20


async def _all_at_once(address: str, make_call) -> list:
    channels = [grpc.aio.insecure_channel(address) for _ in range(CLIENTS)]
    try:
        stubs = [ledger_pb2_grpc.LedgerServiceStub(c) for c in channels]
        await asyncio.gather(*(c.channel_ready() for c in channels))
        start = asyncio.Event()

        async def one(stub):
            await start.wait()
            return await make_call(stub)

        tasks = [asyncio.create_task(one(s)) for s in stubs]
        await asyncio.sleep(0)
        start.set()
        return await asyncio.wait_for(asyncio.gather(*tasks), 60)
    finally:
        for c in channels:
            await c.close()


@pytest.mark.parametrize("round", range(3))
async def test_same_new_transfer_from_20_clients_at_once(engine_app, stub, db, ledger, round):
    a, b = ledger["a"], ledger["b"]
    t = transfer(a, b, 1_000 + round)
    responses = await _all_at_once(
        engine_app.address,
        lambda s: s.CreateTransfers(pb.CreateTransfersRequest(transfers=[mod(t)])))
    names = [tnames(r)[0] for r in responses]
    assert sorted(names) == ["EXISTS"] * (CLIENTS - 1) + ["OK"], names
    assert len({r.results[0].timestamp for r in responses}) == 1
    assert await db.fetchval("SELECT count(*) FROM transfers WHERE amount = $1", t.amount) == 1
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[a, b]))
    assert found.accounts[0].debits_posted == 10 + t.amount
    assert found.accounts[1].credits_posted == t.amount


async def test_same_batch_from_20_clients_at_once(engine_app, stub, db, ledger):
    """Batches of 50 transfers (some in chains), identical in every client."""
    a, b, c = ledger["a"], ledger["b"], ledger["c"]
    batch = []
    for i in range(50):
        flags = T_LINKED if i % 5 in (1, 2) else 0
        batch.append(transfer([a, b, c][i % 3], [b, c, a][i % 3], 1 + i, flags=flags))
    responses = await _all_at_once(
        engine_app.address,
        lambda s: s.CreateTransfers(pb.CreateTransfersRequest(transfers=[mod(t) for t in batch])))
    for i in range(len(batch)):
        names = sorted(pb.TransferResult.Name(r.results[i].result) for r in responses)
        assert names == ["TRANSFER_RESULT_EXISTS"] * (CLIENTS - 1) + ["TRANSFER_RESULT_OK"], i
        assert len({r.results[i].timestamp for r in responses}) == 1
    assert await db.fetchval("SELECT count(*) FROM transfers") == 1 + len(batch)
    total = await db.fetchval("SELECT sum(debits_posted) FROM accounts")
    assert total == 10 + sum(t.amount for t in batch)


async def test_same_new_account_from_20_clients_at_once(engine_app, stub, db):
    acc = account(user_data=b"racy")
    responses = await _all_at_once(
        engine_app.address,
        lambda s: s.CreateAccounts(pb.CreateAccountsRequest(accounts=[mod(acc)])))
    names = sorted(anames(r)[0] for r in responses)
    assert names == ["EXISTS"] * (CLIENTS - 1) + ["OK"]
    assert len({r.results[0].timestamp for r in responses}) == 1
    assert await db.fetchval("SELECT count(*) FROM accounts") == 1


# -- accounts ------------------------------------------------------------------------------------

async def test_account_replay(stub, db):
    acc = account(ledger=7, code=70, flags=DMNEC, user_data=b"acc")
    first = await create_accounts(stub, acc)
    assert anames(first) == ["OK"]
    again = await create_accounts(stub, mod(acc))
    assert anames(again) == ["EXISTS"]
    assert again.results[0].timestamp == first.results[0].timestamp
    assert await db.fetchval("SELECT count(*) FROM accounts") == 1


@pytest.mark.parametrize("field,value,expected", [
    ("flags", CLOSED, "EXISTS_WITH_DIFFERENT_FLAGS"),
    ("flags", 0, "EXISTS_WITH_DIFFERENT_FLAGS"),
    ("user_data", b"other", "EXISTS_WITH_DIFFERENT_USER_DATA"),
    ("user_data", b"", "EXISTS_WITH_DIFFERENT_USER_DATA"),
    ("ledger", 8, "EXISTS_WITH_DIFFERENT_LEDGER"),
    ("code", 71, "EXISTS_WITH_DIFFERENT_CODE"),
])
async def test_account_changed_field(stub, db, field, value, expected):
    acc = account(ledger=7, code=70, flags=DMNEC, user_data=b"acc")
    first = await create_accounts(stub, acc)
    before = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[acc.id]))
    response = await create_accounts(stub, mod(acc, **{field: value}))
    assert anames(response) == [expected]
    assert response.results[0].timestamp == 0
    after = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[acc.id]))
    assert after.accounts == before.accounts
    assert after.accounts[0].timestamp == first.results[0].timestamp


async def test_account_with_balances_keeps_them_on_replay(stub, db, ledger):
    acc = ledger["accounts"]["g"]
    before = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[acc.id]))
    assert before.accounts[0].credits_posted == 10
    response = await create_accounts(stub, mod(acc))
    assert anames(response) == ["EXISTS"]
    assert response.results[0].timestamp == before.accounts[0].timestamp
    after = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[acc.id]))
    assert after.accounts == before.accounts


async def test_same_account_twice_in_one_batch(stub, db):
    acc = account()
    response = await create_accounts(stub, acc, mod(acc), mod(acc, code=5))
    assert anames(response) == ["OK", "EXISTS", "EXISTS_WITH_DIFFERENT_CODE"]
    assert response.results[1].timestamp == response.results[0].timestamp > 0
    assert await db.fetchval("SELECT count(*) FROM accounts") == 1


async def test_account_after_a_failed_chain_is_evaluated_fresh(stub, db):
    acc = account(flags=A_LINKED)
    response = await create_accounts(stub, acc, account(ledger=0), mod(acc, flags=0))
    assert anames(response) == ["LINKED_EVENT_FAILED", "LEDGER_MUST_NOT_BE_ZERO", "OK"]
    found = await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[acc.id]))
    assert found.accounts[0].flags == 0


async def test_replay_of_a_committed_account_chain(stub, db):
    chain = [account(flags=A_LINKED), account(flags=A_LINKED), account()]
    first = await create_accounts(stub, *chain)
    assert anames(first) == ["OK"] * 3
    again = await create_accounts(stub, *[mod(a) for a in chain])
    assert anames(again) == ["EXISTS"] * 3
    assert [r.timestamp for r in again.results] == [r.timestamp for r in first.results]
    # A chain mixing existing and new accounts commits the new ones.
    new = account(flags=A_LINKED)
    response = await create_accounts(stub, new, mod(chain[2]))
    assert anames(response) == ["OK", "EXISTS"]
    assert await db.fetchval("SELECT count(*) FROM accounts") == 4


# -- linked chains -------------------------------------------------------------------------------

async def test_replay_of_a_committed_chain(stub, db, ledger):
    a, b, c = ledger["a"], ledger["b"], ledger["c"]
    chain = [transfer(a, b, 3, flags=T_LINKED), transfer(b, c, 2, flags=T_LINKED),
             transfer(c, a, 1)]
    first = await create_transfers(stub, *chain)
    assert tnames(first) == ["OK"] * 3
    before = await state(stub, db, [a, b, c])
    again = await create_transfers(stub, *[mod(t) for t in chain])
    assert tnames(again) == ["EXISTS"] * 3
    assert [r.timestamp for r in again.results] == [r.timestamp for r in first.results]
    assert await state(stub, db, [a, b, c]) == before


async def test_chain_mixing_existing_and_new_transfers(stub, db, ledger):
    a, b, c = ledger["a"], ledger["b"], ledger["c"]
    t1, t2 = transfer(a, b, 3, flags=T_LINKED), transfer(b, c, 2)
    first = await create_transfers(stub, t1, t2)
    new = transfer(c, a, 1, flags=T_LINKED)
    response = await create_transfers(stub, mod(t1), new, mod(t2))
    assert tnames(response) == ["EXISTS", "OK", "EXISTS"]
    assert response.results[0].timestamp == first.results[0].timestamp
    assert response.results[2].timestamp == first.results[1].timestamp
    # An existing item in a chain that fails is reported LINKED_EVENT_FAILED, and nothing of
    # the chain applies.
    before = await state(stub, db, [a, b, c])
    bad = transfer(c, c, 1)
    response = await create_transfers(stub, mod(t1), mod(new, id=new_id()), bad)
    assert tnames(response) == ["LINKED_EVENT_FAILED", "LINKED_EVENT_FAILED",
                                "ACCOUNTS_MUST_BE_DIFFERENT"]
    assert [r.timestamp for r in response.results] == [0, 0, 0]
    assert await state(stub, db, [a, b, c]) == before


async def test_replay_of_a_failed_chain_applies_it_once_it_can(stub, db, ledger):
    """A chain that failed left nothing behind: resubmitting it after funding applies it."""
    g, b = ledger["g"], ledger["b"]
    chain = [transfer(g, b, 6, flags=T_LINKED), transfer(g, b, 6)]
    assert tnames(await create_transfers(stub, *chain)) == ["LINKED_EVENT_FAILED", "EXCEEDS_CREDITS"]
    assert tnames(await create_transfers(stub, transfer(ledger["a"], g, 2))) == ["OK"]
    first = await create_transfers(stub, *[mod(t) for t in chain])
    assert tnames(first) == ["OK", "OK"]
    again = await create_transfers(stub, *[mod(t) for t in chain])
    assert tnames(again) == ["EXISTS", "EXISTS"]
    assert [r.timestamp for r in again.results] == [r.timestamp for r in first.results]
