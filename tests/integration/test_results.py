"""Every TransferResult and AccountResult, each reached through the real server, with the
documented precedence wherever two rules apply at once.

The cases form one table. Each case builds a request against a prepared set of accounts and
committed transfers (`Env`), and names the result expected for every item. After the request
the test also checks what the results imply in storage: OK items are stored as sent with the
returned timestamp (a post or void with its pending transfer's accounts, ledger and code and
the amount that moved; a balancing transfer with the amount the case names), nothing else is
stored, every balance moved by exactly the OK items (pending, post, void, balancing) and the
reservations that lapsed, and the state of every pending transfer changed only by the OK posts
and voids of the request (or, where the case moves the engine's clock, by expiry).
`test_table_reaches_every_result` checks that every TransferResult and AccountResult value
except UNSPECIFIED is expected by at least one case.

Most cases share one engine and database (each case gets its own freshly made `Env`, so cases
never see each other's accounts); the cases that move the engine's commit clock
(`PENDING_TRANSFER_EXPIRED`, `OVERFLOWS_TIMEOUT`) get an engine of their own.

Everything is prepared through the API except one row: EXISTS_WITH_DIFFERENT_LEDGER needs a
stored transfer whose ledger differs from the one a replay names while every earlier field is
equal, which the API never stores (a plain transfer's ledger is its accounts' ledger, checked
before idempotency; a post/void with a different non-zero ledger is
PENDING_TRANSFER_HAS_DIFFERENT_LEDGER first). The table reaches it from a row written directly
in Postgres.

`test_random_batches_match_a_model_of_the_documented_rules` finally runs random sequential
single-phase requests against a small Python model of the same rules and compares every
result (two-phase transfers against the full model are tests/integration/test_model.py).
"""
from __future__ import annotations

import dataclasses
import random
import time
import uuid
from collections.abc import Callable

import asyncpg
import grpc
import pytest
import pytest_asyncio

from engine.config import Settings
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from engine.kernels.reference import shard_of_id
from engine.server import app as app_module
from harness import account, transfer

MAX = 2**63 - 1
T_LINKED = pb.TRANSFER_FLAGS_LINKED
PENDING = pb.TRANSFER_FLAGS_PENDING
POST = pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER
VOID = pb.TRANSFER_FLAGS_VOID_PENDING_TRANSFER
BAL_DR = pb.TRANSFER_FLAGS_BALANCING_DEBIT
BAL_CR = pb.TRANSFER_FLAGS_BALANCING_CREDIT
A_LINKED = pb.ACCOUNT_FLAGS_LINKED
DMNEC = pb.ACCOUNT_FLAGS_DEBITS_MUST_NOT_EXCEED_CREDITS
CMNED = pb.ACCOUNT_FLAGS_CREDITS_MUST_NOT_EXCEED_DEBITS
CLOSED = pb.ACCOUNT_FLAGS_CLOSED
UNKNOWN_FLAG = 1 << 6  # no TransferFlags / AccountFlags value uses bit 6
# transfers.pending_status
ST_PENDING, ST_POSTED, ST_VOIDED, ST_EXPIRED = 1, 2, 3, 4
SECOND_NS = 10**9
# OVERFLOWS_TIMEOUT: the clock sits so that a timeout of TIMEOUT_EDGE seconds still fits
# (with a millisecond to spare for the commit timestamps of the batch), one more does not.
TIMEOUT_EDGE = 2**31
TIMEOUT_MAX = 2**32 - 1


def transfer_result_names() -> set[str]:
    return {n.removeprefix("TRANSFER_RESULT_") for n in pb.TransferResult.keys()
            if not n.endswith("_UNSPECIFIED")}


def account_result_names() -> set[str]:
    return {n.removeprefix("ACCOUNT_RESULT_") for n in pb.AccountResult.keys()
            if not n.endswith("_UNSPECIFIED")}


def tname(value: int) -> str:
    return pb.TransferResult.Name(value).removeprefix("TRANSFER_RESULT_")


def aname(value: int) -> str:
    return pb.AccountResult.Name(value).removeprefix("ACCOUNT_RESULT_")


def mod(message, **changes):
    """A copy of a protobuf message with some fields changed."""
    copy = type(message)()
    copy.CopyFrom(message)
    for field, value in changes.items():
        setattr(copy, field, value)
    return copy


async def use_bytes_uuids(db) -> None:
    await db.set_type_codec("uuid", schema="pg_catalog", encoder=bytes, decoder=bytes,
                            format="binary")


# -- the prepared state ------------------------------------------------------------------------

class Env:
    """Accounts and committed transfers every case may use; fresh ids for every case.

    Ledger 1, no flags: a, b, d, f1, f2 (f1/f2 are untouched).   Ledger 2: c2, c2b.
    closed, closed2: ledger 1, created CLOSED.  closing: open while p_closing/p_closing2 were
    reserved on it, then closed with CloseAccounts.
    gdr: DEBITS_MUST_NOT_EXCEED_CREDITS with 100 credited.  gz: the same flag, nothing credited.
    drained: the same flag, credited 100 and debited 100 (by t_drain).
    gres: the same flag, credited 100, all of it reserved by p_gres.
    bal: the same flag, credited 60, swept by the balancing transfer t_bal (stored amount 60).
    gcr: CREDITS_MUST_NOT_EXCEED_DEBITS with 50 debited.
    big_dr / big_cr: debits_posted / credits_posted = MAX - 5 (by t_big).
    pend_dr / pend_cr: debits_pending / credits_pending = MAX - 5 (by the pending p_pend).
    Pending transfers a->b: p_open (50, code 5), p_open2 (50, code 5), p_posted (20, posted all
    by x_post, accounts omitted), p_voided (20, voided by x_void), p_timeout (30, code 7,
    timeout 3600 s), p_tposted / p_tvoided (10, timeout 3600 s, posted by x_tpost / voided by
    x_tvoid).
    Plain transfers: t0 (a->b 7, user_data b"orig"), chain tl (LINKED) + tl2, t_drain, t_big;
    and seeded in Postgres: s_ledger (ledger 2 between ledger-1 accounts).
    """

    def __init__(self, stub, db, engine=None):
        self.stub = stub
        self.db = db
        self.engine = engine
        self.ts: dict[bytes, int] = {}
        self.accounts: dict[str, pb.Account] = {}
        self.stored: dict[bytes, pb.Transfer] = {}  # committed transfers as stored
        self.unknown = new_id()
        self.unknown2 = new_id()

    def __getattr__(self, name: str) -> bytes:
        try:
            return self.__dict__["accounts"][name].id
        except KeyError:
            raise AttributeError(name) from None

    async def shard_count(self) -> int:
        return int(await self.db.fetchval(
            "SELECT value FROM ledger_meta WHERE key = 'shard_count'"))

    async def setup(self) -> None:
        await use_bytes_uuids(self.db)
        specs = {
            "a": {}, "b": {}, "d": {}, "f1": {}, "f2": {},
            "c2": {"ledger": 2}, "c2b": {"ledger": 2},
            "closed": {"flags": CLOSED}, "closed2": {"flags": CLOSED}, "closing": {},
            "gdr": {"flags": DMNEC}, "gz": {"flags": DMNEC}, "drained": {"flags": DMNEC},
            "gres": {"flags": DMNEC}, "bal": {"flags": DMNEC},
            "gcr": {"flags": CMNED},
            "big_dr": {}, "big_cr": {}, "pend_dr": {}, "pend_cr": {},
        }
        for name, spec in specs.items():
            self.accounts[name] = account(user_data=name.encode(), **spec)
        response = await self.stub.CreateAccounts(
            pb.CreateAccountsRequest(accounts=list(self.accounts.values())))
        assert [aname(r.result) for r in response.results] == ["OK"] * len(specs)
        for acc, r in zip(self.accounts.values(), response.results):
            self.ts[acc.id] = r.timestamp

        a, b = self.a, self.b
        self.t0 = transfer(a, b, 7, user_data=b"orig")
        self.tl = transfer(a, b, 3, flags=T_LINKED)
        self.tl2 = transfer(a, b, 4)
        self.t_drain = transfer(self.drained, b, 100)
        self.t_big = transfer(self.big_dr, self.big_cr, MAX - 5)
        self.p_pend = transfer(self.pend_dr, self.pend_cr, MAX - 5, flags=PENDING)
        self.p_open = transfer(a, b, 50, code=5, flags=PENDING, user_data=b"p_open")
        self.p_open2 = transfer(a, b, 50, code=5, flags=PENDING)
        self.p_posted = transfer(a, b, 20, flags=PENDING)
        self.p_voided = transfer(a, b, 20, flags=PENDING)
        self.p_timeout = transfer(a, b, 30, code=7, flags=PENDING, timeout_seconds=3600)
        self.p_tposted = transfer(a, b, 10, flags=PENDING, timeout_seconds=3600)
        self.p_tvoided = transfer(a, b, 10, flags=PENDING, timeout_seconds=3600)
        self.p_gres = transfer(self.gres, b, 100, flags=PENDING)
        self.p_closing = transfer(a, self.closing, 40, flags=PENDING)
        self.p_closing2 = transfer(self.closing, a, 15, flags=PENDING)
        self.t_bal = transfer(self.bal, b, 1000, flags=BAL_DR)
        self.x_post = resolve(POST, self.p_posted.id, user_data=b"x_post")
        self.x_void = resolve(VOID, self.p_voided.id)
        self.x_tpost = resolve(POST, self.p_tposted.id)
        self.x_tvoid = resolve(VOID, self.p_tvoided.id)
        await self.commit([
            transfer(a, self.gdr, 100), transfer(a, self.drained, 100),
            transfer(a, self.gres, 100), transfer(a, self.bal, 60),
            self.t_drain, transfer(self.gcr, a, 50), self.t_big, self.t0, self.tl, self.tl2,
            self.p_pend, self.p_open, self.p_open2, self.p_posted, self.p_voided, self.p_timeout,
            self.p_tposted, self.p_tvoided, self.p_gres, self.p_closing, self.p_closing2,
            self.t_bal, self.x_post, self.x_void, self.x_tpost, self.x_tvoid,
        ])
        closed = await self.stub.CloseAccounts(pb.CloseAccountsRequest(ids=[self.closing]))
        assert [r.result for r in closed.results] == [pb.CLOSURE_RESULT_OK]
        # A fee schedule (10 % + 5 to d) and one fee transfer a->b of 100 under it.
        self.fee_schedule = new_id()
        await self.stub.CreateFeeSchedule(pb.CreateFeeScheduleRequest(schedule=pb.FeeSchedule(
            id=self.fee_schedule, fees=[pb.Fee(account_id=self.d, rate_ppm=100_000,
                                               fixed_amount=5)])))
        self.t_fee = transfer(a, b, 100, fee_schedule_id=self.fee_schedule)
        response = await self.stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[self.t_fee]))
        assert [tname(r.result) for r in response.results] == ["OK"]
        await self.seed()

    async def commit(self, transfers: list[pb.Transfer]) -> None:
        response = await self.stub.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers))
        assert [tname(r.result) for r in response.results] == ["OK"] * len(transfers)
        for t, r in zip(transfers, response.results):
            self.ts[t.id] = r.timestamp
        found = await self.stub.LookupTransfers(pb.LookupTransfersRequest(
            ids=[t.id for t in transfers]))
        for t in found.transfers:
            self.stored[t.id] = t

    async def seed(self) -> None:
        """The one row the API cannot write (see the module docstring)."""
        shards = await self.shard_count()
        self.s_ledger = transfer(self.a, self.b, 9, ledger=2)
        t = self.s_ledger
        last = await self.db.fetchval('SELECT max("timestamp") FROM transfers')
        await self.db.execute(
            """INSERT INTO transfers (shard, id, debit_account_id, credit_account_id, amount,
                   pending_id, ledger, code, flags, timeout_seconds, user_data, "timestamp",
                   seq_shard, seq)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 0)""",
            shard_of_id(t.id, shards), t.id, t.debit_account_id, t.credit_account_id,
            t.amount, bytes(16), t.ledger, t.code, t.flags, t.timeout_seconds, t.user_data,
            last - 1, shard_of_id(t.debit_account_id, shards))
        self.ts[t.id] = last - 1
        self.stored[t.id] = mod(t, timestamp=last - 1)

    def account_ids(self) -> list[bytes]:
        return [acc.id for acc in self.accounts.values()]

    async def balances(self) -> dict[bytes, tuple[int, int, int, int]]:
        rows = await self.db.fetch(
            "SELECT id, debits_pending, debits_posted, credits_pending, credits_posted "
            "FROM accounts WHERE id = ANY($1::uuid[])", self.account_ids())
        return {r["id"]: tuple(r)[1:] for r in rows}

    async def pending_states(self) -> dict[bytes, int]:
        """pending_status of every transfer reserved on the env's accounts."""
        rows = await self.db.fetch(
            "SELECT id, pending_status FROM transfers WHERE pending_status <> 0 "
            "AND debit_account_id = ANY($1::uuid[])", self.account_ids())
        return {r["id"]: r["pending_status"] for r in rows}


