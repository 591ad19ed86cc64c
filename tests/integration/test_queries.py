"""GetAccountTransfers and GetAccountBalances through the real server: every filter alone and
combined against a plain-Python selection of the stored transfers, paging by timestamp in both
directions without gaps or repeats, balance history after each change, and the query plan of
GetAccountTransfers on a table of ~200,000 transfers (printed; asserted to use the
account indexes, never a sequential scan).
"""
from __future__ import annotations

import dataclasses
import random
import types
import uuid

import pytest

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.ids import new_id
from engine.server.servicer import decode_filter
from engine.storage.store import Store
from harness import account, transfer

MAX = 2**63 - 1
BATCH_MAX = 8_190
DEBITS = pb.ACCOUNT_FILTER_FLAGS_DEBITS
CREDITS = pb.ACCOUNT_FILTER_FLAGS_CREDITS
REVERSED = pb.ACCOUNT_FILTER_FLAGS_REVERSED
BOTH = DEBITS | CREDITS
PENDING = pb.TRANSFER_FLAGS_PENDING
POST = pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER
VOID = pb.TRANSFER_FLAGS_VOID_PENDING_TRANSFER
BAL_DR = pb.TRANSFER_FLAGS_BALANCING_DEBIT
HISTORY = pb.ACCOUNT_FLAGS_HISTORY
USER_DATA = (b"", b"x", b"y", b"x", b"zz")


async def open_accounts(stub, *flags: int) -> list[bytes]:
    accounts = [account(flags=f) for f in flags]
    response = await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=accounts))
    assert [r.result for r in response.results] == [pb.ACCOUNT_RESULT_OK] * len(accounts)
    return [a.id for a in accounts]


async def commit(stub, transfers: list[pb.Transfer]) -> list[pb.Transfer]:
    """Commit every transfer; the stored versions (timestamps, a post's accounts)."""
    response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers))
    assert [r.result for r in response.results] == [pb.TRANSFER_RESULT_OK] * len(transfers)
    found = await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[t.id for t in transfers]))
    assert [t.timestamp for t in found.transfers] == [r.timestamp for r in response.results]
    return list(found.transfers)


async def account_transfers(stub, account_id: bytes, **fields) -> list[pb.Transfer]:
    values = {"limit": BATCH_MAX, "flags": BOTH, **fields}
    response = await stub.GetAccountTransfers(pb.GetAccountTransfersRequest(
        filter=pb.AccountFilter(account_id=account_id, **values)))
    return list(response.transfers)


async def account_balances(stub, account_id: bytes, **fields) -> list[tuple]:
    values = {"limit": BATCH_MAX, "flags": BOTH, **fields}
    response = await stub.GetAccountBalances(pb.GetAccountBalancesRequest(
        filter=pb.AccountFilter(account_id=account_id, **values)))
    return [(b.timestamp, b.debits_pending, b.debits_posted, b.credits_pending, b.credits_posted)
            for b in response.balances]


def select(transfers: list[pb.Transfer], account_id: bytes, *, flags: int = BOTH,
           timestamp_min: int = 0, timestamp_max: int = 0, code: int = 0,
           user_data: bytes = b"", limit: int = BATCH_MAX) -> list[pb.Transfer]:
    """What the filter means, written from the contract."""
    out = [t for t in transfers
           if ((flags & DEBITS and t.debit_account_id == account_id)
               or (flags & CREDITS and t.credit_account_id == account_id))
           and timestamp_min <= t.timestamp <= (timestamp_max or MAX)
           and (not code or t.code == code) and (not user_data or t.user_data == user_data)]
    out.sort(key=lambda t: t.timestamp, reverse=bool(flags & REVERSED))
    return out[:limit]


@dataclasses.dataclass
class Dataset:
    a: bytes  # HISTORY; 50 transfers (48 plain, a pending and its post)
    b: bytes
    c: bytes
    transfers: list[pb.Transfer]  # every stored transfer, in commit order

    def of_a(self) -> list[pb.Transfer]:
        return select(self.transfers, self.a)


