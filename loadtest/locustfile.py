"""Locust load test of txengine over gRPC: a `User` whose client fires Locust request events.

    locust -f loadtest/locustfile.py --headless -u 50 -r 10 -t 30s --host 127.0.0.1:50051

Tasks (weights in brackets): one transfer per CreateTransfers [5], a batch of 100 transfers
per CreateTransfers [2], LookupAccounts of two accounts [3]. Each user creates its accounts in
`on_start` (one CreateAccounts request), unless TXENGINE_LOCUST_ACCOUNTS lists existing ones
(comma-separated, 32 hex digits each, at least two, all on the same ledger). A request fails in
Locust's statistics when the RPC fails (any gRPC status) or when an item's result is not OK.

Environment: TXENGINE_LOCUST_ACCOUNTS (see above), TXENGINE_LOCUST_ACCOUNTS_PER_USER [10],
TXENGINE_LOCUST_LEDGER [1], TXENGINE_LOCUST_WAIT_MAX seconds between tasks [0.05],
TXENGINE_LOCUST_TIMEOUT seconds per RPC [30].
"""
from __future__ import annotations

import os
import pathlib
import random
import sys
import time

# Locust runs users as greenlets: gRPC's own I/O must yield to gevent, so patch it before any
# channel exists.
import grpc
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

from locust import User, between, task  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from anywhere in a checkout
    sys.path.insert(0, str(ROOT))

from engine.gen.txengine.v1 import ledger_pb2 as pb  # noqa: E402
from engine.gen.txengine.v1 import ledger_pb2_grpc  # noqa: E402
from engine.ids import new_id  # noqa: E402

ACCOUNTS_PER_USER = int(os.environ.get("TXENGINE_LOCUST_ACCOUNTS_PER_USER", "10"))
LEDGER = int(os.environ.get("TXENGINE_LOCUST_LEDGER", "1"))
WAIT_MAX = float(os.environ.get("TXENGINE_LOCUST_WAIT_MAX", "0.05"))
TIMEOUT = float(os.environ.get("TXENGINE_LOCUST_TIMEOUT", "30"))
BATCH = 100
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 8 << 20),
                   ("grpc.max_receive_message_length", 8 << 20)]


class ResultNotOk(Exception):
    """An item of a successful RPC had a result other than OK."""


def _target(host: str | None) -> str:
    if not host:
        raise ValueError("give the engine's address with --host HOST:PORT")
    for prefix in ("grpc://", "http://"):
        if host.startswith(prefix):
            host = host[len(prefix):]
    return host.rstrip("/")


def _configured_accounts() -> list[bytes]:
    raw = os.environ.get("TXENGINE_LOCUST_ACCOUNTS", "").strip()
    if not raw:
        return []
    ids = [bytes.fromhex(part.strip()) for part in raw.split(",") if part.strip()]
    if len(ids) < 2 or any(len(i) != 16 for i in ids):
        raise ValueError("TXENGINE_LOCUST_ACCOUNTS: at least two ids of 32 hex digits")
    return ids


def _all_ok(expected: int, ok: int, enum):
    """A check that there are `expected` results, each `ok` (names from `enum` otherwise)."""

    def check(response) -> None:
        bad = [r.result for r in response.results if r.result != ok]
        if len(response.results) != expected or bad:
            names = sorted({enum.Name(b) for b in bad})
            raise ResultNotOk(f"{len(bad)} of {len(response.results)} results not OK {names}")
    return check


class GrpcClient:
    """A LedgerService stub whose calls are reported to Locust as request events."""

    def __init__(self, environment, address: str):
        self.environment = environment
        self.channel = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = ledger_pb2_grpc.LedgerServiceStub(self.channel)

    def call(self, method: str, request, *, name: str | None = None, check=None):
        began = time.perf_counter()
        response, length, exception = None, 0, None
        try:
            response = getattr(self.stub, method)(request, timeout=TIMEOUT)
            length = response.ByteSize()
            if check is not None:
                check(response)
        except (grpc.RpcError, ResultNotOk) as error:
            exception = error
        self.environment.events.request.fire(
            request_type="grpc", name=name or method,
            response_time=(time.perf_counter() - began) * 1000.0,
            response_length=length, exception=exception, context={})
        return response

    def close(self) -> None:
        self.channel.close()


class LedgerUser(User):
    """One caller of the engine: transfers between its accounts, and lookups."""

    wait_time = between(0.0, WAIT_MAX)

    def __init__(self, environment):
        super().__init__(environment)
        self.client = GrpcClient(environment, _target(self.host))
        self.accounts: list[bytes] = []

    def on_start(self) -> None:
        self.accounts = _configured_accounts()
        if self.accounts:
            return
        ids = [new_id() for _ in range(max(2, ACCOUNTS_PER_USER))]
        response = self.client.call(
            "CreateAccounts",
            pb.CreateAccountsRequest(accounts=[pb.Account(id=i, ledger=LEDGER, code=1)
                                               for i in ids]),
            check=_all_ok(len(ids), pb.ACCOUNT_RESULT_OK, pb.AccountResult))
        if response is not None:
            self.accounts = ids

    def on_stop(self) -> None:
        self.client.close()

    def _transfer(self) -> pb.Transfer:
        debit, credit = random.sample(self.accounts, 2)
        return pb.Transfer(id=new_id(), debit_account_id=debit, credit_account_id=credit,
                           amount=random.randint(1, 1_000), ledger=LEDGER, code=1)

    @task(5)
    def single_transfer(self) -> None:
        if len(self.accounts) < 2:
            return
        self.client.call("CreateTransfers",
                         pb.CreateTransfersRequest(transfers=[self._transfer()]),
                         name="CreateTransfers x1",
                         check=_all_ok(1, pb.TRANSFER_RESULT_OK, pb.TransferResult))

    @task(2)
    def batched_transfers(self) -> None:
        if len(self.accounts) < 2:
            return
        self.client.call("CreateTransfers",
                         pb.CreateTransfersRequest(
                             transfers=[self._transfer() for _ in range(BATCH)]),
                         name=f"CreateTransfers x{BATCH}",
                         check=_all_ok(BATCH, pb.TRANSFER_RESULT_OK,
                                        pb.TransferResult))

    @task(3)
    def lookup_accounts(self) -> None:
        if len(self.accounts) < 2:
            return
        ids = random.sample(self.accounts, 2)

        def found_both(response) -> None:
            if len(response.accounts) != len(ids):
                raise ResultNotOk(f"found {len(response.accounts)} of {len(ids)} accounts")

        self.client.call("LookupAccounts", pb.LookupAccountsRequest(ids=ids),
                         check=found_both)
