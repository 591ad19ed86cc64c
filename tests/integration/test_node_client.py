"""The wire contract from another language: clients/node/example.js (@grpc/grpc-js with the
.proto files loaded at run time) against the real engine. Skipped when node or npm is not on
PATH; `npm ci` runs in clients/node only when its node_modules is missing."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid

import pytest
from harness import ROOT

from engine.gen.txengine.v1 import ledger_pb2 as pb

NODE_DIR = ROOT / "clients" / "node"
NODE = shutil.which("node")
NPM = shutil.which("npm")
NPM_TIMEOUT_SECONDS = 300

pytestmark = pytest.mark.skipif(NODE is None or NPM is None, reason="needs node and npm on PATH")


def install_node_modules() -> None:
    if (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return
    command = "ci" if (NODE_DIR / "package-lock.json").exists() else "install"
    subprocess.run([NPM, command, "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True,
                   capture_output=True, timeout=NPM_TIMEOUT_SECONDS)


async def test_node_example_creates_replays_and_looks_up(engine_app, stub):
    await asyncio.to_thread(install_node_modules)
    process = await asyncio.create_subprocess_exec(
        NODE, "example.js", engine_app.address, cwd=NODE_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, (out + err).decode()
    summary = json.loads(out.decode().splitlines()[-1])
    assert (summary["first"], summary["replay"]) == ("TRANSFER_RESULT_OK",
                                                    "TRANSFER_RESULT_EXISTS")

    # What Node wrote is what Python reads: one transfer, 100 from one account to the other.
    transfer_id = uuid.UUID(summary["transfer"]).bytes
    [stored] = (await stub.LookupTransfers(pb.LookupTransfersRequest(ids=[transfer_id]))).transfers
    assert stored.amount == 100 and str(stored.timestamp) == summary["timestamp"]
    balances = {str(uuid.UUID(bytes=a.id)): (a.debits_posted, a.credits_posted) for a in (
        await stub.LookupAccounts(pb.LookupAccountsRequest(
            ids=[stored.debit_account_id, stored.credit_account_id]))).accounts}
    assert balances == {key: (int(value["debits_posted"]), int(value["credits_posted"]))
                        for key, value in summary["balances"].items()}
    assert balances[str(uuid.UUID(bytes=stored.debit_account_id))] == (100, 0)