def resolve(flag: int, pending_id: bytes, amount: int = 0, **fields) -> pb.Transfer:
    """A post or void of `pending_id`; accounts, ledger and code omitted unless given."""
    return pb.Transfer(id=fields.pop("id", None) or new_id(), pending_id=pending_id,
                       amount=amount, flags=flag, **fields)


def post(pending_id: bytes, amount: int = 0, **fields) -> pb.Transfer:
    return resolve(POST | fields.pop("flags", 0), pending_id, amount, **fields)


def void(pending_id: bytes, amount: int = 0, **fields) -> pb.Transfer:
    return resolve(VOID | fields.pop("flags", 0), pending_id, amount, **fields)


# -- the table -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    kind: str  # "transfer" or "account"
    build: Callable[[Env], list]
    expected: tuple[str, ...]
    # Stored amount of each OK balancing item, by index in the request.
    amounts: tuple[tuple[int, int], ...] = ()
    # The engine's commit clock for this case, from the real time: the case gets its own engine.
    clock: Callable[[int], int] | None = None


CASES: list[Case] = []


def tcase(id: str, expected: list[str], *, amounts: dict[int, int] | None = None,
          clock: Callable[[int], int] | None = None):
    def register(build):
        CASES.append(Case(id, "transfer", build, tuple(expected),
                          tuple(sorted((amounts or {}).items())), clock))
        return build
    return register


def acase(id: str, expected: list[str]):
    def register(build):
        CASES.append(Case(id, "account", build, tuple(expected)))
        return build
    return register


def tr(debit: bytes, credit: bytes, amount: int, **fields) -> pb.Transfer:
    return transfer(debit, credit, amount, **fields)


def pend(debit: bytes, credit: bytes, amount: int, **fields) -> pb.Transfer:
    return transfer(debit, credit, amount, flags=PENDING | fields.pop("flags", 0), **fields)


# OK and linked chains ----------------------------------------------------------------------

@tcase("OK", ["OK"])
def _(e): return [tr(e.a, e.b, 10)]


@tcase("OK/amount MAX between fresh accounts", ["OK"])
def _(e): return [tr(e.f1, e.f2, MAX)]


@tcase("OK/linked chain", ["OK", "OK", "OK"])
def _(e): return [tr(e.a, e.b, 1, flags=T_LINKED), tr(e.b, e.d, 1, flags=T_LINKED), tr(e.d, e.a, 1)]


@tcase("OK/a chain funds its own later item", ["OK", "OK"])
def _(e): return [tr(e.a, e.gz, 50, flags=T_LINKED), tr(e.gz, e.b, 50)]


@tcase("LINKED_EVENT_FAILED/last item fails", ["LINKED_EVENT_FAILED", "LINKED_EVENT_FAILED",
                                              "AMOUNT_MUST_NOT_BE_ZERO"])
def _(e): return [tr(e.a, e.b, 1, flags=T_LINKED), tr(e.b, e.d, 1, flags=T_LINKED), tr(e.d, e.a, 0)]


@tcase("LINKED_EVENT_FAILED/first item fails", ["CREDIT_ACCOUNT_NOT_FOUND", "LINKED_EVENT_FAILED"])
def _(e): return [tr(e.a, e.unknown, 1, flags=T_LINKED), tr(e.a, e.b, 1)]


@tcase("LINKED_EVENT_FAILED/neighbours of a failed chain commit",
       ["OK", "LINKED_EVENT_FAILED", "EXCEEDS_CREDITS", "LINKED_EVENT_FAILED", "OK"])
def _(e):
    return [tr(e.a, e.b, 1), tr(e.a, e.b, 1, flags=T_LINKED), tr(e.gdr, e.b, 1000, flags=T_LINKED),
            tr(e.a, e.b, 1), tr(e.a, e.b, 2)]


@tcase("LINKED_EVENT_FAILED/a failed chain is rolled back before the next item",
       ["LINKED_EVENT_FAILED", "LINKED_EVENT_FAILED", "ACCOUNTS_MUST_BE_DIFFERENT",
        "EXCEEDS_CREDITS"])
def _(e):
    return [tr(e.a, e.gz, 50, flags=T_LINKED), tr(e.gz, e.b, 50, flags=T_LINKED),
            tr(e.d, e.d, 1), tr(e.gz, e.b, 1)]


@tcase("LINKED_EVENT_FAILED/TIMESTAMP_MUST_BE_ZERO fails a chain",
       ["LINKED_EVENT_FAILED", "TIMESTAMP_MUST_BE_ZERO"])
def _(e): return [tr(e.a, e.b, 1, flags=T_LINKED), tr(e.a, e.b, 1, timestamp=1)]


@tcase("LINKED_EVENT_CHAIN_OPEN/single item", ["LINKED_EVENT_CHAIN_OPEN"])
def _(e): return [tr(e.a, e.b, 1, flags=T_LINKED)]


@tcase("LINKED_EVENT_CHAIN_OPEN/after a closed chain",
       ["OK", "LINKED_EVENT_FAILED", "LINKED_EVENT_CHAIN_OPEN"])
def _(e): return [tr(e.a, e.b, 1), tr(e.a, e.b, 1, flags=T_LINKED), tr(e.a, e.b, 1, flags=T_LINKED)]


@tcase("LINKED_EVENT_CHAIN_OPEN/precedes the items' own errors",
       ["LINKED_EVENT_FAILED", "LINKED_EVENT_CHAIN_OPEN"])
def _(e): return [tr(e.a, e.b, 0, flags=T_LINKED), tr(e.a, e.a, 1, flags=T_LINKED)]


# Field validation, in precedence order -----------------------------------------------------

@tcase("TIMESTAMP_MUST_BE_ZERO", ["TIMESTAMP_MUST_BE_ZERO"])
def _(e): return [tr(e.a, e.b, 1, timestamp=1)]


@tcase("TIMESTAMP_MUST_BE_ZERO/precedes RESERVED_FLAG", ["TIMESTAMP_MUST_BE_ZERO"])
def _(e): return [tr(e.a, e.b, 1, flags=UNKNOWN_FLAG, timestamp=123)]


@tcase("TIMESTAMP_MUST_BE_ZERO/precedes EXISTS", ["TIMESTAMP_MUST_BE_ZERO"])
def _(e): return [mod(e.t0, timestamp=e.ts[e.t0.id])]


@tcase("RESERVED_FLAG", ["RESERVED_FLAG"])
def _(e): return [tr(e.a, e.b, 1, flags=UNKNOWN_FLAG)]


@tcase("RESERVED_FLAG/high bit, precedes ID_MUST_NOT_BE_ZERO", ["RESERVED_FLAG"])
def _(e): return [tr(e.a, e.b, 1, id=b"", flags=1 << 31)]


@tcase("ID_MUST_NOT_BE_ZERO/empty id", ["ID_MUST_NOT_BE_ZERO"])
def _(e): return [tr(e.a, e.b, 1, id=b"")]


@tcase("ID_MUST_NOT_BE_ZERO/16 zero bytes, precedes DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO",
       ["ID_MUST_NOT_BE_ZERO"])
def _(e): return [tr(b"", e.b, 1, id=bytes(16))]


@tcase("DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO/precedes CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO",
       ["DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO"])
def _(e): return [tr(b"", bytes(16), 1)]


@tcase("CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO/precedes PENDING_ID_MUST_BE_ZERO",
       ["CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO"])
def _(e): return [tr(e.a, bytes(16), 1, pending_id=new_id())]


@tcase("ACCOUNTS_MUST_BE_DIFFERENT/precedes PENDING_ID_MUST_BE_ZERO",
       ["ACCOUNTS_MUST_BE_DIFFERENT"])
def _(e): return [tr(e.a, e.a, 1, pending_id=new_id())]


@tcase("PENDING_ID_MUST_BE_ZERO/precedes TIMEOUT_RESERVED_FOR_PENDING_TRANSFER",
       ["PENDING_ID_MUST_BE_ZERO"])
def _(e): return [tr(e.a, e.b, 1, pending_id=new_id(), timeout_seconds=1)]


@tcase("TIMEOUT_RESERVED_FOR_PENDING_TRANSFER/precedes LEDGER_MUST_NOT_BE_ZERO",
       ["TIMEOUT_RESERVED_FOR_PENDING_TRANSFER"])
def _(e): return [tr(e.a, e.b, 1, timeout_seconds=1, ledger=0)]


@tcase("LEDGER_MUST_NOT_BE_ZERO/precedes CODE_MUST_NOT_BE_ZERO", ["LEDGER_MUST_NOT_BE_ZERO"])
def _(e): return [tr(e.a, e.b, 1, ledger=0, code=0)]


@tcase("CODE_MUST_NOT_BE_ZERO/precedes AMOUNT_MUST_NOT_BE_ZERO", ["CODE_MUST_NOT_BE_ZERO"])
def _(e): return [tr(e.a, e.b, 0, code=0)]


@tcase("AMOUNT_MUST_NOT_BE_ZERO/precedes DEBIT_ACCOUNT_NOT_FOUND", ["AMOUNT_MUST_NOT_BE_ZERO"])
def _(e): return [tr(e.unknown, e.b, 0)]


# Accounts and ledgers ----------------------------------------------------------------------

@tcase("DEBIT_ACCOUNT_NOT_FOUND/precedes CREDIT_ACCOUNT_NOT_FOUND", ["DEBIT_ACCOUNT_NOT_FOUND"])
def _(e): return [tr(e.unknown, e.unknown2, 1)]


@tcase("CREDIT_ACCOUNT_NOT_FOUND/precedes the ledger checks", ["CREDIT_ACCOUNT_NOT_FOUND"])
def _(e): return [tr(e.a, e.unknown, 1, ledger=2)]


@tcase("ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER/precedes TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS",
       ["ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER"])
def _(e): return [tr(e.a, e.c2, 1, ledger=3)]