@pytest.fixture
async def dataset(stub) -> Dataset:
    a, b, c = await open_accounts(stub, HISTORY, 0, 0)
    plain = []
    for k in range(48):
        debit, credit = ((a, b), (b, a), (a, c))[k % 3]
        plain.append(transfer(debit, credit, 10 + k, code=1 + k % 4, user_data=USER_DATA[k % 5]))
    others = [transfer(b, c, 1 + k, code=1 + k % 4, user_data=USER_DATA[k % 5]) for k in range(12)]
    stored: list[pb.Transfer] = []
    for start in range(0, 48, 12):  # four requests, each mixed with transfers not of `a`
        batch = plain[start:start + 12]
        batch[3:3] = others[start // 4:start // 4 + 3]
        stored += await commit(stub, batch)
    hold = transfer(a, c, 500, code=2, flags=PENDING, user_data=b"x")
    stored += await commit(stub, [hold])
    stored += await commit(stub, [pb.Transfer(id=new_id(), pending_id=hold.id, amount=200,
                                              flags=POST, user_data=b"y")])
    data = Dataset(a, b, c, stored)
    assert len(data.of_a()) == 50
    return data


# -- GetAccountTransfers ------------------------------------------------------------------------

async def test_each_filter_alone(stub, dataset: Dataset):
    d = dataset
    everything = d.of_a()
    mid = everything[20].timestamp
    filters = [
        {},
        {"flags": DEBITS}, {"flags": CREDITS}, {"flags": BOTH | REVERSED},
        {"timestamp_min": mid}, {"timestamp_max": mid},
        {"timestamp_min": everything[10].timestamp, "timestamp_max": everything[30].timestamp},
        {"timestamp_min": mid, "timestamp_max": mid},
        {"timestamp_min": everything[-1].timestamp + 1},
        {"code": 2}, {"code": 99},
        {"user_data": b"x"}, {"user_data": b"zz"}, {"user_data": b"never"},
        {"limit": 1}, {"limit": 7}, {"limit": 50}, {"limit": 51},
    ]
    for f in filters:
        got = await account_transfers(stub, d.a, **f)
        assert got == select(d.transfers, d.a, **f), f
    # A sanity check of the selection itself: each side and each flag split the whole.
    debits = await account_transfers(stub, d.a, flags=DEBITS)
    credits = await account_transfers(stub, d.a, flags=CREDITS)
    assert all(t.debit_account_id == d.a for t in debits)
    assert all(t.credit_account_id == d.a for t in credits)
    assert len(debits) + len(credits) == 50 and len(credits) == 16
    assert [t.flags for t in debits[-2:]] == [PENDING, POST]  # a post is stored with its accounts
    assert await account_transfers(stub, new_id()) == []


async def test_filters_combined(stub, dataset: Dataset):
    d = dataset
    everything = d.of_a()
    stamps = [t.timestamp for t in everything]
    rng = random.Random(3)
    combined = [
        {"flags": DEBITS | REVERSED, "code": 3},
        {"flags": CREDITS, "user_data": b"x", "limit": 2},
        {"flags": DEBITS, "code": 2, "user_data": b"x"},
        {"flags": BOTH | REVERSED, "timestamp_min": stamps[5], "timestamp_max": stamps[40],
         "code": 1, "limit": 3},
    ]
    for _ in range(30):
        f: dict = {"flags": rng.choice([DEBITS, CREDITS, BOTH]) | rng.choice([0, REVERSED])}
        if rng.random() < 0.5:
            f["timestamp_min"] = rng.choice(stamps) + rng.choice([-1, 0, 1])
        if rng.random() < 0.5:
            f["timestamp_max"] = rng.choice(stamps) + rng.choice([-1, 0, 1])
            f["timestamp_min"] = min(f.get("timestamp_min", 0), f["timestamp_max"])
        if rng.random() < 0.5:
            f["code"] = rng.randint(1, 4)
        if rng.random() < 0.5:
            f["user_data"] = rng.choice(USER_DATA[1:])
        f["limit"] = rng.choice([1, 3, 7, BATCH_MAX])
        combined.append(f)
    for f in combined:
        got = await account_transfers(stub, d.a, **f)
        assert got == select(d.transfers, d.a, **f), f


async def _pages(stub, account_id: bytes, limit: int, reversed_: bool, flags: int = BOTH,
                 **fields) -> list[list]:
    """Page by timestamp: the next page starts just after (before) the last one seen."""
    flags |= REVERSED if reversed_ else 0
    pages: list[list[pb.Transfer]] = []
    bound: dict = {}
    while True:
        page = await account_transfers(stub, account_id, limit=limit, flags=flags, **fields, **bound)
        pages.append(page)
        if len(page) < limit:
            return pages
        last = page[-1].timestamp
        bound = {"timestamp_max": last - 1} if reversed_ else {"timestamp_min": last + 1}


@pytest.mark.parametrize("reversed_", [False, True], ids=["forward", "reversed"])
async def test_paging_by_timestamp_has_no_gaps_or_repeats(stub, dataset: Dataset, reversed_):
    d = dataset
    pages = await _pages(stub, d.a, 7, reversed_)
    seen = [t for page in pages for t in page]
    assert [len(p) for p in pages] == [7] * 7 + [1]
    expected = d.of_a()[::-1] if reversed_ else d.of_a()
    assert [t.id for t in seen] == [t.id for t in expected]
    assert len({t.id for t in seen}) == 50
    # The same with a filter that leaves fewer than a page at the end.
    pages = await _pages(stub, d.a, 7, reversed_, flags=DEBITS, code=1)
    expected = select(d.transfers, d.a, flags=DEBITS | (REVERSED if reversed_ else 0), code=1)
    assert [t.id for page in pages for t in page] == [t.id for t in expected]


# -- GetAccountBalances -------------------------------------------------------------------------

async def test_balances_match_the_account_after_each_change(stub):
    """One balance row per transfer that touches a HISTORY account, at the transfer's timestamp,
    equal to the account's balances right after it (pending, post, void, balancing, a batch)."""
    a, b, c = await open_accounts(stub, HISTORY, 0, HISTORY)
    hold, hold2 = transfer(b, a, 70, flags=PENDING), transfer(a, c, 30, flags=PENDING)
    steps = [
        [transfer(b, a, 1_000)],
        [hold, hold2],
        [pb.Transfer(id=new_id(), pending_id=hold.id, amount=50, flags=POST)],
        [pb.Transfer(id=new_id(), pending_id=hold2.id, flags=VOID)],
        [transfer(a, c, 100), transfer(b, c, 5), transfer(c, a, 40)],
        [transfer(a, b, MAX, flags=BAL_DR)],
    ]
    expected_rows: list[tuple] = []
    for step in steps:
        stored = await commit(stub, step)
        expected_rows += [t.timestamp for t in stored if a in (t.debit_account_id,
                                                                t.credit_account_id)]
        got = await account_balances(stub, a)
        assert [row[0] for row in got] == expected_rows
        acc = (await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[a]))).accounts[0]
        assert got[-1][1:] == (acc.debits_pending, acc.debits_posted, acc.credits_pending,
                               acc.credits_posted)
    rows = await account_balances(stub, a)
    assert [row[1:] for row in rows] == [
        (0, 0, 0, 1_000), (0, 0, 70, 1_000), (30, 0, 70, 1_000), (30, 0, 0, 1_050),
        (0, 0, 0, 1_050), (0, 100, 0, 1_050), (0, 100, 0, 1_090), (0, 1_090, 0, 1_090)]
    # c is HISTORY too: its rows are its own balances; b (no HISTORY) has none.
    assert [row[1:] for row in await account_balances(stub, c)] == [
        (0, 0, 30, 0), (0, 0, 0, 0), (0, 0, 0, 100), (0, 0, 0, 105), (0, 40, 0, 105)]
    assert await account_balances(stub, b) == []


