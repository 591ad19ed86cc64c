"""Conservation under concurrent load: several client processes send thousands of random
transfers (random pairs among ~50 accounts of two ledgers, guarded accounts, linked chains,
retries of earlier batches) to one engine process; afterwards Postgres must satisfy every
guarantee of DESIGN.md section 4 that storage can show."""
from __future__ import annotations

import asyncio
import json
import os
import sys
import textwrap
from collections import Counter, defaultdict

import grpc
import pytest

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.kernels.reference import shard_of_id
from harness import ROOT, EngineProcess, account, transfer

MAX = 2**63 - 1
DMNEC = pb.ACCOUNT_FLAGS_DEBITS_MUST_NOT_EXCEED_CREDITS
CMNED = pb.ACCOUNT_FLAGS_CREDITS_MUST_NOT_EXCEED_DEBITS
LEDGERS = (1, 2)
PER_LEDGER = 25
CLIENTS = 6
BATCHES_PER_CLIENT = 150
CLIENT_TIMEOUT_SECONDS = 120
FUNDING = 1_000

CLIENT_SCRIPT = textwrap.dedent('''
    """One load client: random batches over a sync channel; every result to a JSON-lines file."""
    import json
    import random
    import sys

    import grpc

    from engine.gen.txengine.v1 import ledger_pb2 as pb
    from engine.gen.txengine.v1 import ledger_pb2_grpc

    LINKED = pb.TRANSFER_FLAGS_LINKED

    def main(config_path):
        with open(config_path) as f:
            config = json.load(f)
        rng = random.Random(config["seed"])
        accounts = config["accounts"]
        by_ledger = {}
        for a in accounts:
            by_ledger.setdefault(a["ledger"], []).append(bytes.fromhex(a["id"]))
        ledgers = sorted(by_ledger)

        def new_id():
            return rng.getrandbits(128).to_bytes(16, "big")

        def amount():
            p = rng.random()
            if p < 0.01:
                return rng.randint(2**60, 2**62)
            if p < 0.015:
                return 0
            return rng.randint(1, 400)

        def one(flags):
            ledger = rng.choice(ledgers)
            debit, credit = rng.sample(by_ledger[ledger], 2)
            p = rng.random()
            if p < 0.02:
                credit = rng.choice(by_ledger[[l for l in ledgers if l != ledger][0]])
            elif p < 0.03:
                credit = debit
            return pb.Transfer(id=new_id(), debit_account_id=debit, credit_account_id=credit,
                               amount=amount(), ledger=ledger, code=1 + rng.randrange(3),
                               flags=flags)

        def make_batch():
            batch = []
            size = rng.randint(1, 120)
            while len(batch) < size:
                if rng.random() < 0.15:
                    length = rng.randint(2, 4)
                    batch.extend(one(LINKED) for _ in range(length - 1))
                    batch.append(one(0))
                else:
                    batch.append(one(0))
            return batch

        sent = []
        out = open(config["out"], "w")
        with grpc.insecure_channel(config["address"]) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            for number in range(config["batches"]):
                if sent and rng.random() < 0.12:
                    batch, retry = rng.choice(sent), True
                else:
                    batch, retry = make_batch(), False
                    sent.append(batch)
                response = stub.CreateTransfers(pb.CreateTransfersRequest(transfers=batch),
                                                timeout=60)
                assert [r.index for r in response.results] == list(range(len(batch)))
                for t, r in zip(batch, response.results):
                    out.write(json.dumps({
                        "batch": number, "retry": retry, "id": t.id.hex(),
                        "debit": t.debit_account_id.hex(), "credit": t.credit_account_id.hex(),
                        "amount": t.amount, "ledger": t.ledger, "code": t.code,
                        "flags": t.flags, "result": pb.TransferResult.Name(r.result),
                        "timestamp": r.timestamp,
                    }) + "\\n")
        out.close()

    if __name__ == "__main__":
        main(sys.argv[1])
''')


@pytest.fixture
def engine(database_url, redis_url):
    process = EngineProcess(database_url, redis_url, shards=4)
    process.start()
    yield process
    process.kill()