@tcase("TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS", ["TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS"] * 2)
def _(e): return [tr(e.a, e.b, 1, ledger=2), tr(e.c2, e.c2b, 1, ledger=1)]


@tcase("TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS/precedes DEBIT_ACCOUNT_CLOSED",
       ["TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS"])
def _(e): return [tr(e.closed, e.b, 1, ledger=2)]


@tcase("OK/ledger 2", ["OK"])
def _(e): return [tr(e.c2, e.c2b, 1, ledger=2)]


# Idempotency -------------------------------------------------------------------------------

@tcase("DEBIT_ACCOUNT_NOT_FOUND/precedes EXISTS_WITH_DIFFERENT_*", ["DEBIT_ACCOUNT_NOT_FOUND"])
def _(e): return [mod(e.t0, debit_account_id=e.unknown)]


@tcase("ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER/precedes EXISTS_WITH_DIFFERENT_*",
       ["ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER"])
def _(e): return [mod(e.t0, credit_account_id=e.c2)]


@tcase("AMOUNT_MUST_NOT_BE_ZERO/precedes EXISTS_WITH_DIFFERENT_AMOUNT", ["AMOUNT_MUST_NOT_BE_ZERO"])
def _(e): return [mod(e.t0, amount=0)]


@tcase("EXISTS", ["EXISTS"])
def _(e): return [mod(e.t0)]


@tcase("EXISTS/whole committed chain", ["EXISTS", "EXISTS"])
def _(e): return [mod(e.tl), mod(e.tl2)]


@tcase("EXISTS/precedes EXCEEDS_CREDITS", ["EXISTS"])
def _(e): return [mod(e.t_drain)]


@tcase("EXISTS/precedes OVERFLOWS_*", ["EXISTS"])
def _(e): return [mod(e.t_big)]


@tcase("EXISTS/same id earlier in the batch", ["OK", "EXISTS"])
def _(e):
    t = tr(e.a, e.b, 5)
    return [t, mod(t)]


@tcase("EXISTS_WITH_DIFFERENT_FLAGS/precedes EXISTS_WITH_DIFFERENT_AMOUNT",
       ["EXISTS_WITH_DIFFERENT_FLAGS"])
def _(e): return [mod(e.tl, flags=0, amount=99)]


@tcase("EXISTS_WITH_DIFFERENT_FLAGS/fails its chain",
       ["EXISTS_WITH_DIFFERENT_FLAGS", "LINKED_EVENT_FAILED"])
def _(e): return [mod(e.t0, flags=T_LINKED), tr(e.a, e.b, 1)]


@tcase("EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID/precedes EXISTS_WITH_DIFFERENT_AMOUNT",
       ["EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID"])
def _(e): return [mod(e.t0, debit_account_id=e.d, amount=8)]


@tcase("EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID/precedes EXISTS_WITH_DIFFERENT_AMOUNT",
       ["EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID"])
def _(e): return [mod(e.t0, credit_account_id=e.d, amount=8)]


@tcase("EXISTS_WITH_DIFFERENT_AMOUNT/precedes EXISTS_WITH_DIFFERENT_USER_DATA",
       ["EXISTS_WITH_DIFFERENT_AMOUNT"])
def _(e): return [mod(e.t0, amount=8, user_data=b"other")]


@tcase("EXISTS_WITH_DIFFERENT_AMOUNT/amount beyond MAX", ["EXISTS_WITH_DIFFERENT_AMOUNT"])
def _(e): return [mod(e.t0, amount=2**64 - 1)]


@tcase("EXISTS_WITH_DIFFERENT_PENDING_ID/a post replayed naming another pending, precedes _USER_DATA",
       ["EXISTS_WITH_DIFFERENT_PENDING_ID"])
def _(e): return [mod(e.x_post, pending_id=e.p_open.id, user_data=b"u2")]


@tcase("EXISTS_WITH_DIFFERENT_USER_DATA/precedes EXISTS_WITH_DIFFERENT_CODE",
       ["EXISTS_WITH_DIFFERENT_USER_DATA"])
def _(e): return [mod(e.t0, user_data=b"", code=2)]


@tcase("EXISTS_WITH_DIFFERENT_TIMEOUT/a pending replayed without its timeout, precedes _CODE",
       ["EXISTS_WITH_DIFFERENT_TIMEOUT"])
def _(e): return [mod(e.p_timeout, timeout_seconds=0, code=1)]


@tcase("EXISTS_WITH_DIFFERENT_TIMEOUT/another timeout", ["EXISTS_WITH_DIFFERENT_TIMEOUT"])
def _(e): return [mod(e.p_timeout, timeout_seconds=3601)]


@tcase("EXISTS_WITH_DIFFERENT_CODE", ["EXISTS_WITH_DIFFERENT_CODE"])
def _(e): return [mod(e.t0, code=2)]


@tcase("EXISTS_WITH_DIFFERENT_LEDGER/seeded row (unreachable through the API)",
       ["EXISTS_WITH_DIFFERENT_LEDGER"])
def _(e): return [mod(e.s_ledger, ledger=1)]


# Closed accounts, overflows, limits --------------------------------------------------------

@tcase("DEBIT_ACCOUNT_CLOSED/precedes CREDIT_ACCOUNT_CLOSED", ["DEBIT_ACCOUNT_CLOSED"])
def _(e): return [tr(e.closed, e.closed2, 1)]


@tcase("DEBIT_ACCOUNT_CLOSED/precedes OVERFLOWS_CREDITS_POSTED", ["DEBIT_ACCOUNT_CLOSED"])
def _(e): return [tr(e.closed, e.big_cr, 6)]


@tcase("CREDIT_ACCOUNT_CLOSED", ["CREDIT_ACCOUNT_CLOSED"])
def _(e): return [tr(e.a, e.closed, 1)]


@tcase("CREDIT_ACCOUNT_CLOSED/precedes OVERFLOWS_DEBITS_POSTED", ["CREDIT_ACCOUNT_CLOSED"])
def _(e): return [tr(e.big_dr, e.closed, 6)]


@tcase("OVERFLOWS_DEBITS_POSTED/boundary", ["OVERFLOWS_DEBITS_POSTED", "OK", "OVERFLOWS_DEBITS_POSTED"])
def _(e): return [tr(e.big_dr, e.b, 6), tr(e.big_dr, e.b, 5), tr(e.big_dr, e.b, 1)]


@tcase("OVERFLOWS_DEBITS_POSTED/amount 2^63", ["OVERFLOWS_DEBITS_POSTED"])
def _(e): return [tr(e.f1, e.f2, 2**63)]


@tcase("OVERFLOWS_DEBITS_POSTED/amount 2^64-1", ["OVERFLOWS_DEBITS_POSTED"])
def _(e): return [tr(e.f1, e.f2, 2**64 - 1)]


@tcase("OVERFLOWS_DEBITS_POSTED/precedes OVERFLOWS_CREDITS_POSTED", ["OVERFLOWS_DEBITS_POSTED"])
def _(e): return [tr(e.big_dr, e.big_cr, 6)]


@tcase("OVERFLOWS_CREDITS_POSTED/boundary", ["OVERFLOWS_CREDITS_POSTED", "OK", "OVERFLOWS_CREDITS_POSTED"])
def _(e): return [tr(e.a, e.big_cr, 6), tr(e.a, e.big_cr, 5), tr(e.a, e.big_cr, 1)]


@tcase("OVERFLOWS_CREDITS_POSTED/precedes EXCEEDS_CREDITS", ["OVERFLOWS_CREDITS_POSTED"])
def _(e): return [tr(e.gz, e.big_cr, 6)]


@tcase("OVERFLOWS_CREDITS_POSTED/precedes OVERFLOWS_DEBITS", ["OVERFLOWS_CREDITS_POSTED"])
def _(e): return [tr(e.pend_dr, e.big_cr, 6)]


@tcase("OVERFLOWS_DEBITS/pending + posted, boundary", ["OVERFLOWS_DEBITS", "OK", "OVERFLOWS_DEBITS"])
def _(e): return [tr(e.pend_dr, e.b, 6), tr(e.pend_dr, e.b, 5), tr(e.pend_dr, e.b, 1)]


@tcase("OVERFLOWS_DEBITS/precedes OVERFLOWS_CREDITS", ["OVERFLOWS_DEBITS"])
def _(e): return [tr(e.pend_dr, e.pend_cr, 6)]


@tcase("OVERFLOWS_CREDITS/pending + posted, boundary", ["OVERFLOWS_CREDITS", "OK", "OVERFLOWS_CREDITS"])
def _(e): return [tr(e.a, e.pend_cr, 6), tr(e.a, e.pend_cr, 5), tr(e.a, e.pend_cr, 1)]


@tcase("OVERFLOWS_CREDITS/precedes EXCEEDS_CREDITS", ["OVERFLOWS_CREDITS"])
def _(e): return [tr(e.gz, e.pend_cr, 6)]


@tcase("EXCEEDS_CREDITS/boundary", ["EXCEEDS_CREDITS", "OK", "EXCEEDS_CREDITS"])
def _(e): return [tr(e.gdr, e.b, 101), tr(e.gdr, e.b, 100), tr(e.gdr, e.b, 1)]


@tcase("EXCEEDS_CREDITS/nothing credited", ["EXCEEDS_CREDITS"])
def _(e): return [tr(e.gz, e.b, 1)]


@tcase("EXCEEDS_CREDITS/precedes EXCEEDS_DEBITS", ["EXCEEDS_CREDITS"])
def _(e): return [tr(e.gdr, e.gcr, 101)]


@tcase("EXCEEDS_CREDITS/sees earlier items of the batch", ["OK", "OK", "EXCEEDS_CREDITS"])
def _(e): return [tr(e.a, e.gz, 10), tr(e.gz, e.b, 10), tr(e.gz, e.b, 1)]


@tcase("FEES_EXCEED_AMOUNT/the fee takes it all", ["FEES_EXCEED_AMOUNT", "OK"])
def _(e): return [tr(e.a, e.b, 5, fee_schedule_id=e.fee_schedule), tr(e.a, e.b, 1)]


@tcase("FEE_SCHEDULE_NOT_FOUND/unknown schedule", ["FEE_SCHEDULE_NOT_FOUND"])
def _(e): return [tr(e.a, e.b, 10, fee_schedule_id=e.unknown)]


@tcase("FEE_SCHEDULE_NOT_FOUND/fails its chain",
       ["LINKED_EVENT_FAILED", "FEE_SCHEDULE_NOT_FOUND"])
def _(e): return [tr(e.a, e.b, 1, flags=T_LINKED), tr(e.a, e.b, 10, fee_schedule_id=e.unknown)]


@tcase("REFUND_ORIGINAL_NOT_FOUND/unknown original", ["REFUND_ORIGINAL_NOT_FOUND"])
def _(e): return [tr(e.b, e.a, 1, refund_of=e.unknown)]


@tcase("REFUND_ORIGINAL_NOT_FOUND/accounts not swapped", ["REFUND_ORIGINAL_NOT_FOUND"])
def _(e): return [tr(e.a, e.b, 1, refund_of=e.t_fee.id)]


@tcase("EXCEEDS_REFUNDABLE_AMOUNT/more than the original", ["EXCEEDS_REFUNDABLE_AMOUNT"])
def _(e): return [tr(e.b, e.a, 101, refund_of=e.t_fee.id)]


