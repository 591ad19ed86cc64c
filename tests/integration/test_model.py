"""Stateful model test: random accounts, transfers, two-phase transfers, timeouts, balancing,
replays and restarts, applied to a real engine and to the plain-Python LedgerModel side by
side; every result, timestamp and balance must agree.

The engine runs in a thread with its own event loop so that Hypothesis can drive it with plain
synchronous gRPC calls; its commit clock is a fake one that the test moves forward.
"""
from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from engine.limits import BALANCE_MAX
from engine.posting.model import LedgerModel, ModelAccount, ModelTransfer
from engine.results import AccountFlags as AF
from engine.results import TransferFlags as TF
from engine.server import app as app_module

SECOND_NS = 10**9
ZERO = bytes(16)


class FakeClock:
    """The engine's commit clock; starts at real time so a restarted engine never runs ahead."""

    def __init__(self) -> None:
        self.now = time.time_ns()

    def __call__(self) -> int:
        return self.now


class EngineThread:
    """An in-process engine on its own event loop thread, restartable on the same database."""

    def __init__(self, settings, clock: FakeClock):
        self.settings = settings
        self.clock = clock
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = None
        self.channel = None
        self.stub = None

    def _run(self, coroutine, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> None:
        self.app = self._run(app_module.start(self.settings))
        self.app.engine.clock = self.clock
        self.channel = grpc.insecure_channel(self.app.address)
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self._run(self.app.stop(0))

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def to_pb_transfer(t: ModelTransfer) -> pb.Transfer:
    return pb.Transfer(id=t.id, debit_account_id=t.debit_account_id,
                       credit_account_id=t.credit_account_id, amount=t.amount,
                       pending_id=b"" if t.pending_id == ZERO else t.pending_id, ledger=t.ledger,
                       code=t.code, flags=t.flags, timeout_seconds=t.timeout_seconds,
                       user_data=t.user_data)


ACCOUNT_FLAGS = st.sampled_from([
    0, 0, 0, AF.DEBITS_MUST_NOT_EXCEED_CREDITS, AF.CREDITS_MUST_NOT_EXCEED_DEBITS, AF.HISTORY,
    AF.HISTORY | AF.DEBITS_MUST_NOT_EXCEED_CREDITS, AF.CLOSED,
])
TRANSFER_KINDS = st.sampled_from([
    0, 0, 0, TF.PENDING, TF.PENDING, TF.BALANCING_DEBIT, TF.BALANCING_CREDIT,
    TF.PENDING | TF.BALANCING_DEBIT, TF.BALANCING_DEBIT | TF.BALANCING_CREDIT,
])
AMOUNTS = st.one_of(st.integers(1, 500), st.integers(1, 500), st.sampled_from([0, BALANCE_MAX]))


class LedgerMachine(RuleBasedStateMachine):
    """One engine for the whole run; each example uses fresh ids, so examples never meet."""

    engine: EngineThread  # set by the test

    def __init__(self) -> None:
        super().__init__()
        self.model = LedgerModel()
        self.account_ids: list[bytes] = []
        self.transfer_ids: list[bytes] = []
        self.pending_ids: list[bytes] = []

    @property
    def stub(self):
        return self.engine.stub

    def _expire(self) -> None:
        self.model.expire(self.engine.clock.now)

    @initialize(count=st.integers(4, 8), ledgers=st.lists(st.sampled_from([1, 2]), min_size=8, max_size=8),
                flags=st.lists(ACCOUNT_FLAGS, min_size=8, max_size=8))
    def open_accounts(self, count, ledgers, flags):
        # Two unguarded accounts per ledger carry money in; the rest are random.
        accounts = [ModelAccount(id=new_id(), ledger=ledger, code=1, flags=0) for ledger in (1, 1, 2, 2)]
        accounts += [ModelAccount(id=new_id(), ledger=ledgers[k], code=2, flags=flags[k])
                     for k in range(count)]
        self._create_accounts(accounts)

    def _create_accounts(self, accounts: list[ModelAccount]) -> None:
        response = self.stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[
            pb.Account(id=a.id, ledger=a.ledger, code=a.code, flags=a.flags, user_data=a.user_data)
            for a in accounts]))
        got = [(r.result, r.timestamp) for r in response.results]
        expected = self.model.create_accounts(accounts, [ts for _, ts in got])
        assert [r for r, _ in got] == [r for r, _ in expected], (got, expected)
        assert got == [(r, ts) for r, ts in expected]
        self.account_ids.extend(a.id for a, (r, _) in zip(accounts, got) if r == pb.ACCOUNT_RESULT_OK)

    @rule(flags=ACCOUNT_FLAGS, ledger=st.sampled_from([1, 2]), linked=st.booleans())
    def create_account(self, flags, ledger, linked):
        first = ModelAccount(id=new_id(), ledger=ledger, code=3, flags=flags | (AF.LINKED if linked else 0))
        batch = [first]
        if linked:
            batch.append(ModelAccount(id=new_id(), ledger=ledger, code=3, flags=0))
        self._create_accounts(batch)

    @rule(data=st.data(), size=st.integers(1, 6))
    def create_transfers(self, data, size):
        batch = [self._draw_transfer(data) for _ in range(size)]
        self._submit(batch)

    def _draw_transfer(self, data) -> ModelTransfer:
        draw = data.draw
        choice = draw(st.sampled_from(["plain", "plain", "plain", "resolve", "replay"]))
        linked = TF.LINKED if draw(st.integers(0, 4)) == 0 else 0
        if choice == "replay" and self.transfer_ids:
            original = self.model.transfers.get(draw(st.sampled_from(self.transfer_ids)))
            if original is not None:
                field = draw(st.sampled_from(["none", "amount", "user_data", "code"]))
                changes = {"amount": {"amount": original.amount + 1},
                           "user_data": {"user_data": b"x"}, "code": {"code": original.code + 1},
                           "none": {}}[field]
                return ModelTransfer(**{**{k: getattr(original, k) for k in (
                    "id", "debit_account_id", "credit_account_id", "amount", "pending_id",
                    "ledger", "code", "flags", "timeout_seconds", "user_data")}, **changes})
        if choice == "resolve" and self.pending_ids:
            pending = draw(st.sampled_from(self.pending_ids))
            flag = draw(st.sampled_from([TF.POST_PENDING_TRANSFER, TF.VOID_PENDING_TRANSFER]))
            amount = draw(st.sampled_from([0, 0, 1, 10, 1000]))
            return ModelTransfer(id=new_id(), pending_id=pending, amount=amount, flags=flag | linked)
        debit, credit = draw(st.permutations(self.account_ids))[:2]
        ledger = self.model.accounts[debit].ledger
        kind = draw(TRANSFER_KINDS)
        timeout = draw(st.sampled_from([0, 0, 1, 5, 60])) if kind & TF.PENDING else 0
        return ModelTransfer(id=new_id(), debit_account_id=debit, credit_account_id=credit,
                             amount=draw(AMOUNTS), ledger=ledger, code=7, flags=kind | linked,
                             timeout_seconds=timeout,
                             user_data=draw(st.sampled_from([b"", b"order-1"])))

    def _submit(self, batch: list[ModelTransfer]) -> None:
        self._expire()
        response = self.stub.CreateTransfers(pb.CreateTransfersRequest(
            transfers=[to_pb_transfer(t) for t in batch]))
        got = [(r.result, r.timestamp) for r in response.results]
        now = self.engine.clock.now
        expected = self.model.create_transfers(batch, [ts or now for _, ts in got])
        assert [pb.TransferResult.Name(r) for r, _ in got] == \
            [pb.TransferResult.Name(r) for r, _ in expected], batch
        assert got == [(int(r), ts) for r, ts in expected]
        for t, (r, _) in zip(batch, got):
            if r == pb.TRANSFER_RESULT_OK:
                self.transfer_ids.append(t.id)
                if t.flags & TF.PENDING:
                    self.pending_ids.append(t.id)

    @rule(seconds=st.sampled_from([0.5, 2.5, 30.5, 3600.5]))
    def advance_time(self, seconds):
        """Whole seconds plus a half, so no expiry lands within a batch's nanoseconds."""
        self.engine.clock.now += int(seconds * SECOND_NS)
        self._expire()
        self._wait_for_engine_balances()

    @precondition(lambda self: self.account_ids)
    @rule(data=st.data(), close=st.booleans())
    def close_or_reopen(self, data, close):
        ids = [data.draw(st.sampled_from(self.account_ids)), new_id()]
        request = pb.CloseAccountsRequest(ids=ids) if close else pb.ReopenAccountsRequest(ids=ids)
        rpc = self.stub.CloseAccounts if close else self.stub.ReopenAccounts
        got = [r.result for r in rpc(request).results]
        assert got == [int(r) for r in self.model.set_closed(ids, close)]

    @precondition(lambda self: self.account_ids)
    @rule()
    def restart(self):
        self.engine.stop()
        self.engine.start()

    def _engine_balances(self) -> dict[bytes, tuple]:
        ids = list(self.model.accounts)
        found = self.stub.LookupAccounts(pb.LookupAccountsRequest(ids=ids)).accounts
        return {a.id: (a.debits_pending, a.debits_posted, a.credits_pending, a.credits_posted)
                for a in found}

    def _wait_for_engine_balances(self) -> None:
        """The engine expires reservations in its own loop; give it a moment to catch up
        (an expiry of a zero-amount reservation shows only in the history)."""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self._engine_balances() == self._model_balances() and \
                    self._engine_history() == self._model_history():
                return
            time.sleep(0.01)

    def _model_balances(self) -> dict[bytes, tuple]:
        return {i: a.balances() for i, a in self.model.accounts.items()}

    def _engine_history(self) -> dict[bytes, list]:
        """Balances rows of every HISTORY account; expiry rows carry the engine's expiry
        timestamp, which the model only bounds, so timestamps are left out."""
        history = {}
        for account in self.model.accounts.values():
            if account.flags & AF.HISTORY:
                rows = self.stub.GetAccountBalances(pb.GetAccountBalancesRequest(filter=pb.AccountFilter(
                    account_id=account.id, limit=8190,
                    flags=pb.ACCOUNT_FILTER_FLAGS_DEBITS | pb.ACCOUNT_FILTER_FLAGS_CREDITS))).balances
                history[account.id] = [(b.debits_pending, b.debits_posted, b.credits_pending,
                                        b.credits_posted) for b in rows]
        return history

    def _model_history(self) -> dict[bytes, list]:
        return {a.id: [h[1:] for h in a.history] for a in self.model.accounts.values()
                if a.flags & AF.HISTORY}

    @invariant()
    def balances_agree(self):
        self.model.check_invariants()
        assert self._engine_balances() == self._model_balances()

    @invariant()
    def history_agrees(self):
        assert self._engine_history() == self._model_history()

    @rule(data=st.data())
    @precondition(lambda self: self.account_ids)
    def account_transfers_agree(self, data):
        account_id = data.draw(st.sampled_from(self.account_ids))
        reversed_ = data.draw(st.booleans())
        flags = pb.ACCOUNT_FILTER_FLAGS_DEBITS | pb.ACCOUNT_FILTER_FLAGS_CREDITS
        if reversed_:
            flags |= pb.ACCOUNT_FILTER_FLAGS_REVERSED
        got = self.stub.GetAccountTransfers(pb.GetAccountTransfersRequest(filter=pb.AccountFilter(
            account_id=account_id, limit=8190, flags=flags))).transfers
        expected = sorted((t for t in self.model.transfers.values()
                           if account_id in (t.debit_account_id, t.credit_account_id)),
                          key=lambda t: t.timestamp, reverse=reversed_)
        assert [(t.id, t.amount, t.timestamp) for t in got] == \
            [(t.id, t.amount, t.timestamp) for t in expected]


@pytest.fixture
def engine_thread(settings):
    clock = FakeClock()
    engine = EngineThread(settings, clock)
    engine.start()
    yield engine
    engine.close()


def test_engine_matches_model(engine_thread):
    LedgerMachine.engine = engine_thread
    run_state_machine_as_test(LedgerMachine, settings=settings(
        max_examples=50, stateful_step_count=40, deadline=None,
        suppress_health_check=list(HealthCheck)))