async def _setup_accounts(address: str) -> tuple[list[pb.Account], list[dict]]:
    """50 accounts; guarded ones funded. Returns the accounts and the funding results."""
    accounts: list[pb.Account] = []
    for ledger in LEDGERS:
        accounts.append(account(ledger=ledger, code=1, user_data=b"bank"))
        for i in range(1, PER_LEDGER):
            flags = DMNEC if i <= 14 else CMNED if i <= 16 else 0
            accounts.append(account(ledger=ledger, code=2, flags=flags))
    funding = []
    for ledger in LEDGERS:
        bank = next(a for a in accounts if a.ledger == ledger and a.user_data == b"bank")
        for a in accounts:
            if a.ledger != ledger:
                continue
            if a.flags == DMNEC:
                funding.append(transfer(bank.id, a.id, FUNDING, ledger=ledger))
            elif a.flags == CMNED:
                funding.append(transfer(a.id, bank.id, FUNDING, ledger=ledger))
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        response = await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=accounts))
        assert {r.result for r in response.results} == {pb.ACCOUNT_RESULT_OK}
        response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=funding))
        assert {r.result for r in response.results} == {pb.TRANSFER_RESULT_OK}
    records = [{"id": t.id.hex(), "debit": t.debit_account_id.hex(),
                "credit": t.credit_account_id.hex(), "amount": t.amount, "ledger": t.ledger,
                "code": t.code, "flags": t.flags, "result": "TRANSFER_RESULT_OK",
                "timestamp": r.timestamp, "retry": False}
               for t, r in zip(funding, response.results)]
    return accounts, records


async def _run_clients(address: str, accounts: list[pb.Account], tmp_path) -> list[dict]:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs, outs = [], []
    for n in range(CLIENTS):
        out = tmp_path / f"client{n}.jsonl"
        config = tmp_path / f"client{n}.json"
        config.write_text(json.dumps({
            "address": address, "seed": 1000 + n, "batches": BATCHES_PER_CLIENT,
            "out": str(out),
            "accounts": [{"id": a.id.hex(), "ledger": a.ledger} for a in accounts],
        }))
        procs.append(await asyncio.create_subprocess_exec(
            sys.executable, str(script), str(config), cwd=str(ROOT), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT))
        outs.append(out)
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(p.communicate() for p in procs)), CLIENT_TIMEOUT_SECONDS)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for p, (output, _) in zip(procs, results):
        assert p.returncode == 0, output.decode()[-4000:]
    records = []
    for out in outs:
        records.extend(json.loads(line) for line in out.read_text().splitlines())
    return records