@tcase("EXCEEDS_DEBITS/boundary", ["EXCEEDS_DEBITS", "OK", "EXCEEDS_DEBITS"])
def _(e): return [tr(e.a, e.gcr, 51), tr(e.a, e.gcr, 50), tr(e.a, e.gcr, 1)]


@tcase("OK/guarded accounts may take the other side freely", ["OK", "OK"])
def _(e): return [tr(e.a, e.gz, 1000), tr(e.gcr, e.a, 1000)]


# Two-phase: flags and pending ids, in precedence order ---------------------------------------

@tcase("FLAGS_ARE_MUTUALLY_EXCLUSIVE/PENDING with POST, PENDING with VOID",
       ["FLAGS_ARE_MUTUALLY_EXCLUSIVE"] * 2)
def _(e):
    return [tr(e.a, e.b, 1, flags=PENDING | POST, pending_id=e.p_open.id),
            tr(e.a, e.b, 1, flags=PENDING | VOID, pending_id=e.p_open.id)]


@tcase("FLAGS_ARE_MUTUALLY_EXCLUSIVE/POST with VOID, precedes PENDING_ID_MUST_NOT_BE_ZERO",
       ["FLAGS_ARE_MUTUALLY_EXCLUSIVE"])
def _(e): return [resolve(POST | VOID, b"")]


@tcase("FLAGS_ARE_MUTUALLY_EXCLUSIVE/post or void with a balancing flag",
       ["FLAGS_ARE_MUTUALLY_EXCLUSIVE"] * 2)
def _(e): return [post(e.p_open.id, flags=BAL_DR), void(e.p_open.id, flags=BAL_CR)]


@tcase("FLAGS_ARE_MUTUALLY_EXCLUSIVE/precedes DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO",
       ["FLAGS_ARE_MUTUALLY_EXCLUSIVE"])
def _(e): return [tr(b"", e.b, 1, flags=PENDING | POST)]


@tcase("FLAGS_ARE_MUTUALLY_EXCLUSIVE/fails its chain",
       ["LINKED_EVENT_FAILED", "FLAGS_ARE_MUTUALLY_EXCLUSIVE"])
def _(e): return [tr(e.a, e.b, 1, flags=T_LINKED), resolve(POST | VOID, e.p_open.id)]


@tcase("ID_MUST_NOT_BE_ZERO/precedes FLAGS_ARE_MUTUALLY_EXCLUSIVE", ["ID_MUST_NOT_BE_ZERO"])
def _(e): return [resolve(POST | VOID, e.p_open.id, id=bytes(16))]


@tcase("RESERVED_FLAG/precedes FLAGS_ARE_MUTUALLY_EXCLUSIVE", ["RESERVED_FLAG"])
def _(e): return [resolve(POST | VOID | UNKNOWN_FLAG, e.p_open.id)]


@tcase("TIMESTAMP_MUST_BE_ZERO/a post", ["TIMESTAMP_MUST_BE_ZERO"])
def _(e): return [post(e.p_open.id, timestamp=1)]


@tcase("PENDING_ID_MUST_NOT_BE_ZERO/post (empty), void (16 zero bytes)",
       ["PENDING_ID_MUST_NOT_BE_ZERO"] * 2)
def _(e): return [post(b""), void(bytes(16))]


@tcase("PENDING_ID_MUST_NOT_BE_ZERO/precedes TIMEOUT_RESERVED_FOR_PENDING_TRANSFER",
       ["PENDING_ID_MUST_NOT_BE_ZERO"])
def _(e): return [post(b"", timeout_seconds=5)]


@tcase("PENDING_ID_MUST_BE_DIFFERENT/precedes TIMEOUT_RESERVED_FOR_PENDING_TRANSFER",
       ["PENDING_ID_MUST_BE_DIFFERENT"])
def _(e):
    x = new_id()
    return [post(x, id=x, timeout_seconds=5)]


@tcase("PENDING_ID_MUST_BE_DIFFERENT/a void under the pending's own id, precedes EXISTS",
       ["PENDING_ID_MUST_BE_DIFFERENT"])
def _(e): return [void(e.p_open.id, id=e.p_open.id)]


@tcase("TIMEOUT_RESERVED_FOR_PENDING_TRANSFER/post, precedes PENDING_TRANSFER_NOT_FOUND",
       ["TIMEOUT_RESERVED_FOR_PENDING_TRANSFER"])
def _(e): return [post(e.unknown, timeout_seconds=1)]


@tcase("TIMEOUT_RESERVED_FOR_PENDING_TRANSFER/void of an open pending",
       ["TIMEOUT_RESERVED_FOR_PENDING_TRANSFER"])
def _(e): return [void(e.p_open.id, timeout_seconds=1)]


@tcase("PENDING_TRANSFER_NOT_FOUND/post and void", ["PENDING_TRANSFER_NOT_FOUND"] * 2)
def _(e): return [post(e.unknown), void(e.unknown)]


@tcase("PENDING_TRANSFER_NOT_FOUND/precedes PENDING_TRANSFER_HAS_DIFFERENT_*",
       ["PENDING_TRANSFER_NOT_FOUND"])
def _(e): return [post(e.unknown, debit_account_id=e.d, ledger=9, amount=10**6)]


@tcase("PENDING_TRANSFER_NOT_FOUND/the pending comes later in the batch",
       ["PENDING_TRANSFER_NOT_FOUND", "OK"])
def _(e):
    p = pend(e.a, e.b, 5)
    return [post(p.id), p]


@tcase("PENDING_TRANSFER_NOT_FOUND/the pending failed earlier in the batch",
       ["EXCEEDS_CREDITS", "PENDING_TRANSFER_NOT_FOUND"])
def _(e):
    p = pend(e.gz, e.b, 5)
    return [p, post(p.id)]


@tcase("PENDING_TRANSFER_NOT_FOUND/the pending's chain failed earlier in the batch",
       ["LINKED_EVENT_FAILED", "AMOUNT_MUST_NOT_BE_ZERO", "PENDING_TRANSFER_NOT_FOUND"])
def _(e):
    p = pend(e.a, e.b, 5, flags=T_LINKED)
    return [p, tr(e.a, e.b, 0), void(p.id)]


@tcase("PENDING_TRANSFER_NOT_PENDING/a plain transfer, a post, a balancing transfer",
       ["PENDING_TRANSFER_NOT_PENDING"] * 3)
def _(e): return [post(e.t0.id), void(e.x_post.id), void(e.t_bal.id)]


@tcase("PENDING_TRANSFER_NOT_PENDING/precedes PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID",
       ["PENDING_TRANSFER_NOT_PENDING"])
def _(e): return [post(e.t0.id, debit_account_id=e.d)]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID/precedes _CREDIT_ACCOUNT_ID",
       ["PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID"] * 2)
def _(e):
    return [post(e.p_open.id, debit_account_id=e.d, credit_account_id=e.d),
            void(e.p_open.id, debit_account_id=e.b, credit_account_id=e.a)]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID/a post replayed, precedes EXISTS_WITH_DIFFERENT_*",
       ["PENDING_TRANSFER_HAS_DIFFERENT_DEBIT_ACCOUNT_ID"])
def _(e): return [mod(e.x_post, debit_account_id=e.d, user_data=b"other")]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID/precedes _LEDGER",
       ["PENDING_TRANSFER_HAS_DIFFERENT_CREDIT_ACCOUNT_ID"])
def _(e): return [post(e.p_open.id, debit_account_id=e.a, credit_account_id=e.d, ledger=2)]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_LEDGER/precedes _CODE",
       ["PENDING_TRANSFER_HAS_DIFFERENT_LEDGER"])
def _(e): return [void(e.p_open.id, ledger=2, code=99)]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_LEDGER/a post replayed, precedes EXISTS_WITH_DIFFERENT_LEDGER",
       ["PENDING_TRANSFER_HAS_DIFFERENT_LEDGER"])
def _(e): return [mod(e.x_post, ledger=2)]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_CODE/precedes EXCEEDS_PENDING_TRANSFER_AMOUNT",
       ["PENDING_TRANSFER_HAS_DIFFERENT_CODE"])
def _(e): return [post(e.p_open.id, code=99, amount=51)]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_CODE/precedes PENDING_TRANSFER_ALREADY_POSTED",
       ["PENDING_TRANSFER_HAS_DIFFERENT_CODE"])
def _(e): return [post(e.p_posted.id, code=99)]


# Two-phase: posting and voiding ---------------------------------------------------------------

@tcase("OK/post naming every field of the pending", ["OK"])
def _(e):
    return [post(e.p_open.id, 50, debit_account_id=e.a, credit_account_id=e.b, ledger=1, code=5,
                 user_data=b"capture")]


@tcase("OK/post amount 0 posts all of it", ["OK"])
def _(e): return [post(e.p_open.id)]


@tcase("OK/a partial post releases the rest", ["OK"])
def _(e): return [post(e.p_open.id, 20)]


@tcase("OK/void amount 0, void with the pending amount", ["OK", "OK"])
def _(e): return [void(e.p_open.id), void(e.p_open2.id, 50)]


@tcase("OK/post and void of pendings created earlier in the batch", ["OK", "OK", "OK", "OK"])
def _(e):
    p, q = pend(e.a, e.b, 9), pend(e.b, e.a, 4, timeout_seconds=60)
    return [p, q, post(p.id, 3), void(q.id)]


@tcase("OK/a pending of MAX between fresh accounts, with a timeout", ["OK"])
def _(e): return [pend(e.f1, e.f2, MAX, timeout_seconds=1000)]


@tcase("OK/post and void of pendings on an account closed since", ["OK", "OK"])
def _(e): return [post(e.p_closing.id), void(e.p_closing2.id)]


@tcase("CREDIT_ACCOUNT_CLOSED/DEBIT_ACCOUNT_CLOSED: new transfers on an account closed since",
       ["CREDIT_ACCOUNT_CLOSED", "DEBIT_ACCOUNT_CLOSED", "DEBIT_ACCOUNT_CLOSED"])
def _(e): return [pend(e.a, e.closing, 1), tr(e.closing, e.a, 1), tr(e.closing, e.a, MAX, flags=BAL_DR)]


@tcase("DEBIT_ACCOUNT_CLOSED/pending and balancing from an account created closed",
       ["DEBIT_ACCOUNT_CLOSED"] * 2)
def _(e): return [pend(e.closed, e.b, 1), tr(e.closed, e.b, MAX, flags=BAL_DR)]


@tcase("DEBIT_ACCOUNT_CLOSED/precedes OVERFLOWS_DEBITS_PENDING", ["DEBIT_ACCOUNT_CLOSED"])
def _(e): return [pend(e.closed, e.b, 2**63)]


@tcase("EXCEEDS_PENDING_TRANSFER_AMOUNT/boundary",
       ["EXCEEDS_PENDING_TRANSFER_AMOUNT", "OK", "PENDING_TRANSFER_ALREADY_POSTED"])
def _(e): return [post(e.p_open.id, 51), post(e.p_open.id, 50), post(e.p_open.id, 1)]


@tcase("EXCEEDS_PENDING_TRANSFER_AMOUNT/amount 2^64-1", ["EXCEEDS_PENDING_TRANSFER_AMOUNT"])
def _(e): return [post(e.p_open.id, 2**64 - 1)]


@tcase("EXCEEDS_PENDING_TRANSFER_AMOUNT/precedes PENDING_TRANSFER_ALREADY_POSTED, _VOIDED",
       ["EXCEEDS_PENDING_TRANSFER_AMOUNT"] * 2)
