"""The chaos workload: concurrent gRPC clients moving money and retrying through faults.

Accounts: per ledger (1 and 2) one unguarded "world" account that funds the others, guarded
accounts (DEBITS_MUST_NOT_EXCEED_CREDITS, funded at start) and plain ones. Each client task
loops over a seeded mix of:
  * new requests: 1..max_batch random transfers, sometimes with a linked chain of 2-3 (some
    chains carry an item that must fail), some items that must fail a business rule;
  * identical retries of an earlier request (same ids, same fields);
  * conflicting retries: an acknowledged transfer again with its amount changed;
  * concurrent duplicates: one new request sent by two senders at the same moment;
  * malformed requests (an id of 15 bytes or user_data of 17 bytes): INVALID_ARGUMENT.
After every ambiguous error (UNAVAILABLE, DEADLINE_EXCEEDED, a broken connection, INTERNAL)
the same request is sent again, unchanged, until a definite answer or the end of the drain.
Every request, attempt and outcome goes to the history log (history.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
from collections import Counter

import grpc

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id

from chaos.history import AMBIGUOUS_CODES, HistoryLog, account_json, transfer_json

LINKED = pb.TRANSFER_FLAGS_LINKED
PENDING = pb.TRANSFER_FLAGS_PENDING
POST = pb.TRANSFER_FLAGS_POST_PENDING_TRANSFER
VOID = pb.TRANSFER_FLAGS_VOID_PENDING_TRANSFER
BALANCING_DEBIT = pb.TRANSFER_FLAGS_BALANCING_DEBIT
GUARDED = pb.ACCOUNT_FLAGS_DEBITS_MUST_NOT_EXCEED_CREDITS
TR_OK = pb.TRANSFER_RESULT_OK
TR_EXISTS = pb.TRANSFER_RESULT_EXISTS
AR_OK = pb.ACCOUNT_RESULT_OK
AR_EXISTS = pb.ACCOUNT_RESULT_EXISTS
LEDGERS = (1, 2)
# Definite errors worth another try later (the attempt changed nothing).
RETRY_LATER_CODES = frozenset({"RESOURCE_EXHAUSTED"})

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
    ("grpc.enable_retries", 0),
]


@dataclasses.dataclass
class WorkloadConfig:
    clients: int = 4
    guarded_per_ledger: int = 3
    plain_per_ledger: int = 2
    funding: int = 5_000
    max_amount: int = 400
    max_batch: int = 6
    rpc_timeout: float = 3.0
    think_seconds: tuple[float, float] = (0.005, 0.02)
    hot_share: float = 0.0  # share of transfers touching the hot account (ledger 1, guarded)
    p_chain: float = 0.2
    p_identical_retry: float = 0.08
    p_conflict: float = 0.04
    p_duplicate: float = 0.04
    p_invalid: float = 0.03
    p_business_failure: float = 0.05
    # Two-phase and balancing transfers (switched off by setup() when the engine answers
    # UNIMPLEMENTED): share of new items that are pending (timeouts from pending_timeouts) or
    # balancing, and of requests that post or void earlier pending transfers.
    two_phase: bool = True
    p_pending: float = 0.12
    p_balancing: float = 0.03
    p_resolve: float = 0.12
    pending_timeouts: tuple[int, ...] = (0, 0, 0, 1, 2, 3_600)
    max_requests: int = 20_000  # per client


@dataclasses.dataclass
class Sent:
    """A request as sent (kept for identical retries)."""

    items: list[pb.Transfer]


class Workload:
    def __init__(self, address: str, history: HistoryLog, config: WorkloadConfig, seed: int):
        self.address = address
        self.history = history
        self.config = config
        self.seed = seed
        self.rng = random.Random(seed)
        self.stats: Counter = Counter()
        self.acked_ids: set[bytes] = set()
        self._req_ids = itertools.count(1)
        self._sent: list[Sent] = []
        self._acked_items: list[pb.Transfer] = []
        self._open_pending: list[pb.Transfer] = []
        self.two_phase = config.two_phase
        self._stopping = False
        self._abandon = False
        self._clients: list[asyncio.Task] = []
        self._inflight: set[asyncio.Task] = set()
        self._channels: list[grpc.aio.Channel] = []
        self.accounts: dict[int, dict[str, list[bytes]]] = {}
        self.hot: bytes | None = None
        self.unknown_account = new_id()

    # -- channels ----------------------------------------------------------------------------

    def channel(self, address: str | None = None) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address or self.address, options=CHANNEL_OPTIONS)
        self._channels.append(channel)
        return channel

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
        self._channels.clear()

    # -- sending -----------------------------------------------------------------------------

    def _new_request(self, op: str, items, kind: str, client: int, of: int | None = None) -> int:
        req = next(self._req_ids)
        encode = transfer_json if op == "transfers" else account_json
        self.history.write("request", req=req, op=op, kind=kind, of=of, client=client,
                           items=[encode(i) for i in items])
        self.stats["requests"] += 1
        self.stats[f"requests_{kind}"] += 1
        return req

    async def send(self, stub, op: str, items: list, kind: str, client: int, *,
                   of: int | None = None, retry: bool = True, timeout: float | None = None,
                   retry_interval: float | None = None, until: float | None = None):
        """Send one request; after an ambiguous error send it again, unchanged, until a
        definite answer (or the drain ends). Returns ("ok", results) or ("error", code)."""
        req = self._new_request(op, items, kind, client, of)
        timeout = timeout or self.config.rpc_timeout
        attempt = 0
        while True:
            self.history.write("invoke", req=req, attempt=attempt)
            self.stats["attempts"] += 1
            try:
                if op == "transfers":
                    response = await stub.CreateTransfers(
                        pb.CreateTransfersRequest(transfers=items), timeout=timeout)
                else:
                    response = await stub.CreateAccounts(
                        pb.CreateAccountsRequest(accounts=items), timeout=timeout)
                results = [(r.result, r.timestamp) for r in response.results]
                self.history.write("ok", req=req, attempt=attempt, results=results)
                self._count_results(op, items, results)
                return "ok", results
            except grpc.aio.AioRpcError as error:
                code, detail = error.code().name, (error.details() or "")[:200]
            except asyncio.CancelledError:
                self.history.write("fail", req=req, attempt=attempt, code="CANCELLED",
                                   ambiguous=True, detail="cancelled by the harness")
                self.stats["unresolved_requests"] += 1
                raise
            except Exception as error:  # noqa: BLE001 - a broken connection, seen locally
                code, detail = "LOCAL_ERROR", repr(error)[:200]
            ambiguous = code in AMBIGUOUS_CODES
            self.history.write("fail", req=req, attempt=attempt, code=code, ambiguous=ambiguous,
                               detail=detail)
            self.stats[f"status_{code}"] += 1
            if ambiguous:
                self.stats["ambiguous_attempts"] += 1
            elif code not in RETRY_LATER_CODES:
                return "error", code
            if not retry or self._abandon or (until is not None and time.monotonic() > until):
                if ambiguous:
                    self.stats["unresolved_requests"] += 1
                return "error", code
            attempt += 1
            self.stats["retries"] += 1
            pause = retry_interval if retry_interval is not None else \
                min(0.5, 0.05 * 2 ** min(attempt, 4)) * (0.5 + random.random())
            await asyncio.sleep(pause)

    def _count_results(self, op: str, items, results) -> None:
        if op != "transfers":
            return
        for item, (result, _) in zip(items, results):
            if result == TR_OK:
                self.stats["acked_ok"] += 1
                self.acked_ids.add(item.id)
                self._acked_items.append(item)
                if item.flags & PENDING:
                    self._open_pending.append(item)
                    if len(self._open_pending) > 2_000:
                        del self._open_pending[:500]
                if len(self._acked_items) > 5_000:
                    del self._acked_items[:1_000]
            elif result == TR_EXISTS:
                self.stats["acked_exists"] += 1
            else:
                self.stats["item_failures"] += 1

    # -- set-up ------------------------------------------------------------------------------

    async def setup(self, timeout: float = 60) -> None:
        """Create the accounts and fund them from each ledger's world account."""
        stub = ledger_pb2_grpc.LedgerServiceStub(self.channel())
        until = time.monotonic() + timeout
        accounts = []
        for ledger in LEDGERS:
            world = pb.Account(id=new_id(), ledger=ledger, code=1)
            guarded = [pb.Account(id=new_id(), ledger=ledger, code=2, flags=GUARDED)
                       for _ in range(self.config.guarded_per_ledger)]
            plain = [pb.Account(id=new_id(), ledger=ledger, code=3)
                     for _ in range(self.config.plain_per_ledger)]
            self.accounts[ledger] = {"world": [world.id], "guarded": [a.id for a in guarded],
                                     "plain": [a.id for a in plain]}
            accounts += [world, *guarded, *plain]
        self.hot = self.accounts[1]["guarded"][0]
        status, results = await self.send(stub, "accounts", accounts, "setup", -1, until=until,
                                          retry_interval=0.1)
        assert status == "ok" and {r for r, _ in results} <= {AR_OK, AR_EXISTS}, results
        funding = []
        for ledger in LEDGERS:
            world = self.accounts[ledger]["world"][0]
            for target in self.accounts[ledger]["guarded"] + self.accounts[ledger]["plain"]:
                amount = self.config.funding * (20 if target == self.hot else 1)
                funding.append(pb.Transfer(id=new_id(), debit_account_id=world,
                                           credit_account_id=target, amount=amount,
                                           ledger=ledger, code=1))
        status, results = await self.send(stub, "transfers", funding, "setup", -1, until=until,
                                          retry_interval=0.1)
        assert status == "ok" and {r for r, _ in results} <= {TR_OK, TR_EXISTS}, results
        if self.two_phase:
            world, plain = self.accounts[1]["world"][0], self.accounts[1]["plain"][0]
            probe = pb.Transfer(id=new_id(), debit_account_id=world, credit_account_id=plain,
                                amount=1, ledger=1, code=1, flags=PENDING)
            status, results = await self.send(stub, "transfers", [probe], "setup", -1,
                                              until=until, retry_interval=0.1)
            self.two_phase = status == "ok"
            self.stats["two_phase_served"] = int(self.two_phase)

    # -- request generation ------------------------------------------------------------------

    def _pick_pair(self, rng: random.Random, ledger: int) -> tuple[bytes, bytes]:
        book = self.accounts[ledger]
        everyone = book["world"] + book["guarded"] + book["plain"]
        if self.config.hot_share and ledger == 1 and rng.random() < self.config.hot_share:
            other = rng.choice([a for a in everyone if a != self.hot])
            return (self.hot, other) if rng.random() < 0.5 else (other, self.hot)
        debit, credit = rng.sample(everyone, 2)
        return debit, credit

    def _transfer(self, rng: random.Random, *, flags: int = 0, fail: bool = False) -> pb.Transfer:
        ledger = rng.choice(LEDGERS)
        debit, credit = self._pick_pair(rng, ledger)
        amount = rng.randint(1, self.config.max_amount)
        t = pb.Transfer(id=new_id(), debit_account_id=debit, credit_account_id=credit,
                        amount=amount, ledger=ledger, code=rng.randint(1, 3), flags=flags)
        if rng.random() < 0.2:
            t.user_data = rng.randbytes(rng.randint(1, 16))
        if self.two_phase:
            r = rng.random()
            if r < self.config.p_pending:
                t.flags |= PENDING
                t.timeout_seconds = rng.choice(self.config.pending_timeouts)
            elif r < self.config.p_pending + self.config.p_balancing:
                # Ask for more than the guarded account holds: the engine takes what is there.
                t.flags |= BALANCING_DEBIT
                t.debit_account_id = rng.choice(self.accounts[ledger]["guarded"])
                if t.credit_account_id == t.debit_account_id:
                    t.credit_account_id = self.accounts[ledger]["world"][0]
                t.amount = rng.choice([rng.randint(1, self.config.max_amount), 10**9])
        if fail or rng.random() < self.config.p_business_failure:
            how = rng.randrange(6)
            other_ledger = LEDGERS[1] if ledger == LEDGERS[0] else LEDGERS[0]
            if how == 0:
                t.amount = 0  # AMOUNT_MUST_NOT_BE_ZERO
            elif how == 1:
                t.credit_account_id = t.debit_account_id  # ACCOUNTS_MUST_BE_DIFFERENT
            elif how == 2:
                t.credit_account_id = self.accounts[other_ledger]["plain"][0]  # SAME_LEDGER
            elif how == 3:
                t.debit_account_id = self.unknown_account  # DEBIT_ACCOUNT_NOT_FOUND
            elif how == 4:
                t.ledger = 99  # TRANSFER_MUST_HAVE_THE_SAME_LEDGER_AS_ACCOUNTS
            else:
                t.debit_account_id = rng.choice(self.accounts[ledger]["guarded"])
                if t.credit_account_id == t.debit_account_id:
                    t.credit_account_id = self.accounts[ledger]["world"][0]
                t.amount = 10**12  # EXCEEDS_CREDITS
        return t

    def _resolution(self, rng: random.Random) -> pb.Transfer | None:
        """Post (all or part) or void an acknowledged pending transfer; now and then one that
        was already resolved (PENDING_TRANSFER_ALREADY_*), or expired."""
        if not self._open_pending:
            return None
        k = rng.randrange(len(self._open_pending))
        pending = self._open_pending[k] if rng.random() < 0.15 else self._open_pending.pop(k)
        post = rng.random() < 0.6
        t = pb.Transfer(id=new_id(), pending_id=pending.id, flags=POST if post else VOID)
        if post and rng.random() < 0.5:
            t.amount = rng.randint(1, pending.amount)
        if rng.random() < 0.5:  # the pending's fields may be repeated, or left zero
            t.debit_account_id = pending.debit_account_id
            t.credit_account_id = pending.credit_account_id
            t.ledger, t.code = pending.ledger, pending.code
        return t

    def _new_items(self, rng: random.Random) -> list[pb.Transfer]:
        if self.two_phase and self._open_pending and rng.random() < self.config.p_resolve:
            items = [t for t in (self._resolution(rng) for _ in range(rng.randint(1, 3))) if t]
            if len(items) > 1 and rng.random() < 0.3:
                for t in items[:-1]:
                    t.flags |= LINKED
            if items:
                return items
        items = [self._transfer(rng) for _ in range(rng.randint(1, self.config.max_batch))]
        if rng.random() < self.config.p_chain:
            length = rng.randint(2, 3)
            failing = rng.randrange(length) if rng.random() < 0.3 else -1
            chain = [self._transfer(rng, flags=LINKED if k < length - 1 else 0, fail=k == failing)
                     for k in range(length)]
            at = rng.randint(0, len(items))
            items[at:at] = chain
        return items

    # -- clients -----------------------------------------------------------------------------

    async def _client(self, client: int) -> None:
        rng = random.Random(self.seed * 1_000 + client)
        stub = ledger_pb2_grpc.LedgerServiceStub(self.channel())
        dup_stub = ledger_pb2_grpc.LedgerServiceStub(self.channel())
        low, high = self.config.think_seconds
        for _ in range(self.config.max_requests):
            if self._stopping:
                return
            r = rng.random()
            p = self.config
            if r < p.p_identical_retry and self._sent:
                original = rng.choice(self._sent)
                await self._tracked(self.send(stub, "transfers", list(original.items),
                                              "retry_identical", client))
            elif r < p.p_identical_retry + p.p_conflict and self._acked_items:
                original = rng.choice(self._acked_items)
                changed = pb.Transfer()
                changed.CopyFrom(original)
                changed.flags &= ~LINKED  # alone, a chain item would be an open chain
                if rng.random() < 0.7:
                    changed.amount = original.amount + rng.randint(1, 5)
                else:
                    changed.user_data = original.user_data + b"!" if len(original.user_data) < 16 \
                        else b"?"
                await self._tracked(
                    self.send(stub, "transfers", [changed], "retry_conflict", client))
            elif r < p.p_identical_retry + p.p_conflict + p.p_duplicate:
                items = self._new_items(rng)
                self._remember(items)
                await asyncio.gather(
                    self._tracked(self.send(stub, "transfers", items, "duplicate", client)),
                    self._tracked(
                        self.send(dup_stub, "transfers", list(items), "duplicate", client)))
            elif r < p.p_identical_retry + p.p_conflict + p.p_duplicate + p.p_invalid:
                items = self._new_items(rng)
                bad = rng.randrange(len(items))
                if rng.random() < 0.5:
                    items[bad].id = items[bad].id[:15]
                else:
                    items[bad].user_data = bytes(17)
                await self._tracked(self.send(stub, "transfers", items, "invalid", client))
            else:
                items = self._new_items(rng)
                self._remember(items)
                await self._tracked(self.send(stub, "transfers", items, "new", client))
            await asyncio.sleep(rng.uniform(low, high))

    def _remember(self, items: list[pb.Transfer]) -> None:
        self._sent.append(Sent(list(items)))
        if len(self._sent) > 2_000:
            del self._sent[:500]

    async def _tracked(self, coro):
        task = asyncio.ensure_future(coro)
        self._inflight.add(task)
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._inflight.discard(task)

    def start(self) -> None:
        self._stopping = False
        self._abandon = False
        self._clients = [asyncio.create_task(self._client(c), name=f"chaos-client-{c}")
                         for c in range(self.config.clients)]

    def stop(self) -> None:
        """Issue no new requests; requests in flight keep retrying (see drain)."""
        self._stopping = True

    async def drain(self, timeout: float = 30) -> None:
        """Wait for every request in flight to get a definite answer, at most `timeout`;
        then stop retrying, and cancel whatever is still waiting after one more RPC timeout."""
        self.stop()
        pending = [t for t in self._clients + list(self._inflight) if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)
        self._abandon = True
        pending = [t for t in self._clients + list(self._inflight) if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.config.rpc_timeout + 2)
        for task in self._clients + list(self._inflight):
            if not task.done():
                task.cancel()
        await asyncio.gather(*self._clients, *self._inflight, return_exceptions=True)
        self._inflight.clear()
        self.history.flush()

    # -- probes ------------------------------------------------------------------------------

    async def probe_commit(self, timeout: float = 60, interval: float = 0.02) -> float | None:
        """Send one new transfer (unguarded accounts), retrying it with the same id every
        `interval` until it commits; returns the seconds that took, or None."""
        stub = ledger_pb2_grpc.LedgerServiceStub(self.channel())
        world, plain = self.accounts[1]["world"][0], self.accounts[1]["plain"][0]
        t = pb.Transfer(id=new_id(), debit_account_id=world, credit_account_id=plain, amount=1,
                        ledger=1, code=9)
        started = time.monotonic()
        status, results = await self.send(stub, "transfers", [t], "probe", -2, timeout=1.0,
                                          retry_interval=interval, until=started + timeout)
        if status == "ok" and results[0][0] in (TR_OK, TR_EXISTS):
            return time.monotonic() - started
        return None

    async def send_once(self, address: str, kind: str = "direct") -> tuple[str, object]:
        """One new request sent straight to `address`, never retried (e.g. to a fenced
        zombie engine). Logged like every other request."""
        rng = random.Random()
        stub = ledger_pb2_grpc.LedgerServiceStub(self.channel(address))
        items = self._new_items(rng)
        return await self.send(stub, "transfers", items, kind, -3, retry=False, timeout=2.0)
