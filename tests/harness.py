"""Real parts for tests: an engine in a subprocess, and helpers to build requests."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import grpc

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import from_int, new_id

ROOT = pathlib.Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 60.0


class EngineProcess:
    """`python -m engine serve` on a loopback port picked by the engine (port 0)."""

    def __init__(self, database_url: str, redis_url: str, *, shards: int = 4,
                 extra_env: dict[str, str] | None = None):
        self.database_url = database_url
        self.redis_url = redis_url
        self.shards = shards
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen | None = None
        self.address: str | None = None
        self.lines: list[str] = []
        self._serving = threading.Event()

    def start(self, timeout: float = START_TIMEOUT_SECONDS) -> str:
        env = {**os.environ, "TXENGINE_LOG_FORMAT": "json", **self.extra_env}
        self._serving.clear()
        self.address = None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine", "serve", "--listen", "127.0.0.1:0",
             "--database-url", self.database_url, "--redis-url", self.redis_url,
             "--shards", str(self.shards)],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        if not self._serving.wait(timeout):
            self.kill()
            raise RuntimeError("engine did not start:\n" + "\n".join(self.lines[-40:]))
        return self.address

    def _read(self, proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            self.lines.append(line.rstrip())
            if '"serving"' in line:
                self.address = json.loads(line)["listen"]
                self._serving.set()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout: float = 30) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def channel(self) -> grpc.Channel:
        assert self.address
        return grpc.insecure_channel(self.address)

    def stub(self) -> ledger_pb2_grpc.LedgerServiceStub:
        return ledger_pb2_grpc.LedgerServiceStub(self.channel())


def wait_serving(stub, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            stub.LookupAccounts(pb.LookupAccountsRequest(ids=[]), timeout=1)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def account(id: bytes | int | None = None, *, ledger: int = 1, code: int = 10, flags: int = 0,
            user_data: bytes = b"") -> pb.Account:
    if id is None:
        id = new_id()
    elif isinstance(id, int):
        id = from_int(id)
    return pb.Account(id=id, ledger=ledger, code=code, flags=flags, user_data=user_data)


def transfer(debit: bytes, credit: bytes, amount: int, *, id: bytes | int | None = None,
             ledger: int = 1, code: int = 1, flags: int = 0, user_data: bytes = b"",
             **fields) -> pb.Transfer:
    if id is None:
        id = new_id()
    elif isinstance(id, int):
        id = from_int(id)
    return pb.Transfer(id=id, debit_account_id=debit, credit_account_id=credit, amount=amount,
                       ledger=ledger, code=code, flags=flags, user_data=user_data, **fields)