def _(e): return [post(e.p_posted.id, 21), post(e.p_voided.id, 21)]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT/void, boundary",
       ["PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT", "PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT", "OK"])
def _(e): return [void(e.p_open.id, 49), void(e.p_open.id, 51), void(e.p_open.id, 50)]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT/precedes PENDING_TRANSFER_ALREADY_VOIDED",
       ["PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT"])
def _(e): return [void(e.p_voided.id, 7)]


@tcase("PENDING_TRANSFER_ALREADY_POSTED/post and void", ["PENDING_TRANSFER_ALREADY_POSTED"] * 2)
def _(e): return [post(e.p_posted.id), void(e.p_posted.id, 20)]


@tcase("PENDING_TRANSFER_ALREADY_VOIDED/post and void", ["PENDING_TRANSFER_ALREADY_VOIDED"] * 2)
def _(e): return [post(e.p_voided.id, 5), void(e.p_voided.id)]


@tcase("PENDING_TRANSFER_ALREADY_POSTED/posted earlier in the batch",
       ["OK", "PENDING_TRANSFER_ALREADY_POSTED", "PENDING_TRANSFER_ALREADY_POSTED"])
def _(e): return [post(e.p_open.id, 10), post(e.p_open.id, 10), void(e.p_open.id)]


@tcase("PENDING_TRANSFER_ALREADY_VOIDED/voided earlier in the batch",
       ["OK", "PENDING_TRANSFER_ALREADY_VOIDED"])
def _(e): return [void(e.p_open.id), post(e.p_open.id)]


@tcase("PENDING_TRANSFER_ALREADY_POSTED/posted by a committed chain of the batch",
       ["OK", "OK", "PENDING_TRANSFER_ALREADY_POSTED"])
def _(e): return [post(e.p_open.id, flags=T_LINKED), tr(e.a, e.b, 1), void(e.p_open.id)]


@tcase("LINKED_EVENT_FAILED/a failed chain rolls back its post: the pending can then be voided",
       ["LINKED_EVENT_FAILED", "EXCEEDS_CREDITS", "OK"])
def _(e): return [post(e.p_open.id, flags=T_LINKED), tr(e.gz, e.b, 1), void(e.p_open.id)]


@tcase("LINKED_EVENT_FAILED/a post fails its chain",
       ["LINKED_EVENT_FAILED", "PENDING_TRANSFER_ALREADY_VOIDED"])
def _(e): return [tr(e.a, e.b, 1, flags=T_LINKED), post(e.p_voided.id)]


# Two-phase: idempotency ----------------------------------------------------------------------

@tcase("EXISTS/a post and a void replayed, precedes PENDING_TRANSFER_ALREADY_*", ["EXISTS", "EXISTS"])
def _(e): return [mod(e.x_post), mod(e.x_void)]


@tcase("EXISTS/a post replayed naming the pending's accounts, ledger, code and the moved amount",
       ["EXISTS"])
def _(e):
    return [mod(e.x_post, debit_account_id=e.a, credit_account_id=e.b, ledger=1, code=1,
                amount=20)]


@tcase("EXISTS/pendings replayed, open and posted", ["EXISTS", "EXISTS", "EXISTS"])
def _(e): return [mod(e.p_open), mod(e.p_timeout), mod(e.p_posted)]


@tcase("EXISTS/a balancing transfer replayed with its requested or its stored amount",
       ["EXISTS", "EXISTS"])
def _(e): return [mod(e.t_bal), mod(e.t_bal, amount=60)]


@tcase("EXISTS_WITH_DIFFERENT_AMOUNT/a balancing transfer replayed with less than it moved",
       ["EXISTS_WITH_DIFFERENT_AMOUNT"])
def _(e): return [mod(e.t_bal, amount=59)]


@tcase("EXISTS_WITH_DIFFERENT_AMOUNT/a post replayed with another amount, precedes EXCEEDS_PENDING_TRANSFER_AMOUNT",
       ["EXISTS_WITH_DIFFERENT_AMOUNT"] * 2)
def _(e): return [mod(e.x_post, amount=5), mod(e.x_post, amount=21)]


@tcase("EXISTS_WITH_DIFFERENT_FLAGS/a void under a post's id; a pending replayed without PENDING",
       ["EXISTS_WITH_DIFFERENT_FLAGS"] * 2)
def _(e): return [mod(e.x_post, flags=VOID), mod(e.p_open, flags=0)]


@tcase("EXISTS_WITH_DIFFERENT_USER_DATA/a post replayed, precedes PENDING_TRANSFER_ALREADY_POSTED",
       ["EXISTS_WITH_DIFFERENT_USER_DATA"])
def _(e): return [mod(e.x_post, user_data=b"other")]


# Two-phase: limits and overflows of pending amounts -------------------------------------------

@tcase("EXCEEDS_CREDITS/pending amounts count against the limit",
       ["OK", "EXCEEDS_CREDITS", "EXCEEDS_CREDITS", "OK"])
def _(e): return [pend(e.gdr, e.b, 60), tr(e.gdr, e.b, 41), pend(e.gdr, e.b, 41), tr(e.gdr, e.b, 40)]


@tcase("EXCEEDS_CREDITS/a fully reserved account", ["EXCEEDS_CREDITS"])
def _(e): return [tr(e.gres, e.b, 1)]


@tcase("OK/voiding a reservation frees the limit", ["EXCEEDS_CREDITS", "OK", "OK"])
def _(e): return [tr(e.gres, e.b, 1), void(e.p_gres.id), tr(e.gres, e.b, 100)]


@tcase("OK/a partial post frees the rest of the limit", ["OK", "OK", "EXCEEDS_CREDITS"])
def _(e): return [post(e.p_gres.id, 30), tr(e.gres, e.b, 70), tr(e.gres, e.b, 1)]


@tcase("EXCEEDS_DEBITS/pending credits count against the limit", ["OK", "EXCEEDS_DEBITS", "OK"])
def _(e): return [pend(e.a, e.gcr, 30), tr(e.a, e.gcr, 21), tr(e.a, e.gcr, 20)]


@tcase("OVERFLOWS_DEBITS_PENDING/boundary",
       ["OVERFLOWS_DEBITS_PENDING", "OK", "OVERFLOWS_DEBITS_PENDING"])
def _(e): return [pend(e.pend_dr, e.b, 6), pend(e.pend_dr, e.b, 5), pend(e.pend_dr, e.b, 1)]


@tcase("OVERFLOWS_DEBITS_PENDING/amount 2^63 and 2^64-1 between fresh accounts",
       ["OVERFLOWS_DEBITS_PENDING"] * 2)
def _(e): return [pend(e.f1, e.f2, 2**63), pend(e.f1, e.f2, 2**64 - 1)]


@tcase("OVERFLOWS_DEBITS_PENDING/precedes OVERFLOWS_CREDITS_PENDING", ["OVERFLOWS_DEBITS_PENDING"])
def _(e): return [pend(e.pend_dr, e.pend_cr, 6)]


@tcase("OVERFLOWS_DEBITS_PENDING/precedes EXCEEDS_CREDITS", ["OVERFLOWS_DEBITS_PENDING"])
def _(e): return [pend(e.gz, e.b, 2**63)]


@tcase("OVERFLOWS_CREDITS_PENDING/boundary",
       ["OVERFLOWS_CREDITS_PENDING", "OK", "OVERFLOWS_CREDITS_PENDING"])
def _(e): return [pend(e.a, e.pend_cr, 6), pend(e.a, e.pend_cr, 5), pend(e.a, e.pend_cr, 1)]


@tcase("OVERFLOWS_CREDITS_PENDING/precedes OVERFLOWS_DEBITS", ["OVERFLOWS_CREDITS_PENDING"])
def _(e): return [pend(e.big_dr, e.pend_cr, 6)]


@tcase("OVERFLOWS_DEBITS/a pending on an account full of posted debits", ["OVERFLOWS_DEBITS", "OK"])
def _(e): return [pend(e.big_dr, e.b, 6), pend(e.big_dr, e.b, 5)]


@tcase("OVERFLOWS_CREDITS/a pending to an account full of posted credits", ["OVERFLOWS_CREDITS"])
def _(e): return [pend(e.a, e.big_cr, 6)]


# Balancing -----------------------------------------------------------------------------------

@tcase("OK/BALANCING_DEBIT of 2^63-1 sweeps what the account has, then moves 0", ["OK", "OK"],
       amounts={0: 100, 1: 0})
def _(e): return [tr(e.gdr, e.b, MAX, flags=BAL_DR), tr(e.gdr, e.b, MAX, flags=BAL_DR)]


@tcase("OK/BALANCING_DEBIT below the cap moves the amount", ["OK"], amounts={0: 30})
def _(e): return [tr(e.gdr, e.b, 30, flags=BAL_DR)]


@tcase("OK/BALANCING_DEBIT counts pending debits; an untouched account has nothing",
       ["OK", "OK"], amounts={0: 0, 1: 0})
def _(e): return [tr(e.gres, e.b, MAX, flags=BAL_DR), tr(e.f1, e.f2, 5, flags=BAL_DR)]


@tcase("OK/BALANCING_CREDIT caps at the credit account's debits", ["OK"], amounts={0: 50})
def _(e): return [tr(e.a, e.gcr, MAX, flags=BAL_CR)]


@tcase("OK/both balancing flags apply both caps", ["OK"], amounts={0: 50})
def _(e): return [tr(e.gdr, e.gcr, MAX, flags=BAL_DR | BAL_CR)]


@tcase("OK/BALANCING_DEBIT with PENDING reserves the capped amount", ["OK", "OK"],
       amounts={0: 100, 1: 0})
def _(e):
    return [tr(e.gdr, e.b, MAX, flags=BAL_DR | PENDING), tr(e.gdr, e.b, MAX, flags=BAL_DR | PENDING)]


@tcase("EXCEEDS_CREDITS/BALANCING_CREDIT does not lift the debit account's limit",
       ["EXCEEDS_CREDITS"])
def _(e): return [tr(e.gz, e.gcr, 5, flags=BAL_CR)]


@tcase("AMOUNT_MUST_NOT_BE_ZERO/balancing and pending", ["AMOUNT_MUST_NOT_BE_ZERO"] * 2)
def _(e): return [tr(e.gdr, e.b, 0, flags=BAL_DR), pend(e.a, e.b, 0)]


# Moving the engine's commit clock (each case on an engine of its own) -----------------------

def EXPIRE(now: int) -> int:
    """Far past every timeout of the prepared state (3,600 s)."""
    return now + 10**13


def NEAR_MAX(now: int) -> int:
    """A timeout of TIMEOUT_EDGE seconds still fits an int64 timestamp, one more does not."""
    return MAX - TIMEOUT_EDGE * SECOND_NS - 10**6


@tcase("PENDING_TRANSFER_EXPIRED/post and void after the engine's clock passed the timeout",
       ["PENDING_TRANSFER_EXPIRED"] * 2, clock=EXPIRE)
def _(e): return [post(e.p_timeout.id), void(e.p_timeout.id)]


@tcase("PENDING_TRANSFER_ALREADY_POSTED/_VOIDED precede PENDING_TRANSFER_EXPIRED",
       ["PENDING_TRANSFER_ALREADY_POSTED", "PENDING_TRANSFER_ALREADY_VOIDED"], clock=EXPIRE)
def _(e): return [void(e.p_tposted.id), post(e.p_tvoided.id)]