async def test_conservation_under_concurrent_random_load(engine, db, tmp_path):
    await db.set_type_codec("uuid", schema="pg_catalog", encoder=bytes, decoder=bytes,
                            format="binary")
    accounts, funding = await _setup_accounts(engine.address)
    records = funding + await _run_clients(engine.address, accounts, tmp_path)

    # The load was real: thousands of transfers, most of them committed, all kinds of outcome.
    outcomes = Counter(r["result"].removeprefix("TRANSFER_RESULT_") for r in records)
    assert len(records) > 20_000, outcomes
    assert outcomes["OK"] > 10_000, outcomes
    for expected in ("EXISTS", "EXCEEDS_CREDITS", "EXCEEDS_DEBITS", "LINKED_EVENT_FAILED",
                     "ACCOUNTS_MUST_HAVE_THE_SAME_LEDGER", "ACCOUNTS_MUST_BE_DIFFERENT",
                     "AMOUNT_MUST_NOT_BE_ZERO", "OVERFLOWS_DEBITS_POSTED"):
        assert outcomes[expected] > 0, outcomes
    assert "UNSPECIFIED" not in outcomes

    # Every OK a client saw is stored exactly once with its timestamp; EXISTS carries the same
    # timestamp; nothing was stored that no client was told about.
    ok_by_id: dict[str, dict] = {}
    for r in records:
        if r["result"] == "TRANSFER_RESULT_OK":
            assert r["id"] not in ok_by_id, f"{r['id']} was OK twice"
            ok_by_id[r["id"]] = r
    for r in records:
        if r["result"] == "TRANSFER_RESULT_EXISTS":
            assert r["id"] in ok_by_id, f"EXISTS for {r['id']} which never was OK"
            assert r["timestamp"] == ok_by_id[r["id"]]["timestamp"]
        elif r["result"] != "TRANSFER_RESULT_OK":
            assert r["timestamp"] == 0
    rows = await db.fetch(
        'SELECT shard, id, debit_account_id, credit_account_id, amount, pending_id, ledger, code, '
        'flags, timeout_seconds, user_data, "timestamp", seq_shard, seq FROM transfers')
    assert len(rows) == len({r["id"] for r in rows}), "a transfer id is stored twice"
    stored = {r["id"].hex(): r for r in rows}
    assert set(stored) == set(ok_by_id)
    for tid, ack in ok_by_id.items():
        row = stored[tid]
        assert (row["debit_account_id"].hex(), row["credit_account_id"].hex(), row["amount"],
                row["ledger"], row["code"], row["flags"], row["timestamp"]) == (
            ack["debit"], ack["credit"], ack["amount"], ack["ledger"], ack["code"],
            ack["flags"], ack["timestamp"])
        assert row["pending_id"] == bytes(16) and row["timeout_seconds"] == 0

    # Linked chains: all or nothing, as the clients saw it.
    _check_chains(records)

    account_rows = {r["id"]: r for r in await db.fetch("SELECT * FROM accounts")}
    assert len(account_rows) == len(accounts)
    shard_count = int(await db.fetchval("SELECT value FROM ledger_meta WHERE key = 'shard_count'"))

    # Double entry per ledger.
    for ledger in LEDGERS:
        sums = await db.fetchrow(
            "SELECT sum(debits_posted) AS dpo, sum(credits_posted) AS cpo, "
            "sum(debits_pending) AS dp, sum(credits_pending) AS cp FROM accounts WHERE ledger = $1",
            ledger)
        assert sums["dpo"] == sums["cpo"]
        assert sums["dp"] == sums["cp"] == 0

    # Each account's balances are the sums over its transfers, and within 0..MAX.
    debits, credits = defaultdict(int), defaultdict(int)
    for row in rows:
        debits[row["debit_account_id"]] += row["amount"]
        credits[row["credit_account_id"]] += row["amount"]
        assert account_rows[row["debit_account_id"]]["ledger"] == row["ledger"]
        assert account_rows[row["credit_account_id"]]["ledger"] == row["ledger"]
    for aid, acc in account_rows.items():
        assert (acc["debits_posted"], acc["credits_posted"]) == (debits[aid], credits[aid])
        assert 0 <= acc["debits_posted"] <= MAX and 0 <= acc["credits_posted"] <= MAX
        assert acc["shard"] == shard_of_id(aid, shard_count)
        if acc["flags"] & DMNEC:
            assert acc["debits_pending"] + acc["debits_posted"] <= acc["credits_posted"]
        if acc["flags"] & CMNED:
            assert acc["credits_pending"] + acc["credits_posted"] <= acc["debits_posted"]

    # Isolation: applying the stored transfers one at a time in timestamp order never breaks a
    # limit or overflows at any point.
    balance = defaultdict(lambda: [0, 0])
    for row in sorted(rows, key=lambda r: r["timestamp"]):
        dr, cr = balance[row["debit_account_id"]], balance[row["credit_account_id"]]
        dr[0] += row["amount"]
        cr[1] += row["amount"]
        assert dr[0] <= MAX and cr[1] <= MAX
        if account_rows[row["debit_account_id"]]["flags"] & DMNEC:
            assert dr[0] <= dr[1], f"transfer {row['id'].hex()} overdraws its debit account"
        if account_rows[row["credit_account_id"]]["flags"] & CMNED:
            assert cr[1] <= cr[0], f"transfer {row['id'].hex()} overdraws its credit account"

    # Timestamps: unique across accounts and transfers.
    stamps = [r["timestamp"] for r in rows] + [a["timestamp"] for a in account_rows.values()]
    assert len(stamps) == len(set(stamps))
    assert all(s > 0 for s in stamps)

    # Per-shard order: seq is gap-free 1..last_seq, follows timestamp order, and the shard
    # is the debit account's; each transfer is stored in the shard of its own id.
    last_seq = {r["shard"]: r["last_seq"]
                for r in await db.fetch("SELECT shard, last_seq FROM shards")}
    assert set(last_seq) == set(range(shard_count))
    by_shard = defaultdict(list)
    for row in rows:
        by_shard[row["seq_shard"]].append(row)
        assert row["seq_shard"] == account_rows[row["debit_account_id"]]["shard"]
        assert row["shard"] == shard_of_id(row["id"], shard_count)
    for shard in range(shard_count):
        ordered = sorted(by_shard[shard], key=lambda r: r["seq"])
        assert [r["seq"] for r in ordered] == list(range(1, last_seq[shard] + 1)), shard
        stamps = [r["timestamp"] for r in ordered]
        assert stamps == sorted(stamps), f"shard {shard}: seq order is not timestamp order"
    assert sum(last_seq.values()) == len(rows)


def _check_chains(records: list[dict]) -> None:
    """Within each client response, a chain's items are all OK/EXISTS or none is."""
    chain: list[dict] = []
    for r in records:
        chain.append(r)
        if r["flags"] & pb.TRANSFER_FLAGS_LINKED:
            continue
        results = {c["result"].removeprefix("TRANSFER_RESULT_") for c in chain}
        if len(chain) > 1:
            committed = results <= {"OK", "EXISTS"}
            if not committed:
                failed = [c for c in chain if c["result"] != "TRANSFER_RESULT_LINKED_EVENT_FAILED"]
                assert len(failed) == 1, chain
                assert failed[0]["result"] not in ("TRANSFER_RESULT_OK", "TRANSFER_RESULT_EXISTS")
        chain = []
    assert chain == [], "a client batch ended inside a chain"