async def test_balances_page_by_timestamp(stub):
    a, b = await open_accounts(stub, HISTORY, 0)
    stored = await commit(stub, [transfer(b, a, 1 + k) for k in range(20)])
    rows = await account_balances(stub, a)
    assert [r[0] for r in rows] == [t.timestamp for t in stored]
    assert [r[4] for r in rows] == [sum(range(1, k + 2)) for k in range(20)]
    for reversed_ in (False, True):
        seen, bound = [], {}
        while True:
            page = await account_balances(stub, a, limit=3, flags=BOTH | (REVERSED if reversed_ else 0),
                                          **bound)
            seen += page
            if len(page) < 3:
                break
            bound = ({"timestamp_max": page[-1][0] - 1} if reversed_
                     else {"timestamp_min": page[-1][0] + 1})
        assert seen == (rows[::-1] if reversed_ else rows)
    mid = rows[10][0]
    assert await account_balances(stub, a, timestamp_min=mid, timestamp_max=mid) == [rows[10]]
    assert await account_balances(stub, a, timestamp_max=mid, limit=2) == rows[:2]
    assert await account_balances(stub, a, timestamp_max=mid, limit=2,
                                  flags=BOTH | REVERSED) == [rows[10], rows[9]]
    # code and user_data do not apply to balances (documented).
    assert await account_balances(stub, a, code=99, user_data=b"nothing") == rows