@tcase("EXCEEDS_PENDING_TRANSFER_AMOUNT/_HAS_DIFFERENT_AMOUNT precede PENDING_TRANSFER_EXPIRED",
       ["EXCEEDS_PENDING_TRANSFER_AMOUNT", "PENDING_TRANSFER_HAS_DIFFERENT_AMOUNT"], clock=EXPIRE)
def _(e): return [post(e.p_timeout.id, 31), void(e.p_timeout.id, 1)]


@tcase("PENDING_TRANSFER_HAS_DIFFERENT_CODE/precedes PENDING_TRANSFER_EXPIRED",
       ["PENDING_TRANSFER_HAS_DIFFERENT_CODE"], clock=EXPIRE)
def _(e): return [post(e.p_timeout.id, code=1)]


@tcase("EXISTS/replays of a post and a void of pendings that had a timeout", ["EXISTS", "EXISTS"],
       clock=EXPIRE)
def _(e): return [mod(e.x_tpost), mod(e.x_tvoid)]


@tcase("OK/a pending without a timeout never expires", ["OK"], clock=EXPIRE)
def _(e): return [post(e.p_open.id)]


@tcase("OVERFLOWS_TIMEOUT/boundary near 2^63",
       ["OVERFLOWS_TIMEOUT", "OK", "OVERFLOWS_TIMEOUT", "OK"], clock=NEAR_MAX)
def _(e):
    return [pend(e.a, e.b, 1, timeout_seconds=TIMEOUT_EDGE + 1),
            pend(e.a, e.b, 1, timeout_seconds=TIMEOUT_EDGE),
            pend(e.a, e.b, 1, timeout_seconds=TIMEOUT_MAX), pend(e.a, e.b, 1)]


@tcase("OVERFLOWS_TIMEOUT/precedes EXCEEDS_CREDITS", ["OVERFLOWS_TIMEOUT"], clock=NEAR_MAX)
def _(e): return [pend(e.gz, e.b, 1, timeout_seconds=TIMEOUT_MAX)]


@tcase("OVERFLOWS_CREDITS/precedes OVERFLOWS_TIMEOUT", ["OVERFLOWS_CREDITS"], clock=NEAR_MAX)
def _(e): return [pend(e.a, e.big_cr, 6, timeout_seconds=TIMEOUT_MAX)]


# Accounts ------------------------------------------------------------------------------------

def acct(**fields) -> pb.Account:
    id = fields.pop("id", None)
    return account(id, **fields) if id is not None else account(**fields)


@acase("OK", ["OK"])
def _(e): return [acct()]


@acase("OK/every served flag, 16 bytes of user_data",
       ["OK", "OK", "OK", "OK"])
def _(e):
    return [acct(flags=DMNEC, user_data=b"x" * 16), acct(flags=CMNED),
            acct(flags=CLOSED | DMNEC), acct(ledger=2**32 - 1, code=2**32 - 1)]


@acase("OK/linked chain", ["OK", "OK", "OK"])
def _(e): return [acct(flags=A_LINKED), acct(flags=A_LINKED), acct()]


@acase("LINKED_EVENT_FAILED/last item fails", ["LINKED_EVENT_FAILED", "LEDGER_MUST_NOT_BE_ZERO"])
def _(e): return [acct(flags=A_LINKED), acct(ledger=0)]


@acase("LINKED_EVENT_FAILED/first item fails, next chain commits",
       ["CODE_MUST_NOT_BE_ZERO", "LINKED_EVENT_FAILED", "OK"])
def _(e): return [acct(code=0, flags=A_LINKED), acct(), acct()]


@acase("LINKED_EVENT_FAILED/EXISTS_WITH_DIFFERENT_* fails a chain",
       ["LINKED_EVENT_FAILED", "EXISTS_WITH_DIFFERENT_CODE"])
def _(e): return [acct(flags=A_LINKED), mod(e.accounts["a"], code=99)]


@acase("LINKED_EVENT_CHAIN_OPEN/single item", ["LINKED_EVENT_CHAIN_OPEN"])
def _(e): return [acct(flags=A_LINKED)]


@acase("LINKED_EVENT_CHAIN_OPEN/after a committed item",
       ["OK", "LINKED_EVENT_FAILED", "LINKED_EVENT_CHAIN_OPEN"])
def _(e): return [acct(), acct(flags=A_LINKED), acct(flags=A_LINKED)]


@acase("LINKED_EVENT_CHAIN_OPEN/precedes the items' own errors",
       ["LINKED_EVENT_FAILED", "LINKED_EVENT_CHAIN_OPEN"])
def _(e): return [acct(ledger=0, flags=A_LINKED), acct(code=0, flags=A_LINKED)]


@acase("TIMESTAMP_MUST_BE_ZERO/precedes RESERVED_FLAG", ["TIMESTAMP_MUST_BE_ZERO"])
def _(e): return [mod(acct(flags=UNKNOWN_FLAG), timestamp=1)]


@acase("TIMESTAMP_MUST_BE_ZERO/precedes EXISTS", ["TIMESTAMP_MUST_BE_ZERO"])
def _(e): return [mod(e.accounts["a"], timestamp=e.ts[e.a])]


@acase("RESERVED_FLAG/precedes ID_MUST_NOT_BE_ZERO", ["RESERVED_FLAG"])
def _(e): return [acct(id=b"", flags=UNKNOWN_FLAG)]


@acase("RESERVED_FLAG/high bit", ["RESERVED_FLAG"])
def _(e): return [acct(flags=1 << 31)]


@acase("ID_MUST_NOT_BE_ZERO/precedes FLAGS_ARE_MUTUALLY_EXCLUSIVE", ["ID_MUST_NOT_BE_ZERO"])
def _(e): return [acct(id=b"", flags=DMNEC | CMNED)]


@acase("ID_MUST_NOT_BE_ZERO/16 zero bytes", ["ID_MUST_NOT_BE_ZERO"])
def _(e): return [acct(id=bytes(16))]


@acase("FLAGS_ARE_MUTUALLY_EXCLUSIVE/precedes DEBITS_PENDING_MUST_BE_ZERO",
       ["FLAGS_ARE_MUTUALLY_EXCLUSIVE"])
def _(e): return [mod(acct(flags=DMNEC | CMNED), debits_pending=1)]


@acase("FLAGS_ARE_MUTUALLY_EXCLUSIVE/precedes EXISTS", ["FLAGS_ARE_MUTUALLY_EXCLUSIVE"])
def _(e): return [mod(e.accounts["a"], flags=DMNEC | CMNED)]


@acase("DEBITS_PENDING_MUST_BE_ZERO/precedes DEBITS_POSTED_MUST_BE_ZERO",
       ["DEBITS_PENDING_MUST_BE_ZERO"])
def _(e): return [mod(acct(), debits_pending=1, debits_posted=1)]


@acase("DEBITS_POSTED_MUST_BE_ZERO/precedes CREDITS_PENDING_MUST_BE_ZERO",
       ["DEBITS_POSTED_MUST_BE_ZERO"])
def _(e): return [mod(acct(), debits_posted=1, credits_pending=1)]


@acase("CREDITS_PENDING_MUST_BE_ZERO/precedes CREDITS_POSTED_MUST_BE_ZERO",
       ["CREDITS_PENDING_MUST_BE_ZERO"])
def _(e): return [mod(acct(), credits_pending=1, credits_posted=1)]


@acase("CREDITS_POSTED_MUST_BE_ZERO/precedes LEDGER_MUST_NOT_BE_ZERO",
       ["CREDITS_POSTED_MUST_BE_ZERO"])
def _(e): return [mod(acct(ledger=0), credits_posted=2**64 - 1)]


@acase("LEDGER_MUST_NOT_BE_ZERO/precedes CODE_MUST_NOT_BE_ZERO", ["LEDGER_MUST_NOT_BE_ZERO"])
def _(e): return [acct(ledger=0, code=0)]


@acase("CODE_MUST_NOT_BE_ZERO/precedes EXISTS_WITH_DIFFERENT_*", ["CODE_MUST_NOT_BE_ZERO"])
def _(e): return [mod(e.accounts["a"], code=0)]


@acase("EXISTS", ["EXISTS", "EXISTS"])
def _(e): return [mod(e.accounts["a"]), mod(e.accounts["closed"])]


@acase("EXISTS/same id earlier in the batch", ["OK", "EXISTS"])
def _(e):
    a = acct(user_data=b"twice")
    return [a, mod(a)]


@acase("EXISTS_WITH_DIFFERENT_FLAGS/precedes EXISTS_WITH_DIFFERENT_USER_DATA",
       ["EXISTS_WITH_DIFFERENT_FLAGS"])
def _(e): return [mod(e.accounts["a"], flags=CLOSED, user_data=b"other")]


@acase("EXISTS_WITH_DIFFERENT_USER_DATA/precedes EXISTS_WITH_DIFFERENT_LEDGER",
       ["EXISTS_WITH_DIFFERENT_USER_DATA"])
def _(e): return [mod(e.accounts["a"], user_data=b"", ledger=2)]


@acase("EXISTS_WITH_DIFFERENT_LEDGER/precedes EXISTS_WITH_DIFFERENT_CODE",
       ["EXISTS_WITH_DIFFERENT_LEDGER"])
def _(e): return [mod(e.accounts["a"], ledger=2, code=99)]


@acase("EXISTS_WITH_DIFFERENT_CODE", ["EXISTS_WITH_DIFFERENT_CODE"])
def _(e): return [mod(e.accounts["a"], code=99)]


@acase("EXISTS_WITH_DIFFERENT_FLAGS/same id earlier in the batch", ["OK", "EXISTS_WITH_DIFFERENT_FLAGS"])
def _(e):
    a = acct()
    return [a, mod(a, flags=CLOSED)]



# -- running the table ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shared_database_url(postgres):
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.psql(f"CREATE DATABASE {name};")
    return postgres.get_uri(name)


@pytest_asyncio.fixture(scope="module")
async def shared_app(shared_database_url, redis_url, tmp_path_factory):
    """One engine for every case that keeps the real clock (each case has its own Env)."""
    app = await app_module.start(Settings(
        listen="127.0.0.1:0", database_url=shared_database_url, redis_url=redis_url,
        data_dir=tmp_path_factory.mktemp("results"), shards=4, lease_wait_seconds=5))
    yield app
    await app.stop(0)


@pytest_asyncio.fixture(scope="module")
async def shared_stub(shared_app):
    async with grpc.aio.insecure_channel(shared_app.address) as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


@pytest_asyncio.fixture(scope="module")
async def shared_db(shared_database_url, shared_app):
    conn = await asyncpg.connect(shared_database_url)
    yield conn
    await conn.close()


@pytest_asyncio.fixture
async def env(shared_app, shared_stub, shared_db):
    e = Env(shared_stub, shared_db, shared_app.engine)
    await e.setup()
    return e


@pytest_asyncio.fixture
async def own_env(engine_app, stub, db):
    """An Env on an engine of its own, whose clock the case may move."""
    e = Env(stub, db, engine_app.engine)
    await e.setup()
    return e


def _expected_exists_timestamp(env: Env, items: list, results, i: int) -> int:
    """EXISTS carries the original's timestamp: an earlier OK item of the request with the same
    id, or the committed one."""
    for j in range(i):
        if items[j].id == items[i].id and results[j].result == 1:  # OK
            return results[j].timestamp
    return env.ts[items[i].id]


async def _run_transfer_case(env: Env, case: Case) -> None:
    items = case.build(env)
    before = await env.balances()
    states_before = await env.pending_states()
    count_before = await env.db.fetchval("SELECT count(*) FROM transfers")
    if case.clock is not None:
        moved = case.clock(time.time_ns())
        env.engine.clock = lambda: moved
    response = await env.stub.CreateTransfers(pb.CreateTransfersRequest(transfers=items))
    results = response.results
    assert [r.index for r in results] == list(range(len(items)))
    assert [tname(r.result) for r in results] == list(case.expected)

    ok_stamps = []
    for i, r in enumerate(results):
        name = tname(r.result)
        if name == "OK":
            assert r.timestamp > 0
            ok_stamps.append(r.timestamp)
        elif name == "EXISTS":
            assert r.timestamp == _expected_exists_timestamp(env, items, results, i)
        else:
            assert r.timestamp == 0, f"item {i} ({name}) has a timestamp"
    assert ok_stamps == sorted(set(ok_stamps)), "OK timestamps must be unique and increasing"
    assert all(t > max(env.ts.values()) for t in ok_stamps)

    ok = [(i, t) for i, (t, r) in enumerate(zip(items, results)) if r.result == pb.TRANSFER_RESULT_OK]
    assert await env.db.fetchval("SELECT count(*) FROM transfers") == count_before + len(ok)
    stored: list[pb.Transfer] = []
    if ok:
        found = await env.stub.LookupTransfers(pb.LookupTransfersRequest(ids=[t.id for _, t in ok]))
        stored = list(found.transfers)
        assert [t.id for t in stored] == [t.id for _, t in ok]
    failed_new = [t.id for t in items if len(t.id) == 16 and t.id not in env.ts
                  and t.id not in {o.id for _, o in ok}]
    if failed_new:
        found = await env.stub.LookupTransfers(pb.LookupTransfersRequest(ids=failed_new))
        assert list(found.transfers) == []

    # Replay the OK items over the balances and pending states from before the request.
    pendings = {**env.stored, **{s.id: s for s in stored}}
    balances = {k: list(v) for k, v in before.items()}
    states = dict(states_before)
    amounts = dict(case.amounts)
    for (i, t), s, stamp in zip(ok, stored, ok_stamps):
        expect = mod(t, timestamp=stamp)
        if t.flags & (POST | VOID):
            p = pendings[t.pending_id]
            moved = (t.amount or p.amount) if t.flags & POST else p.amount
            expect = mod(expect, debit_account_id=p.debit_account_id,
                         credit_account_id=p.credit_account_id, ledger=p.ledger, code=p.code,
                         amount=moved)
            dr, cr = balances[p.debit_account_id], balances[p.credit_account_id]
            dr[0] -= p.amount
            cr[2] -= p.amount
            if t.flags & POST:
                dr[1] += moved
                cr[3] += moved
            assert states.get(p.id) == ST_PENDING, f"item {i} resolved a pending that was not open"
            states[p.id] = ST_POSTED if t.flags & POST else ST_VOIDED
        else:
            if t.flags & (BAL_DR | BAL_CR):
                assert i in amounts, f"the case must name the stored amount of balancing item {i}"
                expect = mod(expect, amount=amounts.pop(i))
            dr, cr = balances[t.debit_account_id], balances[t.credit_account_id]
            side = 0 if t.flags & PENDING else 1
            dr[side] += expect.amount
            cr[side + 2] += expect.amount
            if t.flags & PENDING:
                states[t.id] = ST_PENDING
        assert s == expect, f"item {i} stored as {s}, expected {expect}"
    assert not amounts, f"amounts named for items that are not OK balancing items: {amounts}"

    # Reservations that lapsed: only when the case moved the clock, and then every open
    # reservation with a timeout from before the request.
    states_after = await env.pending_states()
    lapsed = {i for i, st in states_after.items() if st == ST_EXPIRED and states.get(i) == ST_PENDING}
    if case.clock is None:
        assert not lapsed
    else:
        assert lapsed == {i for i, st in states.items() if st == ST_PENDING and i in states_before
                          and pendings[i].timeout_seconds}
    for i in lapsed:
        p = pendings[i]
        balances[p.debit_account_id][0] -= p.amount
        balances[p.credit_account_id][2] -= p.amount
        states[i] = ST_EXPIRED
    assert states_after == states

    after = await env.balances()
    assert after == {k: tuple(v) for k, v in balances.items()}
    for v in after.values():
        assert all(0 <= x <= MAX for x in v)


async def _run_account_case(env: Env, case: Case) -> None:
    items = case.build(env)
    count_before = await env.db.fetchval("SELECT count(*) FROM accounts")
    response = await env.stub.CreateAccounts(pb.CreateAccountsRequest(accounts=items))
    results = response.results
    assert [r.index for r in results] == list(range(len(items)))
    assert [aname(r.result) for r in results] == list(case.expected)
    for i, r in enumerate(results):
        name = aname(r.result)
        if name == "OK":
            assert r.timestamp > max(env.ts.values())
        elif name == "EXISTS":
            assert r.timestamp == _expected_exists_timestamp(env, items, results, i)
        else:
            assert r.timestamp == 0, f"item {i} ({name}) has a timestamp"

    ok = [(a, r.timestamp) for a, r in zip(items, results) if r.result == pb.ACCOUNT_RESULT_OK]
    assert await env.db.fetchval("SELECT count(*) FROM accounts") == count_before + len(ok)
    if ok:
        found = await env.stub.LookupAccounts(pb.LookupAccountsRequest(ids=[a.id for a, _ in ok]))
        assert list(found.accounts) == [mod(a, timestamp=ts) for a, ts in ok]
    failed_new = [a.id for a in items if len(a.id) == 16 and a.id not in env.ts
                  and a.id not in {o.id for o, _ in ok}]
    if failed_new:
        found = await env.stub.LookupAccounts(pb.LookupAccountsRequest(ids=failed_new))
        assert list(found.accounts) == []
    # Existing accounts are untouched by a replay, whatever its result.
    originals = [a for a in env.accounts.values() if a.id in {i.id for i in items}]
    if originals:
        found = await env.stub.LookupAccounts(pb.LookupAccountsRequest(ids=[a.id for a in originals]))
        assert [(a.flags, a.user_data, a.ledger, a.code, a.timestamp) for a in found.accounts] == [
            (a.flags, a.user_data, a.ledger, a.code, env.ts[a.id]) for a in originals]


SHARED = [c for c in CASES if c.clock is None]
CLOCKED = [c for c in CASES if c.clock is not None]


@pytest.mark.parametrize("case", SHARED, ids=[f"{c.kind}:{c.id}" for c in SHARED])
async def test_result(env: Env, case: Case):
    if case.kind == "transfer":
        await _run_transfer_case(env, case)
    else:
        await _run_account_case(env, case)


@pytest.mark.parametrize("case", CLOCKED, ids=[f"{c.kind}:{c.id}" for c in CLOCKED])
async def test_result_with_moved_clock(own_env: Env, case: Case):
    await _run_transfer_case(own_env, case)


def test_table_reaches_every_result():
    reached_t = {n for c in CASES if c.kind == "transfer" for n in c.expected}
    reached_a = {n for c in CASES if c.kind == "account" for n in c.expected}
    assert transfer_result_names() - reached_t == set()
    assert account_result_names() - reached_a == set()
    assert reached_t <= transfer_result_names()
    assert reached_a <= account_result_names()
    assert len({c.id for c in CASES if c.kind == "transfer"}) == len(
        [c for c in CASES if c.kind == "transfer"]), "case ids must be unique"


async def test_prepared_state(env: Env):
    """The fixture state the table relies on (so a case cannot pass for the wrong reason)."""
    rows = {r["id"]: r for r in await env.db.fetch(
        "SELECT * FROM accounts WHERE id = ANY($1::uuid[])", env.account_ids())}
    assert rows[env.big_dr]["debits_posted"] == MAX - 5
    assert rows[env.big_cr]["credits_posted"] == MAX - 5
    assert rows[env.gdr]["credits_posted"] == 100 and rows[env.gdr]["debits_posted"] == 0
    assert rows[env.drained]["credits_posted"] == rows[env.drained]["debits_posted"] == 100
    assert (rows[env.gres]["credits_posted"], rows[env.gres]["debits_pending"]) == (100, 100)
    assert (rows[env.bal]["credits_posted"], rows[env.bal]["debits_posted"]) == (60, 60)
    assert rows[env.gcr]["debits_posted"] == 50 and rows[env.gcr]["credits_posted"] == 0
    assert rows[env.gz]["credits_posted"] == 0
    assert rows[env.pend_dr]["debits_pending"] == MAX - 5
    assert rows[env.pend_cr]["credits_pending"] == MAX - 5
    for name in ("closed", "closed2", "closing"):
        assert rows[getattr(env, name)]["flags"] & CLOSED
    assert rows[env.closing]["debits_pending"] == 15 and rows[env.closing]["credits_pending"] == 40
    states = await env.pending_states()
    assert states == {
        env.p_pend.id: ST_PENDING, env.p_open.id: ST_PENDING, env.p_open2.id: ST_PENDING,
        env.p_posted.id: ST_POSTED, env.p_voided.id: ST_VOIDED, env.p_timeout.id: ST_PENDING,
        env.p_tposted.id: ST_POSTED, env.p_tvoided.id: ST_VOIDED, env.p_gres.id: ST_PENDING,
        env.p_closing.id: ST_PENDING, env.p_closing2.id: ST_PENDING}
    found = await env.stub.LookupTransfers(pb.LookupTransfersRequest(
        ids=[env.s_ledger.id, env.t0.id, env.x_post.id, env.t_bal.id]))
    assert [t.id for t in found.transfers] == [env.s_ledger.id, env.t0.id, env.x_post.id,
                                               env.t_bal.id]
    assert found.transfers[0].ledger == 2
    x_post = found.transfers[2]
    assert (x_post.debit_account_id, x_post.credit_account_id, x_post.amount, x_post.ledger,
            x_post.code) == (env.a, env.b, 20, 1, 1)
    assert found.transfers[3].amount == 60


async def test_closed_account_is_created_closed_and_rejects_both_sides(env: Env):
    found = await env.stub.LookupAccounts(pb.LookupAccountsRequest(ids=[env.closed]))
    assert found.accounts[0].flags == CLOSED
    response = await env.stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[
        tr(env.closed, env.a, 1), tr(env.a, env.closed, 1), tr(env.a, env.b, 1)]))
    assert [tname(r.result) for r in response.results] == [
        "DEBIT_ACCOUNT_CLOSED", "CREDIT_ACCOUNT_CLOSED", "OK"]
    found = await env.stub.LookupAccounts(pb.LookupAccountsRequest(ids=[env.closed]))
    acc = found.accounts[0]
    assert (acc.debits_posted, acc.credits_posted) == (0, 0)