async def test_account_without_history_has_no_balances(stub):
    plain, other = await open_accounts(stub, 0, 0)
    await commit(stub, [transfer(plain, other, 5), transfer(other, plain, 3),
                        transfer(plain, other, 2, flags=PENDING)])
    assert await account_balances(stub, plain) == []
    assert await account_balances(stub, other) == []
    assert await account_balances(stub, new_id()) == []
    assert len(await account_transfers(stub, plain)) == 3


# -- the query plan at ~200,000 transfers ---------------------------------------------------------

class _CaptureQuery:
    """Stands in for the store's pool: records the SQL and arguments of a query."""

    async def fetch(self, sql, *args):
        self.sql, self.args = sql, args
        return []


async def _server_query(request_filter: pb.AccountFilter) -> tuple[str, tuple]:
    """The exact SQL and arguments the server runs for a GetAccountTransfers filter."""
    capture = _CaptureQuery()
    await Store.account_transfers(types.SimpleNamespace(_pool=capture), decode_filter(request_filter))
    return capture.sql, capture.args


def _literal(value) -> str:
    """An SQL literal of a query argument: an id (uuid), an integer or bytes (bytea)."""
    if isinstance(value, bytes):
        return f"'{uuid.UUID(bytes=value)}'::uuid" if len(value) == 16 else f"'\\x{value.hex()}'::bytea"
    assert isinstance(value, int)
    return str(value)


def _indexes_used(plan: str, ordered: bool) -> set[str]:
    """Index names through which the plan reads `transfers`; fails on any other access path
    (a sequential scan, or a bitmap scan where `ordered` index scans are required)."""
    assert "Seq Scan" not in plan, plan
    used: set[str] = set()
    for line in plan.splitlines():
        words = line.replace("->", " ").split()
        if "Scan" not in words:
            continue
        kind = " ".join(words[:words.index("Scan") + 1])
        if kind in ("Index Scan", "Index Only Scan"):
            assert words[words.index("using") + 2] == "on", line
            assert words[words.index("using") + 3].startswith("transfers"), line
            used.add(words[words.index("using") + 1])
        elif kind == "Bitmap Index Scan" and not ordered:
            used.add(words[words.index("on") + 1])
        elif kind == "Bitmap Heap Scan" and not ordered:
            continue
        else:
            raise AssertionError(f"unexpected access path: {line}\n{plan}")
    assert used, plan
    return used