async def test_closure_results(env: Env):
    """Every ClosureResult of CloseAccounts / ReopenAccounts, per id, in order."""
    ids = [env.f1, b"", bytes(16), env.unknown, env.f1]
    expected = [pb.CLOSURE_RESULT_OK, pb.CLOSURE_RESULT_ID_MUST_NOT_BE_ZERO,
                pb.CLOSURE_RESULT_ID_MUST_NOT_BE_ZERO, pb.CLOSURE_RESULT_ACCOUNT_NOT_FOUND,
                pb.CLOSURE_RESULT_OK]
    closed = await env.stub.CloseAccounts(pb.CloseAccountsRequest(ids=ids))
    assert [(r.index, r.result) for r in closed.results] == list(enumerate(expected))
    assert [r.timestamp > 0 for r in closed.results] == [True, False, False, False, True]
    response = await env.stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[
        tr(env.f1, env.f2, 1), tr(env.f2, env.f1, 1)]))
    assert [tname(r.result) for r in response.results] == [
        "DEBIT_ACCOUNT_CLOSED", "CREDIT_ACCOUNT_CLOSED"]
    reopened = await env.stub.ReopenAccounts(pb.ReopenAccountsRequest(ids=ids))
    assert [(r.index, r.result) for r in reopened.results] == list(enumerate(expected))
    found = await env.stub.LookupAccounts(pb.LookupAccountsRequest(ids=[env.f1, env.closed]))
    assert [a.flags for a in found.accounts] == [0, CLOSED]
    response = await env.stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[
        tr(env.f1, env.f2, 1)]))
    assert [tname(r.result) for r in response.results] == ["OK"]



# -- a model of the documented rules, against random batches -------------------------------------

_MODEL_FIELDS = ("flags", "debit_account_id", "credit_account_id", "amount", "pending_id",
                 "user_data", "timeout_seconds", "code", "ledger")
_DIFFERENT = {
    "flags": "EXISTS_WITH_DIFFERENT_FLAGS",
    "debit_account_id": "EXISTS_WITH_DIFFERENT_DEBIT_ACCOUNT_ID",
    "credit_account_id": "EXISTS_WITH_DIFFERENT_CREDIT_ACCOUNT_ID",
    "amount": "EXISTS_WITH_DIFFERENT_AMOUNT",
    "pending_id": "EXISTS_WITH_DIFFERENT_PENDING_ID",
    "user_data": "EXISTS_WITH_DIFFERENT_USER_DATA",
    "timeout_seconds": "EXISTS_WITH_DIFFERENT_TIMEOUT",
    "code": "EXISTS_WITH_DIFFERENT_CODE",
    "ledger": "EXISTS_WITH_DIFFERENT_LEDGER",
}


class Model:
    """The transfer rules as the brief and DESIGN.md state them, one item at a time."""

    def __init__(self, accounts: dict[bytes, pb.Account]):
        self.accounts = {i: {"ledger": a.ledger, "flags": a.flags, "dp": 0, "dpo": 0, "cp": 0,
                             "cpo": 0} for i, a in accounts.items()}
        self.transfers: dict[bytes, pb.Transfer] = {}

    @staticmethod
    def _key(t: pb.Transfer, field: str):
        value = getattr(t, field)
        return value or (bytes(16) if field == "pending_id" else value)

    def evaluate(self, t: pb.Transfer, accounts, transfers) -> str:
        zero = (b"", bytes(16))
        if t.timestamp:
            return "TIMESTAMP_MUST_BE_ZERO"
        if t.flags & ~T_LINKED:
            return "RESERVED_FLAG"
        for field, name in (("id", "ID_MUST_NOT_BE_ZERO"),
                            ("debit_account_id", "DEBIT_ACCOUNT_ID_MUST_NOT_BE_ZERO"),
                            ("credit_account_id", "CREDIT_ACCOUNT_ID_MUST_NOT_BE_ZERO")):
            if getattr(t, field) in zero:
                return name
        if t.debit_account_id == t.credit_account_id:
            return "ACCOUNTS_MUST_BE_DIFFERENT"
        if t.pending_id not in zero:
            return "PENDING_ID_MUST_BE_ZERO"
        if t.timeout_seconds:
            return "TIMEOUT_RESERVED_FOR_PENDING_TRANSFER"
        if not t.ledger:
            return "LEDGER_MUST_NOT_BE_ZERO"
        if not t.code:
            return "CODE_MUST_NOT_BE_ZERO"
        if not t.amount:
            return "AMOUNT_MUST_NOT_BE_ZERO"
        dr, cr = accounts.get(t.debit_account_id), accounts.get(t.credit_account_id)
        if dr is None:
            return "DEBIT_ACCOUNT_NOT_FOUND"
        if cr is None:
            return "CREDIT_ACCOUNT_NOT_FOUND"
        if dr["ledger"] != cr["ledger"]:
            return "ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER"
        if t.ledger != dr["ledger"]:
            return "TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS"
        original = transfers.get(t.id)
        if original is not None:
            for field in _MODEL_FIELDS:
                if self._key(t, field) != self._key(original, field):
                    return _DIFFERENT[field]
            return "EXISTS"
        if dr["flags"] & CLOSED:
            return "DEBIT_ACCOUNT_CLOSED"
        if cr["flags"] & CLOSED:
            return "CREDIT_ACCOUNT_CLOSED"
        if dr["dpo"] + t.amount > MAX:
            return "OVERFLOWS_DEBITS_POSTED"
        if cr["cpo"] + t.amount > MAX:
            return "OVERFLOWS_CREDITS_POSTED"
        if dr["dp"] + dr["dpo"] + t.amount > MAX:
            return "OVERFLOWS_DEBITS"
        if cr["cp"] + cr["cpo"] + t.amount > MAX:
            return "OVERFLOWS_CREDITS"
        if dr["flags"] & DMNEC and dr["dp"] + dr["dpo"] + t.amount > dr["cpo"]:
            return "EXCEEDS_CREDITS"
        if cr["flags"] & CMNED and cr["cp"] + cr["cpo"] + t.amount > cr["dpo"]:
            return "EXCEEDS_DEBITS"
        return "OK"

    def apply(self, batch: list[pb.Transfer]) -> list[str]:
        """Results of one request; commits its successful chains into the model."""
        out: list[str] = [""] * len(batch)
        start = 0
        while start < len(batch):
            end = start
            while batch[end].flags & T_LINKED and end + 1 < len(batch):
                end += 1
            if batch[end].flags & T_LINKED:
                out[start:end + 1] = ["LINKED_EVENT_FAILED"] * (end - start) + [
                    "LINKED_EVENT_CHAIN_OPEN"]
                break
            accounts = {i: dict(a) for i, a in self.accounts.items()}
            transfers = dict(self.transfers)
            failed = None
            for i in range(start, end + 1):
                t = batch[i]
                out[i] = self.evaluate(t, accounts, transfers)
                if out[i] == "OK":
                    accounts[t.debit_account_id]["dpo"] += t.amount
                    accounts[t.credit_account_id]["cpo"] += t.amount
                    transfers[t.id] = t
                elif out[i] != "EXISTS":
                    failed = i
                    break
            if failed is not None and end > start:
                for i in range(start, end + 1):
                    if i != failed:
                        out[i] = "LINKED_EVENT_FAILED"
            elif failed is None:
                self.accounts, self.transfers = accounts, transfers
            start = end + 1
        return out


def _random_transfer(rng, env: Env, names: list[str], history: list[pb.Transfer]) -> pb.Transfer:
    p = rng.random()
    if history and p < 0.25:
        original = rng.choice(history)
        q = rng.random()
        if q < 0.5:
            return mod(original)
        field = rng.choice(["flags", "debit_account_id", "credit_account_id", "amount",
                            "user_data", "code", "ledger", "pending_id", "timeout_seconds"])
        value = {
            "flags": original.flags ^ T_LINKED,
            "debit_account_id": getattr(env, rng.choice(names)),
            "credit_account_id": getattr(env, rng.choice(names)),
            "amount": original.amount + 1,
            "user_data": bytes([rng.randrange(256)]),
            "code": original.code + 1,
            "ledger": rng.choice([1, 2]),
            "pending_id": new_id(),
            "timeout_seconds": 1,
        }[field]
        return mod(original, **{field: value})
    if rng.random() < 0.9:  # mostly a valid pair: same ledger, open accounts
        ledger = rng.choice([1, 1, 1, 2])
        pool = [n for n in names if env.accounts[n].ledger == ledger
                and not env.accounts[n].flags & CLOSED]
        debit, credit = rng.sample(pool, 2)
    else:
        debit, credit = rng.sample(names, 2)
        ledger = env.accounts[debit].ledger
    p = rng.random()
    amount = (rng.randint(1, 120) if p < 0.85 else MAX - rng.randint(0, 3) if p < 0.9
              else rng.randint(2**61, 2**62) if p < 0.95 else 0)
    t = tr(getattr(env, debit), getattr(env, credit), amount, ledger=ledger,
           code=rng.randint(1, 3), user_data=rng.choice([b"", b"x", b"y" * 16]))
    r = rng.random()
    if r < 0.02:
        t.timestamp = rng.randint(1, 2**40)
    elif r < 0.04:
        t.flags = UNKNOWN_FLAG
    elif r < 0.06:
        t.ledger = 0
    elif r < 0.07:
        t.id = bytes(16)
    elif r < 0.08:
        t.credit_account_id = t.debit_account_id
    elif r < 0.10:
        t.debit_account_id = new_id()
    return t


@pytest.mark.parametrize("seed", range(4))
async def test_random_batches_match_a_model_of_the_documented_rules(env: Env, seed):
    """Sequential random requests (duplicates, replays with changed fields, chains, invalid
    items, limits, overflows, closed accounts): every result and every balance equals what the
    documented rules give, item by item."""
    rng = random.Random(seed)
    names = [n for n in env.accounts if n != "closing"]  # closed after creation
    # Start the model from the prepared state, as the engine sees it.
    model = Model({env.accounts[n].id: env.accounts[n] for n in names})
    balances = await env.balances()
    for i, acc in model.accounts.items():
        acc["dp"], acc["dpo"], acc["cp"], acc["cpo"] = balances[i]
    for t in (env.t0, env.tl, env.tl2, env.t_drain, env.t_big):
        model.transfers[t.id] = t
    history: list[pb.Transfer] = [env.t0, env.tl, env.tl2, env.t_drain, env.t_big]
    last_stamp = max(env.ts.values())
    stamps: dict[bytes, int] = {k: v for k, v in env.ts.items()}
    stored_before = await env.db.fetchval("SELECT count(*) FROM transfers")
    committed = 0
    for number in range(60):
        batch = []
        for _ in range(rng.randint(1, 25)):
            if rng.random() < 0.2:
                chain = [_random_transfer(rng, env, names, history) for _ in range(rng.randint(2, 4))]
                for t in chain[:-1]:
                    t.flags |= T_LINKED
                batch.extend(chain)
            else:
                batch.append(_random_transfer(rng, env, names, history))
            if batch and rng.random() < 0.1:
                batch.append(mod(rng.choice(batch)))  # the same id again in the batch
        if rng.random() < 0.05:
            batch[-1].flags |= T_LINKED  # an open chain
        expected = model.apply(batch)
        response = await env.stub.CreateTransfers(pb.CreateTransfersRequest(transfers=batch))
        got = [tname(r.result) for r in response.results]
        assert got == expected, f"batch {number}: " + ", ".join(
            f"[{i}] got {g} expected {e}" for i, (g, e) in enumerate(zip(got, expected)) if g != e)
        for t, r in zip(batch, response.results):
            if r.result == pb.TRANSFER_RESULT_OK:
                assert r.timestamp > last_stamp
                last_stamp = r.timestamp
                stamps[t.id] = r.timestamp
                history.append(t)
                committed += 1
            elif r.result == pb.TRANSFER_RESULT_EXISTS:
                assert r.timestamp == stamps[t.id]
            else:
                assert r.timestamp == 0
    balances = await env.balances()
    for i, acc in model.accounts.items():
        assert balances[i] == (acc["dp"], acc["dpo"], acc["cp"], acc["cpo"])
    assert await env.db.fetchval("SELECT count(*) FROM transfers") == stored_before + committed
    assert committed > 150