async def _child_indexes(db, parent: str) -> set[str]:
    rows = await db.fetch(
        """SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
           WHERE i.inhparent = $1::regclass""", parent)
    return {r["relname"] for r in rows} | {parent}


async def test_account_transfers_plan_uses_the_account_indexes(stub, db, capsys):
    """~200,000 transfers between 1,000 accounts (25 full batches through the engine), then the
    plans of the server's GetAccountTransfers query for several filters: every scan of
    `transfers` is an index scan on a partition of transfers_debit_account /
    transfers_credit_account, never a sequential scan; with the custom plan of the first
    executions (EXPLAIN ANALYZE with the arguments) and with the generic plan a long-lived
    prepared statement may switch to (PREPARE, force_generic_plan, EXPLAIN EXECUTE). Plans are
    printed; timings are not asserted."""
    await db.set_type_codec("uuid", schema="pg_catalog", encoder=bytes, decoder=bytes,
                            format="binary")
    ids = await open_accounts(stub, *[0] * 1_000)
    rng = random.Random(11)
    for _ in range(25):
        batch = []
        for _ in range(BATCH_MAX):
            debit, credit = rng.sample(ids, 2)
            batch.append(transfer(debit, credit, rng.randint(1, 1_000), code=rng.randint(1, 5)))
        response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=batch))
        assert all(r.result == pb.TRANSFER_RESULT_OK for r in response.results)
    total = await db.fetchval("SELECT count(*) FROM transfers")
    assert total == 25 * BATCH_MAX
    await db.execute("ANALYZE transfers")
    debit_indexes = await _child_indexes(db, "transfers_debit_account")
    credit_indexes = await _child_indexes(db, "transfers_credit_account")

    target = ids[0]
    stamps = [t.timestamp for t in await account_transfers(stub, target)]
    assert len(stamps) > 100
    # (filter, whether the plan must be ordered index scans that can stop at the limit)
    filters = {
        "debits and credits, limit 100": (dict(flags=BOTH, limit=100), True),
        "debits only, reversed": (dict(flags=DEBITS | REVERSED, limit=50), True),
        "credits only, a timestamp page": (dict(flags=CREDITS, limit=20,
                                                timestamp_min=stamps[len(stamps) // 2]), True),
        # code and user_data are not in the index: the planner may read the account's rows
        # through a bitmap of the same index instead.
        "code and user_data, limit 8190": (dict(flags=BOTH, limit=BATCH_MAX, code=3,
                                                user_data=b"x"), False),
    }
    report = [f"transfers: {total}; account {target.hex()} has {len(stamps)} of them"]
    for label, (fields, ordered) in filters.items():
        sql, args = await _server_query(pb.AccountFilter(account_id=target, **fields))
        report.append(f"=== {label}: {sql.strip()}")
        custom = await db.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *args)
        # The generic plan: what a prepared statement runs once Postgres stops re-planning it
        # for each set of arguments (arguments bound to EXPLAIN itself would be folded in).
        await db.execute(f"PREPARE account_transfers AS {sql}")
        await db.execute("SET plan_cache_mode = force_generic_plan")
        generic = await db.fetch(
            f"EXPLAIN EXECUTE account_transfers({', '.join(map(_literal, args))})")
        await db.execute("RESET plan_cache_mode")
        await db.execute("DEALLOCATE account_transfers")
        for mode, plan_rows in (("custom plan, executed", custom), ("generic plan", generic)):
            plan = "\n".join(r[0] for r in plan_rows)
            report.append(f"--- {label} ({mode}) ---\n{plan}")
            used = _indexes_used(plan, ordered)
            assert used <= debit_indexes | credit_indexes, plan
            assert bool(used & debit_indexes) == bool(fields["flags"] & DEBITS), plan
            assert bool(used & credit_indexes) == bool(fields["flags"] & CREDITS), plan
    with capsys.disabled():
        print("\n" + "\n".join(report))
