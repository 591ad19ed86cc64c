"""`txengine bench`: the engine's throughput and latency against real baselines, in one run.

Everything runs on one Postgres (embedded by default, or --database-url) with fsync and
synchronous_commit on, each scenario bounded in time, each line printed as it is measured:

* engine scenarios, driven over gRPC by separate load-generator processes that build and
  serialize every request before the clock starts (unique time-ordered ids, engine.ids.new_id):
  batched CreateTransfers (8,190 per request) at 1, 2, 4 and 8 concurrent streams; one
  transfer per RPC from 64, 256 and 512 concurrent callers (grpc.aio, many calls per process);
  StreamTransfers (pipelined 8,190-batches over one stream); 10 % of transfers on one hot
  account; 50 % cross-shard; linked chains of 3;
* baselines, each in its own database of the same server: pgbench's built-in tpcb-like
  (prepared, best TPS over 1..32 clients); a naive ledger (one asyncpg transaction per
  transfer: SELECT ... FOR UPDATE of both accounts in id order, two UPDATEs, one INSERT, from
  32 connections); raw binary COPY of as many transfer rows into the engine's own transfers
  table shape (made by the engine's migrations), from 2 connections: the storage limit;
* the kernels against their plain-Python references (scripts/bench_kernels.py).

Latency percentiles are exact: numpy over every recorded latency (no HdrHistogram, whose
package needs a newer setuptools than this project pins). CPU is measured with psutil: the
engine process (this one), every Postgres process (the postmaster and its children), the load
generators. The report is a table per scenario with the ratios to each baseline and each target
of DESIGN section 6 (met or not), JSON in bench-results/bench.json and a plot in
bench-results/bench.png.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import datetime
import importlib.util
import json
import math
import multiprocessing
import os
import pathlib
import platform
import queue
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
import uuid

import grpc
import numpy as np

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id
from engine.observability.stages import WRITE_PARTS

CREATE_TRANSFERS = "/txengine.v1.LedgerService/CreateTransfers"
STREAM_TRANSFERS = "/txengine.v1.LedgerService/StreamTransfers"
BATCH = 8_190
LINKED = pb.TRANSFER_FLAGS_LINKED
CHANNEL_OPTIONS = [("grpc.max_send_message_length", 8 << 20),
                   ("grpc.max_receive_message_length", 8 << 20),
                   ("grpc.use_local_subchannel_pool", 1)]  # one TCP connection per channel
CALLERS_PER_CHANNEL = 64
STREAM_WINDOW = 8  # requests of a stream in flight: the server commits up to 8 at once
COPY_ROWS_PER_STATEMENT = 32_768  # the engine's largest transaction (limits.COMMIT_ITEMS_MAX)
PGBENCH_CLIENTS = (1, 4, 8, 16, 32)

# DESIGN section 6, on a 2-core machine.
TARGET_BATCHED_TPS = 100_000
TARGET_BATCHED_X_PGBENCH = 25.0
TARGET_BATCHED_SHARE_OF_COPY = 0.25
TARGET_BATCHED_P99_MS = 100.0
TARGET_UNARY_P99_MS = 25.0
TARGET_HOT_WITHIN = 0.20
TARGET_KERNEL_X_REFERENCE = 50.0
TARGET_KERNEL_TPS = 10_000_000


# -- scenarios ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    rpc: str  # "unary" (CreateTransfers) or "stream" (StreamTransfers)
    batch: int  # transfers per request
    callers: int  # concurrent requests (streams or unary callers)
    processes: int  # load-generator processes; the callers are spread over them
    mix: str = "uniform"  # uniform | hot | cross | chains
    group: str = "batched"  # batched | unary | stream | mix

    @property
    def family(self) -> str:
        return "unary" if self.batch == 1 else "batched"


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    out = [Scenario(f"batched-{s}", f"CreateTransfers {args.batch:,}/request, {s} stream"
                    + ("s" if s > 1 else ""), "unary", args.batch, s, min(s, 2))
           for s in args.streams]
    out += [Scenario(f"unary-{c}", f"CreateTransfers 1/request, {c} callers", "unary", 1, c,
                     min(2, c), group="unary") for c in args.callers]
    out += [Scenario(f"sdk-{c}", f"1 transfer/call, {c} callers, SDK auto-batching", "sdk", 1, c,
                     min(2, c), group="sdk") for c in args.sdk_callers]
    out.append(Scenario("stream", f"StreamTransfers {args.batch:,}/request, 1 stream, "
                        f"{STREAM_WINDOW} in flight", "stream", args.batch, 1, 1, group="stream"))
    m = args.mix_streams
    out.append(Scenario("hot-10%", f"10 % on one hot account, {m} streams", "unary", args.batch,
                        m, min(m, 2), mix="hot", group="mix"))
    out.append(Scenario("cross-50%", f"50 % cross-shard, {m} streams", "unary", args.batch, m,
                        min(m, 2), mix="cross", group="mix"))
    chain_batch = args.batch - args.batch % 3
    out.append(Scenario("chains-3", f"linked chains of 3, {m} streams", "unary", chain_batch, m,
                        min(m, 2), mix="chains", group="mix"))
    if args.only:
        wanted = set(args.only)
        out = [s for s in out if s.name in wanted]
    return out


def run_order(plan: list[Scenario], mix_streams: int) -> list[Scenario]:
    """The order to run in: the mixes (hot, cross-shard, chains) right after the uniform
    batched scenario at the same number of streams, their reference, so that the drift of a
    long run (a growing table, other users of the machine) weighs least on the comparison."""

    def rank(s: Scenario) -> int:
        if s.group == "batched":
            return 0 if s.callers <= mix_streams else 2
        return {"mix": 1, "stream": 3, "sdk": 5}.get(s.group, 4)

    return sorted(plan, key=rank)


# -- requests, built before the clock ------------------------------------------------------------

# One Transfer inside a CreateTransfersRequest (or StreamTransfersRequest, same wire shape):
# field 1 (LEN) of 62 bytes: id, debit and credit (field 1..3, 16 bytes each), amount (4,
# 1..127 so one varint byte), ledger (6) = 1, code (7) = 1, flags (8, one varint byte).
RECORD_BYTES = 64
_RECORD = np.frombuffer(
    bytes([0x0A, 62, 0x0A, 16]) + bytes(16) + bytes([0x12, 16]) + bytes(16) + bytes([0x1A, 16])
    + bytes(16) + bytes([0x20, 1, 0x30, 1, 0x38, 1, 0x40, 0]), np.uint8)
assert len(_RECORD) == RECORD_BYTES


def encode_transfers(ids: np.ndarray, debit: np.ndarray, credit: np.ndarray,
                     amount: np.ndarray, flags: np.ndarray) -> np.ndarray:
    """Serialized Transfer fields of a request, one 64-byte row per transfer: a request of k
    transfers is rows[i:i + k].tobytes(). ids, debit, credit: (n, 16) uint8; amount 1..127;
    flags 0..127 (checked against protobuf by tests/integration/test_bench.py)."""
    n = len(ids)
    assert np.all((amount >= 1) & (amount < 128)) and np.all((flags >= 0) & (flags < 128))
    rows = np.tile(_RECORD, (n, 1))
    rows[:, 4:20] = ids
    rows[:, 22:38] = debit
    rows[:, 40:56] = credit
    rows[:, 57] = amount
    rows[:, 63] = flags
    return rows


def new_ids(n: int) -> np.ndarray:
    """n unique time-ordered ids (engine.ids.new_id) as an (n, 16) uint8 array."""
    return np.frombuffer(b"".join([new_id() for _ in range(n)]), np.uint8).reshape(n, 16)


def pick_pairs(rng: np.random.Generator, n: int, shards: np.ndarray, mix: str,
               hot: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indexes of (debit, credit) accounts, always distinct.

    uniform: both uniform over the accounts; hot: 10 % of transfers have account `hot` on one
    side (either), the rest uniform; cross: exactly half the pairs have their two accounts in
    different shards, half in the same shard; chains: uniform (the flags make the chains)."""
    m = len(shards)
    debit = rng.integers(0, m, n)
    credit = rng.integers(0, m - 1, n)
    credit += credit >= debit
    if mix == "hot":
        on_hot = rng.random(n) < 0.10
        hot_debits = on_hot & (rng.random(n) < 0.5)
        other = rng.integers(0, m - 1, n)
        other += other >= hot
        debit = np.where(hot_debits, hot, np.where(on_hot, other, debit))
        credit = np.where(on_hot & ~hot_debits, hot, np.where(hot_debits, other, credit))
    elif mix == "cross":
        cross = np.zeros(n, bool)
        cross[: n // 2] = True
        rng.shuffle(cross)
        order = np.argsort(shards, kind="stable")
        counts = np.bincount(shards)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        credit = np.empty(n, np.int64)
        todo = np.ones(n, bool)
        for _ in range(1_000):
            k = np.flatnonzero(todo)
            if len(k) == 0:
                break
            same = ~cross[k]
            shard = shards[debit[k]]
            within = order[starts[shard] + (rng.random(len(k)) * counts[shard]).astype(np.int64)]
            anywhere = rng.integers(0, m, len(k))
            pick = np.where(same, within, anywhere)
            good = (pick != debit[k]) & ((shards[pick] == shard) == same)
            credit[k[good]] = pick[good]
            todo[k[good]] = False
        if todo.any():
            raise ValueError("too few accounts per shard for the cross-shard mix")
    return debit, credit


def build_requests(job: dict) -> list[list[bytes]]:
    """Every request of one generator process, as serialized bytes, per caller (task)."""
    accounts = np.frombuffer(job["accounts"], np.uint8).reshape(-1, 16)
    shards = np.frombuffer(job["shards"], np.int32)
    rng = np.random.default_rng(job["seed"])
    callers, per_caller, batch = job["callers"], job["requests_per_caller"], job["batch"]
    n = callers * per_caller * batch
    debit, credit = pick_pairs(rng, n, shards, job["mix"], job.get("hot", 0))
    flags = np.zeros(n, np.int64)
    if job["mix"] == "chains":
        flags[np.arange(n) % 3 != 2] = LINKED  # every third item closes its chain of 3
    rows = encode_transfers(new_ids(n), accounts[debit], accounts[credit],
                            rng.integers(1, 128, n), flags)
    # Request k goes to caller k % callers, so ids are sent in about the order they were made.
    requests: list[list[bytes]] = [[] for _ in range(callers)]
    for k in range(callers * per_caller):
        requests[k % callers].append(rows[k * batch:(k + 1) * batch].tobytes())
    return requests


# -- worker processes (load generators and baseline clients) ------------------------------------
#
# Protocol on the results queue: ("ready", i) after building; the clock starts when `start` is
# set; ("finished", i, monotonic end, CPU seconds of the run) at the last answer; ("done", i,
# stats) once the answers are checked and, for database clients, once the parent has taken its
# readings (`release`), so their Postgres backends are still there to be measured; ("error", i,
# traceback) instead of any of them.

def _worker(job: dict, start, release, results) -> None:
    import uvloop

    try:
        uvloop.run(_WORKERS[job["kind"]](job, start, release, results))
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the scenario
        results.put(("error", job["index"], traceback.format_exc()))


async def _wait_start(start, results, index: int) -> tuple[float, float]:
    results.put(("ready", index))
    await asyncio.get_running_loop().run_in_executor(None, start.wait)
    return time.monotonic(), time.process_time()


def _finish(results, index: int, cpu_began: float) -> None:
    results.put(("finished", index, time.monotonic(), time.process_time() - cpu_began))


async def _released(release) -> None:
    await asyncio.get_running_loop().run_in_executor(None, release.wait)


async def _grpc_worker(job: dict, start, release, results) -> None:
    requests = build_requests(job)
    channel_count = max(1, math.ceil(job["callers"] / CALLERS_PER_CHANNEL))
    channels = [grpc.aio.insecure_channel(job["address"], options=CHANNEL_OPTIONS)
                for _ in range(channel_count)]
    for channel in channels:
        await asyncio.wait_for(channel.channel_ready(), 30)
    latencies: list[list[float]] = []
    answers: list[bytes] = []
    errors: collections.Counter[str] = collections.Counter()

    async def unary(channel, payloads: list[bytes], deadline: float) -> None:
        call = channel.unary_unary(CREATE_TRANSFERS)
        mine: list[float] = []
        latencies.append(mine)
        for payload in payloads:
            if time.monotonic() >= deadline:
                break
            began = time.perf_counter()
            try:
                answer = await call(payload, timeout=60)
            except grpc.aio.AioRpcError as error:
                errors[error.code().name] += 1
                continue
            mine.append(time.perf_counter() - began)
            answers.append(answer)

    async def stream(channel, payloads: list[bytes], deadline: float) -> None:
        call = channel.stream_stream(STREAM_TRANSFERS)(timeout=job["seconds"] + 60)
        window = asyncio.Semaphore(job.get("window", STREAM_WINDOW))
        sent: collections.deque[float] = collections.deque()
        mine: list[float] = []
        latencies.append(mine)

        async def write() -> None:
            for payload in payloads:
                if time.monotonic() >= deadline:
                    break
                await window.acquire()
                sent.append(time.perf_counter())
                await call.write(payload)
            await call.done_writing()

        writer = asyncio.create_task(write())
        try:
            while (answer := await call.read()) is not grpc.aio.EOF:
                mine.append(time.perf_counter() - sent.popleft())
                answers.append(answer)
                window.release()
        except grpc.aio.AioRpcError as error:
            errors[error.code().name] += 1
            writer.cancel()  # it may wait for a window slot that no answer will free
        try:
            await writer
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the call already failed
            pass

    sdk_client = None
    if job["rpc"] == "sdk":
        from txengine_client import AsyncClient, Transfer

        sdk_client = AsyncClient(job["address"])
        # The SDK's own objects, built before the clock like the payloads of the other drivers.
        transfers = [[Transfer(id=t.id, debit_account_id=t.debit_account_id,
                               credit_account_id=t.credit_account_id, amount=t.amount,
                               ledger=t.ledger, code=t.code)
                      for payload in payloads
                      for t in pb.CreateTransfersRequest.FromString(payload).transfers]
                     for payloads in requests]

    async def sdk(index: int, deadline: float) -> None:
        mine: list[float] = []
        latencies.append(mine)
        for transfer in transfers[index]:
            if time.monotonic() >= deadline:
                break
            began = time.perf_counter()
            try:
                result = await sdk_client.create_transfer(transfer)
            except Exception as error:  # noqa: BLE001 - counted, as the unary driver does
                errors[type(error).__name__] += 1
                continue
            mine.append(time.perf_counter() - began)
            answers.append(pb.CreateTransfersResponse(results=[pb.CreateTransferResult(
                result=int(result.result))]).SerializeToString())

    began, cpu_began = await _wait_start(start, results, job["index"])
    deadline = began + job["seconds"]
    if sdk_client is not None:
        await asyncio.gather(*(sdk(i, deadline) for i in range(len(requests))))
        await sdk_client.close()
    else:
        drive = stream if job["rpc"] == "stream" else unary
        await asyncio.gather(*(drive(channels[i % channel_count], payloads, deadline)
                               for i, payloads in enumerate(requests)))
    _finish(results, job["index"], cpu_began)
    results_ok = pb.TRANSFER_RESULT_OK
    ok = 0
    outcomes: collections.Counter[str] = collections.Counter()
    for raw in answers:
        for r in pb.CreateTransfersResponse.FromString(raw).results:
            if r.result == results_ok:
                ok += 1
            else:
                outcomes[pb.TransferResult.Name(r.result)] += 1
    flat = np.array([x for mine in latencies for x in mine], np.float64)
    await _released(release)
    for channel in channels:
        await channel.close()
    results.put(("done", job["index"], {
        "requests": len(flat), "transfers": len(flat) * job["batch"], "ok": ok,
        "latencies": flat, "errors": dict(errors), "other_results": dict(outcomes)}))


async def _connect(url: str):
    import asyncpg

    conn = await asyncpg.connect(url, server_settings={"synchronous_commit": "on",
                                                       "application_name": "txengine-bench"})
    await conn.set_type_codec("uuid", schema="pg_catalog", encoder=bytes, decoder=bytes,
                              format="binary")
    return conn


async def _naive_worker(job: dict, start, release, results) -> None:
    """The naive ledger: one transaction per transfer from many connections."""
    accounts = np.frombuffer(job["accounts"], np.uint8).reshape(-1, 16)
    rng = np.random.default_rng(job["seed"])
    n = job["connections"] * job["per_connection"]
    debit, credit = pick_pairs(rng, n, np.zeros(len(accounts), np.int32), "uniform")
    ids = new_ids(n)
    amounts = rng.integers(1, 128, n).tolist()
    work = [(ids[i].tobytes(), accounts[debit[i]].tobytes(), accounts[credit[i]].tobytes(),
             amounts[i]) for i in range(n)]
    conns = [await _connect(job["url"]) for _ in range(job["connections"])]
    lock = ("SELECT id FROM accounts WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE")
    debit_sql = "UPDATE accounts SET debits_posted = debits_posted + $2 WHERE id = $1"
    credit_sql = "UPDATE accounts SET credits_posted = credits_posted + $2 WHERE id = $1"
    insert = ("INSERT INTO transfers (id, debit_account_id, credit_account_id, amount, ledger,"
              " code, \"timestamp\") VALUES ($1, $2, $3, $4, 1, 1, $5)")
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()

    async def one(conn, items, deadline: float) -> None:
        for transfer_id, d, c, amount in items:
            if time.monotonic() >= deadline:
                break
            began = time.perf_counter()
            try:
                async with conn.transaction():
                    await conn.fetch(lock, [d, c])
                    await conn.execute(debit_sql, d, amount)
                    await conn.execute(credit_sql, c, amount)
                    await conn.execute(insert, transfer_id, d, c, amount, time.time_ns())
            except Exception as error:  # noqa: BLE001 - counted, the run goes on
                errors[type(error).__name__] += 1
                continue
            latencies.append(time.perf_counter() - began)

    per = job["per_connection"]
    for conn in conns:  # one rolled-back transfer each: statements prepared before the clock
        transaction = conn.transaction()
        await transaction.start()
        transfer_id, d, c, amount = work[0]
        await conn.fetch(lock, [d, c])
        await conn.execute(debit_sql, d, amount)
        await conn.execute(credit_sql, c, amount)
        await conn.execute(insert, transfer_id, d, c, amount, time.time_ns())
        await transaction.rollback()
    began, cpu_began = await _wait_start(start, results, job["index"])
    deadline = began + job["seconds"]
    await asyncio.gather(*(one(conn, work[i * per:(i + 1) * per], deadline)
                           for i, conn in enumerate(conns)))
    _finish(results, job["index"], cpu_began)
    await _released(release)
    for conn in conns:
        await conn.close()
    flat = np.array(latencies, np.float64)
    results.put(("done", job["index"], {"requests": len(flat), "transfers": len(flat),
                                        "ok": len(flat), "latencies": flat,
                                        "errors": dict(errors)}))


def copy_columns(ids: np.ndarray, debit: np.ndarray, credit: np.ndarray, shard_count: int,
                 first_seq: int, columns: list[tuple[str, str]]) -> tuple[bytes, list[str]]:
    """A binary COPY stream of transfer rows for the given (name, Postgres type) columns."""
    from engine.kernels import _copy as kinds
    from engine.kernels._copy import encode_binary_copy
    from engine.posting.batch import shards_of

    n = len(ids)

    def halves(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        words = raw.view(">u8").astype(np.uint64)
        return np.ascontiguousarray(words[:, 0]), np.ascontiguousarray(words[:, 1])

    id_bytes = [bytes(r) for r in ids]
    shard = shards_of(id_bytes, shard_count).astype(np.int64)
    debit_shard = shards_of([bytes(r) for r in debit], shard_count).astype(np.int64)
    zeros = np.zeros(n, np.int64)
    values = {
        "shard": shard, "id": ids, "debit_account_id": debit, "credit_account_id": credit,
        "amount": (np.arange(n) % 127 + 1).astype(np.int64), "ledger": zeros + 1,
        "code": zeros + 1, "timestamp": time.time_ns() + np.arange(n, dtype=np.int64),
        "seq_shard": debit_shard, "seq": first_seq + np.arange(n, dtype=np.int64),
    }
    dtypes = {"smallint": (kinds.INT16, np.int16), "integer": (kinds.INT32, np.int32),
              "bigint": (kinds.INT64, np.int64)}
    spec, names = [], []
    for name, pg_type in columns:
        value = values.get(name)
        if pg_type == "uuid":
            raw = value if value is not None else np.zeros((n, 16), np.uint8)
            spec.append((kinds.UUID, *halves(np.ascontiguousarray(raw))))
        elif pg_type == "bytea":
            spec.append((kinds.BYTEA, b"", np.zeros(n + 1, np.int64)))
        elif pg_type in dtypes:
            kind, dtype = dtypes[pg_type]
            spec.append((kind, np.ascontiguousarray((zeros if value is None else value)
                                                    .astype(dtype))))
        else:
            continue  # a column this benchmark does not know: left to its default
        names.append(name)
    return encode_binary_copy(n, spec), names


async def _copy_worker(job: dict, start, release, results) -> None:
    """Raw binary COPY of transfer rows into the engine's transfers table, N connections."""
    accounts = np.frombuffer(job["accounts"], np.uint8).reshape(-1, 16)
    rng = np.random.default_rng(job["seed"])
    chunk, total = job["rows_per_statement"], job["rows"]
    streams: list[tuple[memoryview, int]] = []
    columns = None
    for first in range(0, total, chunk):
        n = min(chunk, total - first)
        debit, credit = pick_pairs(rng, n, np.zeros(len(accounts), np.int32), "uniform")
        data, columns = copy_columns(new_ids(n), accounts[debit], accounts[credit],
                                     job["shard_count"], first + 1, job["columns"])
        streams.append((memoryview(data), n))
    conns = [await _connect(job["url"]) for _ in range(job["connections"])]
    latencies: list[float] = []
    rows_done = [0]

    async def one(conn, mine, deadline: float) -> None:
        for data, n in mine:
            if time.monotonic() >= deadline:
                break
            began = time.perf_counter()
            await conn.copy_to_table("transfers", source=data, columns=columns, format="binary")
            latencies.append(time.perf_counter() - began)
            rows_done[0] += n

    count = len(conns)
    began, cpu_began = await _wait_start(start, results, job["index"])
    deadline = began + job["seconds"]
    await asyncio.gather(*(one(conn, streams[i::count], deadline)
                           for i, conn in enumerate(conns)))
    _finish(results, job["index"], cpu_began)
    await _released(release)
    for conn in conns:
        await conn.close()
    results.put(("done", job["index"], {"requests": len(latencies), "transfers": rows_done[0],
                                        "ok": rows_done[0],
                                        "latencies": np.array(latencies, np.float64),
                                        "errors": {}}))


_WORKERS = {"grpc": _grpc_worker, "naive": _naive_worker, "copy": _copy_worker}


# Kept for `txengine capacity`, which drives its steps with this closed-loop generator.
def _generator(address: str, account_ids: list[bytes], requests: int, batch: int, seed: int,
               start, results) -> None:
    """One load-generator process: prebuild, wait for the start signal, send, report."""
    shards = np.zeros(len(account_ids), np.int32)
    job = {"accounts": b"".join(account_ids), "shards": shards.tobytes(), "seed": seed,
           "callers": 1, "requests_per_caller": requests, "batch": batch, "mix": "uniform"}
    payloads = build_requests(job)[0]
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS[:2]) as channel:
        call = channel.unary_unary(CREATE_TRANSFERS)
        results.put(("ready", seed))
        start.wait()
        latencies, responses = [], []
        for payload in payloads:
            began = time.perf_counter()
            responses.append(call(payload, timeout=120))
            latencies.append(time.perf_counter() - began)
    ok = sum(r.result == pb.TRANSFER_RESULT_OK
             for raw in responses for r in pb.CreateTransfersResponse.FromString(raw).results)
    results.put(("done", latencies, ok))


# -- measuring ----------------------------------------------------------------------------------

class PostgresProcesses:
    """CPU seconds of the postmaster and every process it started (backends, WAL writer,
    checkpointer, autovacuum), found from the backend of a connection. Backends that exited
    (pgbench's, the naive ledger's) count through the postmaster's reaped-children times."""

    def __init__(self, backend_pid: int):
        import psutil

        self.postmaster = None
        try:
            self.postmaster = psutil.Process(backend_pid).parent()
        except (psutil.Error, ProcessLookupError):
            pass  # Postgres on another host: its CPU is not measured

    def cpu_seconds(self) -> tuple[float, dict[int, float], dict[int, str]]:
        """(all Postgres CPU seconds so far, CPU seconds of each live process by pid, and each
        one's title, e.g. 'walwriter' or 'postgres bench_1a2b [local]')."""
        import psutil

        if self.postmaster is None:
            return 0.0, {}, {}
        try:
            own = self.postmaster.cpu_times()
            children = self.postmaster.children()
        except psutil.Error:
            return 0.0, {}, {}
        total = own.children_user + own.children_system
        by_pid = {self.postmaster.pid: own.user + own.system}
        titles = {self.postmaster.pid: "postmaster"}
        for process in children:
            try:
                times = process.cpu_times()  # also of a zombie: exited, not yet reaped
            except psutil.Error:
                continue  # reaped just now: in the postmaster's children times from now on
            by_pid[process.pid] = times.user + times.system
            try:
                title = " ".join(process.cmdline())
            except psutil.Error:
                title = ""
            titles[process.pid] = (_STATEMENT_RE.sub("", title.removeprefix("postgres: ")).strip()
                                   or f"pid {process.pid} (exiting)")
        return total + sum(by_pid.values()), by_pid, titles


_STATEMENT_RE = re.compile(r"\s+(idle|COPY|UPDATE|SELECT|INSERT|COMMIT|BEGIN|authentication)\b.*$")


@dataclasses.dataclass
class Snapshot:
    monotonic: float
    engine_cpu: float
    postgres_cpu: float
    postgres_by_pid: dict[int, float]
    postgres_titles: dict[int, str]
    main_thread_cpu: float
    machine_busy: float
    children_cpu: float
    wal: int
    wal_syncs: int
    stages: dict | None


class Meter:
    """Before/after readings of CPU, WAL and the engine's stage times."""

    def __init__(self, probe, postgres: PostgresProcesses, app=None):
        self.probe, self.postgres, self.app = probe, postgres, app

    async def read(self) -> Snapshot:
        import psutil

        me = psutil.Process()
        own = me.cpu_times()
        main_thread = next((t.user_time + t.system_time for t in me.threads()
                            if t.id == me.pid), 0.0)  # the event loop: on Linux its TID is the PID
        postgres_cpu, postgres_by_pid, postgres_titles = self.postgres.cpu_seconds()
        machine = psutil.cpu_times()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        row = await self.probe.fetchrow(
            "SELECT pg_current_wal_lsn()::text AS lsn, (SELECT wal_sync FROM pg_stat_wal) AS syncs")
        return Snapshot(
            monotonic=time.monotonic(), engine_cpu=own.user + own.system,
            postgres_cpu=postgres_cpu, postgres_by_pid=postgres_by_pid,
            postgres_titles=postgres_titles,
            main_thread_cpu=main_thread,
            machine_busy=sum(machine) - machine.idle - getattr(machine, "iowait", 0.0),
            children_cpu=children.ru_utime + children.ru_stime, wal=_lsn_bytes(row["lsn"]),
            wal_syncs=int(row["syncs"] or 0),
            stages=self.app.engine.stages.snapshot() if self.app is not None else None)


async def settle(meter: Meter, before: Snapshot, timeout_seconds: float = 5.0) -> None:
    """Wait until the Postgres processes started since `before` (e.g. pgbench's backends) are
    gone and reaped, so their CPU shows in the postmaster's children times."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        _, by_pid, _ = meter.postgres.cpu_seconds()
        if set(by_pid) <= set(before.postgres_by_pid):
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)


def _lsn_bytes(lsn: str) -> int:
    high, low = lsn.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def _postgres_cpu(before: Snapshot, after: Snapshot) -> float:
    return max(0.0, after.postgres_cpu - before.postgres_cpu)


def _busiest_postgres(before: Snapshot, after: Snapshot) -> tuple[int | None, float]:
    """The Postgres process that used the most CPU between two readings, and its seconds."""
    best, seconds = None, 0.0
    for pid, value in after.postgres_by_pid.items():
        used = value - before.postgres_by_pid.get(pid, 0.0)
        if used > seconds:
            best, seconds = pid, used
    return best, seconds


def latency_ms(values: np.ndarray) -> dict[str, float]:
    """Exact percentiles over every recorded latency (seconds in, milliseconds out)."""
    if len(values) == 0:
        return {"n": 0, "mean": 0.0, "p50": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0}
    ms = values * 1000.0
    p50, p99, p999 = np.percentile(ms, [50, 99, 99.9])
    return {"n": int(len(ms)), "mean": round(float(ms.mean()), 3), "p50": round(float(p50), 3),
            "p99": round(float(p99), 3), "p999": round(float(p999), 3),
            "max": round(float(ms.max()), 3)}


class Progress:
    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.began = time.monotonic()

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self.began
        print(f"[{int(elapsed) // 60:2d}:{int(elapsed) % 60:02d}] {text}", file=self.stream,
              flush=True)


async def run_workers(jobs: list[dict], meter: Meter, progress: Progress, label: str,
                      build_timeout: float = 600.0) -> dict:
    """Start worker processes, wait until they are built, run them, return the measurement."""
    context = multiprocessing.get_context("spawn")
    start, release, results = context.Event(), context.Event(), context.Queue()
    for index, job in enumerate(jobs):
        job["index"] = index
    procs = [context.Process(target=_worker, args=(job, start, release, results), daemon=True)
             for job in jobs]
    for proc in procs:
        proc.start()

    early: collections.defaultdict[str, list[tuple]] = collections.defaultdict(list)

    async def expect(kind: str, timeout: float, patience: float | None = None) -> list[tuple]:
        """One `kind` message from each worker (a fast worker's later messages are kept);
        after `patience` seconds, says every 10 s who is still awaited."""
        now = time.monotonic()
        got, deadline = early.pop(kind, []), now + timeout
        nag = now + (patience if patience is not None else timeout)
        while len(got) < len(procs):
            try:
                message = await asyncio.to_thread(results.get, True, 0.5)
            except queue.Empty:
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(
                        f"{label}: workers did not send {kind!r} in {timeout} s") from None
                if now > nag:
                    progress.say(f"{label}: still waiting for {len(procs) - len(got)} of "
                                 f"{len(procs)} workers to send {kind!r} (requests in flight)")
                    nag = now + 10
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"{label}: a worker died (exit code {dead[0].exitcode})") from None
                continue
            if message[0] == "error":
                raise RuntimeError(f"{label}: worker {message[1]} failed:\n{message[2]}")
            (got if message[0] == kind else early[message[0]]).append(message)
        return got

    try:
        await expect("ready", build_timeout)
        before = await meter.read()
        began = time.monotonic()
        start.set()
        finished = await expect("finished", jobs[0]["seconds"] + 150, jobs[0]["seconds"] + 10)
        after = await meter.read()
        release.set()
        done = await expect("done", 300)
    finally:
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    elapsed = max(m[2] for m in finished) - began
    stats = [m[2] for m in done]
    return {
        "seconds": elapsed,
        "requests": sum(s["requests"] for s in stats),
        "transfers": sum(s["transfers"] for s in stats),
        "ok": sum(s["ok"] for s in stats),
        "latencies": np.concatenate([s["latencies"] for s in stats]),
        "errors": dict(sum((collections.Counter(s["errors"]) for s in stats),
                           collections.Counter())),
        "other_results": dict(sum((collections.Counter(s.get("other_results", {}))
                                   for s in stats), collections.Counter())),
        "worker_cpu": sum(m[3] for m in finished),
        "before": before, "after": after,
    }


def measured(name: str, title: str, kind: str, batch: int, run: dict, app_cpu: float,
             commits: dict | None = None) -> dict:
    """One row of the report: throughput, latency, CPU per 1,000 transfers, WAL."""
    before, after = run["before"], run["after"]
    seconds = max(run["seconds"], 1e-9)
    transfers = run["transfers"]
    per_k = 1000.0 / max(1, transfers)
    postgres_cpu = _postgres_cpu(before, after)
    wall = max(after.monotonic - before.monotonic, 1e-9)
    request = latency_ms(run["latencies"])
    row = {
        "name": name, "title": title, "kind": kind, "transfers_per_request": batch,
        "seconds": round(seconds, 3), "requests": run["requests"], "transfers": transfers,
        "ok": run["ok"], "errors": run["errors"],
        "transfers_per_second": round(transfers / seconds, 1),
        "request_latency_ms": request,
        # A transfer of a batched request is answered with its request: the same latency.
        "transfer_latency_ms": request,
        "cpu_seconds_per_1000": {"app": round(app_cpu * per_k, 5),
                                 "postgres": round(postgres_cpu * per_k, 5),
                                 "load_generators": round(run["worker_cpu"] * per_k, 5)},
        "cores": {"app": round(app_cpu / wall, 2), "postgres": round(postgres_cpu / wall, 2),
                  "load_generators": round(run["worker_cpu"] / wall, 2),
                  "machine": round((after.machine_busy - before.machine_busy) / wall, 2)},
        "wal_bytes_per_transfer": round((after.wal - before.wal) / max(1, transfers), 1),
        "wal_syncs_per_second": round((after.wal_syncs - before.wal_syncs) / wall, 1),
        "wal_megabytes_per_second": round((after.wal - before.wal) / wall / 1e6, 1),
    }
    pid, busiest = _busiest_postgres(before, after)
    if pid is not None:
        row["busiest_postgres_process"] = {"process": after.postgres_titles.get(pid, str(pid)),
                                           "cores": round(busiest / wall, 2)}
    if run.get("other_results"):
        row["other_results"] = run["other_results"]
    if commits is not None:
        row.update(commits)
    return row


def stage_breakdown(before: dict, after: dict) -> dict:
    """Commits, transfers per commit and the engine's wall time per transfer by stage (us)."""
    seconds = {k: after["seconds"][k] - before["seconds"][k] for k in after["seconds"]}
    if "prepare" in seconds and "kernel" in seconds:
        seconds["prepare"] -= seconds["kernel"]  # prepare encloses the kernel call
    items = max(1, after["items"] - before["items"])
    batches = after["batches"] - before["batches"]
    return {"commits": batches, "transfers_per_commit": round(items / max(1, batches)),
            "microseconds_per_transfer": {k: round(v / items * 1e6, 2)
                                          for k, v in seconds.items()}}


# -- the engine scenarios -----------------------------------------------------------------------

async def _create_accounts(address: str, count: int) -> list[bytes]:
    ids = [new_id() for _ in range(count)]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ledger_pb2_grpc.LedgerServiceStub(channel)
        for start in range(0, count, 8_000):
            chunk = ids[start:start + 8_000]
            response = await stub.CreateAccounts(pb.CreateAccountsRequest(
                accounts=[pb.Account(id=i, ledger=1, code=1) for i in chunk]))
            assert all(r.result == pb.ACCOUNT_RESULT_OK for r in response.results)
    return ids


class Planner:
    """Requests per caller for about `seconds` of load: the best rate seen so far in the same
    family (batched or unary) times 1.5, so a generator rarely runs out before the deadline and
    never builds far more than it can send."""

    GUESS = {"batched": 150_000.0, "unary": 6_000.0}

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.best: dict[str, float] = {}

    def requests_per_caller(self, scenario: Scenario) -> int:
        rate = 1.5 * self.best.get(scenario.family, self.GUESS[scenario.family])
        planned = rate * self.seconds / (scenario.batch * scenario.callers)
        return max(3 if scenario.family == "batched" else 10, math.ceil(planned))

    def saw(self, scenario: Scenario, transfers_per_second: float) -> None:
        self.best[scenario.family] = max(self.best.get(scenario.family, 0.0),
                                         transfers_per_second)


def grpc_jobs(address: str, scenario: Scenario, accounts: bytes, shards: np.ndarray,
              per_caller: int, seconds: float) -> list[dict]:
    """One load-generator job per process of the scenario, its callers spread over them."""
    seed = int.from_bytes(os.urandom(4), "big")
    return [{"kind": "grpc", "address": address, "rpc": scenario.rpc, "accounts": accounts,
             "shards": shards.tobytes(), "hot": 0, "mix": scenario.mix, "seed": seed + i,
             "callers": scenario.callers // scenario.processes
             + (1 if i < scenario.callers % scenario.processes else 0),
             "requests_per_caller": per_caller, "batch": scenario.batch, "seconds": seconds}
            for i in range(scenario.processes)]


async def run_scenario(scenario: Scenario, app, accounts: bytes, shards: np.ndarray,
                       meter: Meter, planner: Planner, progress: Progress, seconds: float,
                       label: str) -> dict:
    per_caller = planner.requests_per_caller(scenario)
    jobs = grpc_jobs(app.address, scenario, accounts, shards, per_caller, seconds)
    planned = per_caller * scenario.callers * scenario.batch
    progress.say(f"{label} {scenario.title}: {len(jobs)} generator process"
                 f"{'es' if len(jobs) > 1 else ''} building up to {planned:,} transfers")
    await meter.probe.execute("CHECKPOINT")
    run = await run_workers(jobs, meter, progress, scenario.name)
    before, after = run["before"], run["after"]
    row = measured(scenario.name, scenario.title, scenario.group, scenario.batch, run,
                   after.engine_cpu - before.engine_cpu,
                   stage_breakdown(before.stages, after.stages))
    row["cores"]["engine_main_thread"] = round(
        (after.main_thread_cpu - before.main_thread_cpu) / (after.monotonic - before.monotonic), 2)
    row.update({"rpc": "StreamTransfers" if scenario.rpc == "stream" else "CreateTransfers",
                "callers": scenario.callers, "generator_processes": scenario.processes,
                "mix": scenario.mix})
    planner.saw(scenario, row["transfers_per_second"])
    lat = row["request_latency_ms"]
    short = " (ran out of prebuilt requests before the deadline)" if (
        run["seconds"] < seconds * 0.9) else ""
    progress.say(f"{label} {scenario.name}: {row['transfers_per_second']:>10,.0f} transfers/s  "
                 f"p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  "
                 f"OK {row['ok']:,}/{row['transfers']:,}  engine {row['cores']['app']:.2f} cores  "
                 f"Postgres {row['cores']['postgres']:.2f}  generators "
                 f"{row['cores']['load_generators']:.2f}{short}")
    if run["errors"]:
        progress.say(f"{label} {scenario.name}: RPC errors {run['errors']}")
    return row


# -- baselines ----------------------------------------------------------------------------------

def _database_url(url: str, name: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{name}"))


async def _create_database(probe, url: str, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    await probe.execute(f"CREATE DATABASE {name}")
    return _database_url(url, name)


def pgbench_binary() -> str | None:
    try:
        from pgserver._commands import POSTGRES_BIN_PATH

        candidate = pathlib.Path(POSTGRES_BIN_PATH) / "pgbench"
        if candidate.exists():
            return str(candidate)
    except ImportError:
        pass
    return shutil.which("pgbench")


_TPS_RE = re.compile(r"tps = ([0-9.]+) \(without initial connection time\)")


async def _run(command: list[str], timeout: float) -> str:
    """Run a command in a thread (subprocess spawns it without running gRPC's fork handlers)."""
    done = await asyncio.to_thread(subprocess.run, command, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, timeout=timeout)
    text = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed ({done.returncode}):\n{text}")
    return text


async def run_pgbench(probe, url: str, meter: Meter, progress: Progress, args) -> dict:
    binary = pgbench_binary()
    if binary is None:
        raise RuntimeError("pgbench not found (pgserver bundles it)")
    db = await _create_database(probe, url, "pgbench")
    progress.say(f"pgbench -i -s {args.pgbench_scale} (tpcb-like tables, "
                 f"{args.pgbench_scale * 100_000:,} accounts)")
    await _run([binary, "-i", "-q", "-s", str(args.pgbench_scale), db], 900)
    runs = []
    with tempfile.TemporaryDirectory(prefix="txengine-pgbench-") as logs:
        for clients in args.pgbench_clients:
            await probe.execute("CHECKPOINT")
            prefix = pathlib.Path(logs) / f"c{clients}"
            before = await meter.read()
            began = time.monotonic()
            text = await _run([binary, "-M", "prepared", "-b", "tpcb-like", "-c", str(clients),
                               "-j", str(min(clients, 2)), "-T", str(args.pgbench_seconds),
                               "-l", f"--log-prefix={prefix}", db], args.pgbench_seconds + 600)
            at_end = await meter.read()
            await settle(meter, before)  # pgbench's backends exit after it: count their CPU
            settled = await meter.read()
            after = dataclasses.replace(at_end, postgres_cpu=settled.postgres_cpu,
                                        postgres_by_pid=settled.postgres_by_pid,
                                        postgres_titles=settled.postgres_titles)
            ended = at_end.monotonic
            match = _TPS_RE.search(text)
            if match is None:
                raise RuntimeError(f"no tps in pgbench output:\n{text}")
            latencies = []
            for log in pathlib.Path(logs).glob(f"c{clients}.*"):
                # client_id transaction_no time(us) script_no time_epoch time_us
                data = np.loadtxt(log, usecols=2, ndmin=1, dtype=np.float64)
                latencies.append(data / 1e6)
                log.unlink()
            values = np.concatenate(latencies) if latencies else np.zeros(0)
            tps = float(match[1])
            run = {"seconds": ended - began, "requests": len(values),
                   "transfers": len(values), "ok": len(values), "latencies": values,
                   "errors": {}, "worker_cpu": 0.0, "before": before, "after": after}
            client_cpu = after.children_cpu - before.children_cpu
            row = measured(f"pgbench-c{clients}", f"pgbench tpcb-like, {clients} clients",
                           "baseline", 1, run, client_cpu)
            row["transfers_per_second"] = round(tps, 1)  # pgbench's own figure
            row["clients"] = clients
            runs.append(row)
            lat = row["request_latency_ms"]
            progress.say(f"pgbench c={clients:<3} {tps:>9,.0f} TPS  p50 {lat['p50']:.1f} ms  "
                         f"p99 {lat['p99']:.1f} ms  Postgres {row['cores']['postgres']:.2f} cores")
    best = max(runs, key=lambda r: r["transfers_per_second"])
    summary = dict(best, name="pgbench", title=f"pgbench tpcb-like (best: {best['clients']} "
                   f"clients)", scale=args.pgbench_scale)
    return {"best": summary, "runs": runs}


NAIVE_SCHEMA = """
CREATE TABLE accounts (
    id uuid PRIMARY KEY,
    ledger bigint NOT NULL,
    code bigint NOT NULL,
    debits_posted bigint NOT NULL DEFAULT 0,
    credits_posted bigint NOT NULL DEFAULT 0
);
CREATE TABLE transfers (
    id uuid PRIMARY KEY,
    debit_account_id uuid NOT NULL,
    credit_account_id uuid NOT NULL,
    amount bigint NOT NULL CHECK (amount > 0),
    ledger bigint NOT NULL,
    code bigint NOT NULL,
    "timestamp" bigint NOT NULL
);
CREATE INDEX transfers_debit_account ON transfers (debit_account_id, "timestamp");
CREATE INDEX transfers_credit_account ON transfers (credit_account_id, "timestamp");
"""


async def run_naive(probe, url: str, accounts: list[bytes], meter: Meter, progress: Progress,
                    args) -> dict:
    db = await _create_database(probe, url, "naive")
    conn = await _connect(db)
    try:
        await conn.execute(NAIVE_SCHEMA)
        await conn.copy_records_to_table("accounts", records=[(a, 1, 1) for a in accounts],
                                         columns=("id", "ledger", "code"))
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    per_connection = max(20, math.ceil(args.naive_rate_guess * args.seconds * 1.5
                                       / args.naive_connections))
    title = f"naive ledger, 1 transaction/transfer, {args.naive_connections} connections"
    progress.say(f"{title}: building {per_connection * args.naive_connections:,} transfers")
    await probe.execute("CHECKPOINT")
    job = {"kind": "naive", "url": db, "accounts": b"".join(accounts),
           "seed": int.from_bytes(os.urandom(4), "big"), "connections": args.naive_connections,
           "per_connection": per_connection, "seconds": args.seconds}
    run = await run_workers([job], meter, progress, "naive")
    row = measured("naive-ledger", title, "baseline", 1, run, run["worker_cpu"])
    row["worker_cpu_note"] = "app CPU is the asyncpg client process"
    lat = row["request_latency_ms"]
    progress.say(f"naive ledger {row['transfers_per_second']:>9,.0f} transfers/s  "
                 f"p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  "
                 f"Postgres {row['cores']['postgres']:.2f} cores"
                 + (f"  errors {row['errors']}" if row["errors"] else ""))
    return row


async def run_raw_copy(probe, url: str, accounts: list[bytes], rows: int, shards: int,
                       meter: Meter, progress: Progress, args) -> dict:
    from engine.storage.migrate import migrate

    db = await _create_database(probe, url, "rawcopy")
    conn = await _connect(db)
    try:
        await migrate(conn, shards)  # the engine's own tables, indexes and partitions
        columns = [(r["column_name"], r["data_type"]) for r in await conn.fetch(
            """SELECT column_name, data_type FROM information_schema.columns
               WHERE table_schema = 'public' AND table_name = 'transfers'
               ORDER BY ordinal_position""")]
    finally:
        await conn.close()
    title = (f"raw binary COPY into the engine's transfers table, {args.copy_connections} "
             f"connections, {args.copy_rows_per_statement:,} rows/COPY")
    progress.say(f"{title}: building {rows:,} rows")
    await probe.execute("CHECKPOINT")
    job = {"kind": "copy", "url": db, "accounts": b"".join(accounts), "columns": columns,
           "seed": int.from_bytes(os.urandom(4), "big"), "rows": rows,
           "rows_per_statement": args.copy_rows_per_statement, "shard_count": shards,
           "connections": args.copy_connections, "seconds": max(args.seconds, 30.0)}
    run = await run_workers([job], meter, progress, "raw COPY")
    row = measured("raw-copy", title, "baseline", args.copy_rows_per_statement, run,
                   run["worker_cpu"])
    row["transfer_latency_ms"] = None  # rows are not answered one by one
    lat = row["request_latency_ms"]
    progress.say(f"raw COPY {row['transfers_per_second']:>13,.0f} rows/s  per COPY p50 "
                 f"{lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  "
                 f"Postgres {row['cores']['postgres']:.2f} cores")
    return row


def run_kernels(quick: bool, progress: Progress) -> dict | None:
    """apply_transfers against its plain-Python reference (scripts/bench_kernels.py)."""
    script = pathlib.Path(__file__).resolve().parent.parent / "scripts" / "bench_kernels.py"
    if not script.exists():
        return None
    spec = importlib.util.spec_from_file_location("txengine_bench_kernels", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    n = 8_190 if quick else 100_000
    batch = module.single_phase_batch(n, np.random.default_rng(1))
    kernel_s, kernel_out = module.seconds_per_run(module.apply_transfers, batch,
                                                  0.2 if quick else 1.0, 5)
    reference_s, reference_out = module.seconds_per_run(module.apply_transfers_reference,
                                                        batch, 0.0, 1)
    agree = all(np.array_equal(kernel_out[k], reference_out[k]) for k in module.OUTPUTS)
    result = {"transfers": n, "kernel_transfers_per_second": round(n / kernel_s),
              "reference_transfers_per_second": round(n / reference_s),
              "ratio": round(reference_s / kernel_s, 1), "agree": agree}
    progress.say(f"kernels: apply_transfers {n:,} single-phase: kernel "
                 f"{result['kernel_transfers_per_second'] / 1e6:.1f} M/s, reference "
                 f"{result['reference_transfers_per_second'] / 1e6:.3f} M/s, "
                 f"{result['ratio']:.0f}x, outputs agree: {agree}")
    return result


# -- the report ---------------------------------------------------------------------------------

# -- the gRPC floor: the same generator against a handler that does no work ------------------

def _empty_server(ports) -> None:
    import uvloop

    uvloop.run(_serve_empty(ports))


async def _serve_empty(ports) -> None:
    """grpc.aio with the engine's options and no interceptors, answering every CreateTransfers
    with one prebuilt OK result: what one Python gRPC process costs per call before any work."""
    from engine.server.app import grpc_options

    answer = pb.CreateTransfersResponse(results=[pb.CreateTransferResult(
        index=0, result=pb.TRANSFER_RESULT_OK, timestamp=1)]).SerializeToString()

    async def create_transfers(request: bytes, context) -> bytes:
        return answer

    server = grpc.aio.server(options=grpc_options())
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "txengine.v1.LedgerService",
        {"CreateTransfers": grpc.unary_unary_rpc_method_handler(create_transfers)}),))
    ports.put(server.add_insecure_port("127.0.0.1:0"))
    await server.start()
    await server.wait_for_termination()


async def run_grpc_floor(accounts: bytes, shards: np.ndarray, meter: Meter, progress: Progress,
                         args) -> dict:
    """The unary scenario's generator, callers and requests against the empty handler above,
    in its own process (its CPU is the app CPU of the row)."""
    import psutil

    callers = args.callers[0]
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    server = context.Process(target=_empty_server, args=(ports,), daemon=True)
    server.start()
    try:
        port = await asyncio.to_thread(ports.get, True, 60)
        served = psutil.Process(server.pid)
        title = f"empty grpc.aio handler, 1/request, {callers} callers"
        per_caller = max(10, math.ceil(Planner.GUESS["unary"] * 2 * args.seconds / callers))
        progress.say(f"{title}: building up to {per_caller * callers:,} requests")
        like_unary = Scenario("grpc-empty", title, "unary", 1, callers, min(2, callers))
        jobs = grpc_jobs(f"127.0.0.1:{port}", like_unary, accounts, shards, per_caller,
                         args.seconds)
        cpu_before = sum(served.cpu_times()[:2])
        run = await run_workers(jobs, meter, progress, "grpc-empty")
        server_cpu = sum(served.cpu_times()[:2]) - cpu_before
    finally:
        server.kill()
        server.join(timeout=10)
    row = measured("grpc-empty", title, "baseline", 1, run, server_cpu)
    row["worker_cpu_note"] = "app CPU is the empty server's process"
    lat = row["request_latency_ms"]
    progress.say(f"empty gRPC handler {row['transfers_per_second']:>9,.0f} requests/s  "
                 f"p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  "
                 f"server {row['cores']['app']:.2f} cores  generators "
                 f"{row['cores']['load_generators']:.2f}")
    return row


def add_ratios(rows: list[dict], baselines: dict) -> None:
    pgbench = baselines["pgbench"]["best"]["transfers_per_second"]
    naive = baselines["naive_ledger"]["transfers_per_second"]
    copy = baselines["raw_copy"]["transfers_per_second"]
    for row in rows:
        tps = row["transfers_per_second"]
        row["ratios"] = {"x_pgbench": round(tps / pgbench, 2) if pgbench else None,
                         "x_naive_ledger": round(tps / naive, 2) if naive else None,
                         "share_of_raw_copy": round(tps / copy, 4) if copy else None}
        floor = baselines.get("grpc_empty")
        if floor is not None and row["transfers_per_request"] == 1:
            row["ratios"]["share_of_grpc_empty"] = round(
                tps / floor["transfers_per_second"], 4)


def _operating_point(rows: list[dict], p99_ms: float) -> dict | None:
    """The best throughput among rows meeting the p99 bound, else the best throughput."""
    if not rows:
        return None
    within = [r for r in rows if r["request_latency_ms"]["p99"] <= p99_ms]
    return max(within or rows, key=lambda r: r["transfers_per_second"])


def evaluate_targets(rows: list[dict], baselines: dict, kernels: dict | None) -> list[dict]:
    pgbench = baselines["pgbench"]["best"]["transfers_per_second"]
    copy = baselines["raw_copy"]["transfers_per_second"]
    targets = []

    def target(name: str, goal: str, value: str, met: bool | None, scenario: str | None):
        targets.append({"target": name, "goal": goal, "measured": value, "met": met,
                        "scenario": scenario})

    batched = _operating_point([r for r in rows if r["kind"] == "batched"], TARGET_BATCHED_P99_MS)
    if batched is not None:
        tps, name = batched["transfers_per_second"], batched["name"]
        target("batched throughput", f">= {TARGET_BATCHED_TPS:,} transfers/s",
               f"{tps:,.0f}/s", tps >= TARGET_BATCHED_TPS, name)
        target("batched vs pgbench", f">= {TARGET_BATCHED_X_PGBENCH:.0f}x pgbench TPS",
               f"{tps / pgbench:.1f}x", tps >= TARGET_BATCHED_X_PGBENCH * pgbench, name)
        target("batched vs raw COPY", f">= {TARGET_BATCHED_SHARE_OF_COPY:.0%} of raw COPY",
               f"{tps / copy:.1%}", tps >= TARGET_BATCHED_SHARE_OF_COPY * copy, name)
        p99 = batched["request_latency_ms"]["p99"]
        target("batched p99", f"<= {TARGET_BATCHED_P99_MS:.0f} ms", f"{p99:.1f} ms",
               p99 <= TARGET_BATCHED_P99_MS, name)
    unary = _operating_point([r for r in rows if r["kind"] == "unary"], TARGET_UNARY_P99_MS)
    if unary is not None:
        tps, name = unary["transfers_per_second"], unary["name"]
        target("unary vs pgbench", ">= pgbench TPS", f"{tps / pgbench:.2f}x ({tps:,.0f}/s)",
               tps >= pgbench, name)
        p99 = unary["request_latency_ms"]["p99"]
        target("unary p99", f"<= {TARGET_UNARY_P99_MS:.0f} ms", f"{p99:.1f} ms",
               p99 <= TARGET_UNARY_P99_MS, name)
        floor = baselines.get("grpc_empty")
        if floor is not None:
            target("unary vs empty gRPC", "(the gRPC floor; no target)",
                   f"{tps / floor['transfers_per_second']:.0%} of "
                   f"{floor['transfers_per_second']:,.0f}/s", None, name)
    hot = next((r for r in rows if r["mix"] == "hot"), None)
    uniform = next((r for r in rows if r["kind"] == "batched" and hot is not None
                    and r["callers"] == hot["callers"]), None)
    if hot is not None and uniform is not None:
        share = hot["transfers_per_second"] / uniform["transfers_per_second"]
        target("hot account", f"within {TARGET_HOT_WITHIN:.0%} of uniform ({uniform['name']})",
               f"{share:.0%} of uniform", share >= 1 - TARGET_HOT_WITHIN, hot["name"])
    if kernels is not None:
        target("kernel vs reference", f">= {TARGET_KERNEL_X_REFERENCE:.0f}x",
               f"{kernels['ratio']:.0f}x", kernels["ratio"] >= TARGET_KERNEL_X_REFERENCE,
               "apply_transfers")
        kps = kernels["kernel_transfers_per_second"]
        target("kernel throughput", f">= {TARGET_KERNEL_TPS / 1e6:.0f} M transfers/s",
               f"{kps / 1e6:.1f} M/s", kps >= TARGET_KERNEL_TPS, "apply_transfers")
    return targets


def _fmt_ratio(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1%}" if percent else f"{value:.2f}x"


def table_lines(report: dict) -> list[str]:
    rows = report["scenarios"] + report["baseline_rows"]
    head = (f"{'scenario':<14}{'items/req':>10}{'transfers/s':>13}{'p50 ms':>9}{'p99 ms':>9}"
            f"{'p999 ms':>9}{'app CPU':>9}{'PG CPU':>8}{'x pgbench':>11}{'x naive':>9}"
            f"{'% COPY':>8}{'% gRPC':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lat, cpu, ratio = r["request_latency_ms"], r["cpu_seconds_per_1000"], r["ratios"]
        lines.append(
            f"{r['name']:<14}{r['transfers_per_request']:>10,}{r['transfers_per_second']:>13,.0f}"
            f"{lat['p50']:>9.2f}{lat['p99']:>9.2f}{lat['p999']:>9.2f}{cpu['app']:>9.3f}"
            f"{cpu['postgres']:>8.3f}{_fmt_ratio(ratio['x_pgbench']):>11}"
            f"{_fmt_ratio(ratio['x_naive_ledger']):>9}"
            f"{_fmt_ratio(ratio['share_of_raw_copy'], True):>8}"
            f"{_fmt_ratio(ratio.get('share_of_grpc_empty'), True):>8}")
    return lines


def print_report(report: dict) -> None:
    print()
    env = report["environment"]
    print(f"txengine bench  {env['generated']}  {env['cpus']} CPUs  Postgres "
          f"{env['postgres_version']}  fsync={env['postgres_settings']['fsync']}  "
          f"synchronous_commit={env['postgres_settings']['synchronous_commit']}  "
          f"{env['accounts']:,} accounts, {env['shards']} shards")
    print()
    print("Scenarios")
    for r in report["scenarios"] + report["baseline_rows"]:
        print(f"  {r['name']:<14}{r['title']}")
    print()
    for line in table_lines(report):
        print(line)
    print()
    print("Latency is per request (exact percentiles over every request); a transfer of a "
          "batched request\nis answered with its request, so per-transfer latency is the same "
          "figure. CPU: seconds per 1,000\ntransfers (app = engine process; pgbench, naive "
          "ledger and COPY: their client process).\nraw COPY latency is per COPY statement.")
    print()
    print("Where the resources went, in cores busy on average (app as above; loop = the engine's "
          "event-loop\nthread; PG max = the busiest single Postgres process; gen = load "
          "generators; other = the rest\nof the machine: other users, kernel, steal), and what "
          "Postgres wrote:")
    print(f"{'scenario':<14}{'app':>6}{'loop':>6}{'Postgres':>9}{'PG max':>8}{'gen':>6}"
          f"{'other':>7}{'machine':>8}{'commits':>9}{'/commit':>9}{'WAL B/tr':>10}{'WAL MB/s':>10}"
          f"{'fsync/s':>9}")
    for r in report["scenarios"] + report["baseline_rows"]:
        c = r["cores"]
        other = max(0.0, c["machine"] - c["app"] - c["postgres"] - c["load_generators"])
        loop = c.get("engine_main_thread")
        busiest = r.get("busiest_postgres_process", {}).get("cores")
        print(f"{r['name']:<14}{c['app']:>6.2f}"
              + (f"{loop:>6.2f}" if loop is not None else f"{'-':>6}")
              + f"{c['postgres']:>9.2f}"
              + (f"{busiest:>8.2f}" if busiest is not None else f"{'-':>8}")
              + f"{c['load_generators']:>6.2f}{other:>7.2f}{c['machine']:>8.2f}"
              f"{r.get('commits', '-'):>9}{r.get('transfers_per_commit', '-'):>9}"
              f"{r['wal_bytes_per_transfer']:>10,.0f}{r['wal_megabytes_per_second']:>10.1f}"
              f"{r['wal_syncs_per_second']:>9,.0f}")
    print("Busiest Postgres process: " + "; ".join(
        f"{r['name']}: {r['busiest_postgres_process']['process']}"
        for r in report["scenarios"] + report["baseline_rows"]
        if (r["kind"] == "batched" or r["name"] == "raw-copy")
        and "busiest_postgres_process" in r))
    batched = [r for r in report["scenarios"] if r["kind"] == "batched"]
    if batched:
        print()
        print("Where the engine's time goes, batched CreateTransfers (wall microseconds per "
              "transfer, by stage):")
        print(f"  {'stage':<16}" + "".join(f"{r['name']:>12}" for r in batched))
        stages = [s for s in batched[0]["microseconds_per_transfer"] if s not in WRITE_PARTS]
        stages[stages.index("write") + 1:stages.index("write") + 1] = [
            s for s in WRITE_PARTS if s in batched[0]["microseconds_per_transfer"]]
        for stage in stages:
            print(f"  {stage:<16}" + "".join(
                f"{r['microseconds_per_transfer'].get(stage, 0.0):>12.2f}" for r in batched))
        print(f"  {'total':<16}" + "".join(
            f"{sum(v for k, v in r['microseconds_per_transfer'].items() if k not in WRITE_PARTS):>12.2f}"
            for r in batched))
        print(f"  (write includes {' and '.join(WRITE_PARTS)}: the balance UPDATE and the "
              "transfers COPY)")
    runs = report["baselines"]["pgbench"]["runs"]
    print()
    print("pgbench tpcb-like (-M prepared) by clients: " + ", ".join(
        f"c={r['clients']} {r['transfers_per_second']:,.0f}" for r in runs) + " TPS")
    problems = [r for r in report["scenarios"] if r["errors"] or r["ok"] != r["transfers"]]
    for r in problems:
        print(f"NOTE {r['name']}: OK {r['ok']:,} of {r['transfers']:,}; errors {r['errors']}; "
              f"other results {r.get('other_results', {})}")
    print()
    print("DESIGN section 6 targets")
    for t in report["targets"]:
        state = {True: "met", False: "NOT MET", None: "info"}[t["met"]]
        print(f"  {state:<8} {t['target']:<22} {t['goal']:<40} measured {t['measured']:<22}"
              f" [{t['scenario']}]")


def write_plot(report: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["scenarios"] + report["baseline_rows"]
    names = [r["name"] for r in rows]
    tps = [r["transfers_per_second"] for r in rows]
    p99 = [r["request_latency_ms"]["p99"] for r in rows]
    colors = ["tab:blue" if r["kind"] != "baseline" else "tab:gray" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 0.38 * len(rows) + 2.2))
    y = np.arange(len(rows))
    left.barh(y, tps, color=colors)
    left.set_xscale("log")
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlabel("transfers/s (log; baselines grey; dashed: batched target)")
    for yi, value in zip(y, tps):
        left.text(value, yi, f" {value:,.0f}", va="center", fontsize=8)
    left.axvline(TARGET_BATCHED_TPS, color="tab:red", linestyle="--", linewidth=0.8)
    right.barh(y, p99, color=colors)
    right.set_xscale("log")
    right.set_yticks(y, names)
    right.invert_yaxis()
    for bound, label in ((TARGET_UNARY_P99_MS, "unary"), (TARGET_BATCHED_P99_MS, "batched")):
        right.axvline(bound, color="tab:red", linestyle="--", linewidth=0.8)
        right.text(bound, len(rows) - 0.4, f" {label} target", color="tab:red", fontsize=7)
    right.set_xlabel("p99 latency per request, ms (log; dashed: p99 targets)")
    for yi, value in zip(y, p99):
        right.text(value, yi, f" {value:,.1f}", va="center", fontsize=8)
    env = report["environment"]
    fig.suptitle(f"txengine bench, {env['generated']}, {env['cpus']} CPUs, fsync and "
                 "synchronous_commit on")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the run ------------------------------------------------------------------------------------

async def run(args: argparse.Namespace) -> dict:
    from engine.config import Settings
    from engine.posting.batch import shards_of
    from engine.server import app as app_module

    progress = Progress()
    temporary = args.data_dir is None
    data_dir = pathlib.Path(args.data_dir or tempfile.mkdtemp(prefix="txengine-bench-"))
    server = None
    url = args.database_url
    if url is None:
        from engine.storage.embedded import EmbeddedPostgres

        progress.say(f"starting the embedded Postgres in {data_dir}")
        server = await asyncio.to_thread(EmbeddedPostgres, data_dir)
        url = server._server.get_uri("postgres")
    probe = await _connect(url)
    engine_url = await _create_database(probe, url, "bench")
    settings = Settings(listen="127.0.0.1:0", database_url=engine_url, redis_url=args.redis_url,
                        data_dir=data_dir, shards=args.shards, log_level="warning")
    app = await app_module.start(settings)
    try:
        postgres = PostgresProcesses(await probe.fetchval("SELECT pg_backend_pid()"))
        settings_names = ("fsync", "synchronous_commit", "full_page_writes", "wal_level",
                          "shared_buffers", "max_wal_size", "checkpoint_timeout", "wal_sync_method")
        pg_settings = {n: await probe.fetchval(f"SHOW {n}") for n in settings_names}
        if pg_settings["fsync"] != "on" or pg_settings["synchronous_commit"] != "on":
            raise RuntimeError(f"the benchmark needs fsync and synchronous_commit on: "
                               f"{pg_settings}")
        import psutil

        environment = {
            "generated": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "host": platform.node(), "cpus": psutil.cpu_count(),
            "memory_bytes": psutil.virtual_memory().total,
            "postgres_version": await probe.fetchval("SHOW server_version"),
            "postgres_settings": pg_settings, "shards": app.engine.shard_count,
            "accounts": args.accounts, "seconds_per_scenario": args.seconds,
            "quick": args.quick, "postgres_cpu_measured": postgres.postmaster is not None,
            "latency_percentiles": "exact, numpy over every recorded latency",
        }
        meter = Meter(probe, postgres, app)
        progress.say(f"engine on {app.address} ({app.engine.shard_count} shards), "
                     f"Postgres {environment['postgres_version']}, fsync=on, "
                     f"synchronous_commit=on; creating {args.accounts:,} accounts")
        account_ids = await _create_accounts(app.address, args.accounts)
        accounts = b"".join(account_ids)
        shards = shards_of(account_ids, app.engine.shard_count).astype(np.int32)
        plan = scenarios(args)
        planner = Planner(args.seconds)
        warmup = Scenario("warm-up", "warm-up (not measured)", "unary", args.batch, 2, 2)
        warm = await run_scenario(warmup, app, accounts, shards, meter, Planner(0.5), progress,
                                  min(2.0, args.seconds), "[warm-up]")
        planner.saw(warmup, warm["transfers_per_second"])  # sizes the first batched scenario
        rows = []
        total = len(plan) + 3
        for index, scenario in enumerate(run_order(plan, args.mix_streams), 1):
            rows.append(await run_scenario(scenario, app, accounts, shards, meter, planner,
                                           progress, args.seconds, f"[{index}/{total}]"))
        shown = {s.name: i for i, s in enumerate(plan)}
        rows.sort(key=lambda r: shown[r["name"]])
        meter.app = None  # the engine is idle from here on
        progress.say(f"[{len(plan) + 1}/{total}] baseline: pgbench")
        pgbench = await run_pgbench(probe, url, meter, progress, args)
        progress.say(f"[{len(plan) + 2}/{total}] baseline: naive ledger")
        naive = await run_naive(probe, url, account_ids, meter, progress, args)
        floor = None
        if any(r["kind"] == "unary" for r in rows):
            progress.say(f"[{len(plan) + 2}/{total}] baseline: an empty gRPC handler")
            floor = await run_grpc_floor(accounts, shards, meter, progress, args)
        copy_rows = max([r["transfers"] for r in rows if r["kind"] == "batched"]
                        or [args.copy_rows_min])
        copy_rows = max(copy_rows, args.copy_rows_min)
        progress.say(f"[{total}/{total}] baseline: raw COPY of {copy_rows:,} rows "
                     "(as many as the largest batched scenario sent)")
        raw = await run_raw_copy(probe, url, account_ids, copy_rows, app.engine.shard_count,
                                 meter, progress, args)
    finally:
        await probe.close()
        await app.stop(0)
        if server is not None and temporary:
            await asyncio.to_thread(server._server.cleanup)
        if temporary:
            shutil.rmtree(data_dir, ignore_errors=True)
    kernels = None if args.no_kernels else await asyncio.to_thread(run_kernels, args.quick,
                                                                   progress)
    baselines = {"pgbench": pgbench, "naive_ledger": naive, "raw_copy": raw}
    baseline_rows = [pgbench["best"], naive, raw]
    if floor is not None:
        baselines["grpc_empty"] = floor
        baseline_rows.append(floor)
    add_ratios(rows + baseline_rows + pgbench["runs"], baselines)
    report = {"environment": environment, "scenarios": rows, "baselines": baselines,
              "baseline_rows": baseline_rows, "kernels": kernels,
              "targets": evaluate_targets(rows, baselines, kernels)}
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x]

    parser.add_argument("--quick", action="store_true",
                        help="about 1-2 minutes: short scenarios, a small pgbench, for tests")
    parser.add_argument("--seconds", type=float,
                        help="load time of each scenario [15; --quick 2.5]")
    parser.add_argument("--batch", type=int, default=BATCH,
                        help=f"transfers per batched request [{BATCH}]")
    parser.add_argument("--streams", type=ints, default=[1, 2, 4, 8],
                        help="concurrent streams of the batched scenarios [1,2,4,8]")
    parser.add_argument("--callers", type=ints, default=[64, 256, 512],
                        help="concurrent callers of the one-transfer scenarios [64,256,512]")
    parser.add_argument("--mix-streams", type=int, default=4,
                        help="streams of the hot, cross-shard and chain scenarios [4]")
    parser.add_argument("--only", type=lambda t: t.split(","),
                        help="run only these engine scenarios (names as printed), e.g. batched-2")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--pgbench-scale", type=int, help="pgbench -s [32; --quick 1]")
    parser.add_argument("--pgbench-clients", type=ints, default=list(PGBENCH_CLIENTS),
                        help="pgbench client counts, best TPS reported [1,4,8,16,32]")
    parser.add_argument("--pgbench-seconds", type=int, help="pgbench -T per run [5; --quick 1]")
    parser.add_argument("--sdk-callers", type=ints, default=[256],
                        help="concurrent callers of the SDK auto-batching scenario [256]")
    parser.add_argument("--naive-connections", type=int, default=32)
    parser.add_argument("--naive-rate-guess", type=float, default=6_000,
                        help="transfers/s the naive ledger is built for (x1.5) [6000]")
    parser.add_argument("--copy-connections", type=int, default=2)
    parser.add_argument("--copy-rows-per-statement", type=int, default=COPY_ROWS_PER_STATEMENT)
    parser.add_argument("--copy-rows-min", type=int, default=100_000)
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel check")
    parser.add_argument("--database-url", help="Postgres to use [a temporary embedded one]; "
                        "the baselines create their own databases on it")
    parser.add_argument("--redis-url")
    parser.add_argument("--data-dir", help="embedded services' data [a temporary directory]")
    parser.add_argument("--out", default="bench-results",
                        help="directory of bench.json and bench.png [bench-results]")
    parser.add_argument("--json", help="write the JSON here instead of OUT/bench.json")
    parser.add_argument("--no-plot", action="store_true")


def _defaults(args: argparse.Namespace) -> None:
    if args.seconds is None:
        args.seconds = 2.5 if args.quick else 15.0
    if args.pgbench_scale is None:
        args.pgbench_scale = 1 if args.quick else 32
    if args.pgbench_seconds is None:
        args.pgbench_seconds = 1 if args.quick else 5


def main(args: argparse.Namespace) -> int:
    import uvloop

    _defaults(args)
    report = uvloop.run(run(args))
    print_report(report)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = pathlib.Path(args.json) if args.json else out / "bench.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=float))
    written = [str(path)]
    if not args.no_plot:
        plot = out / "bench.png"
        write_plot(report, plot)
        written.append(str(plot))
    print()
    print("written: " + ", ".join(written))
    return 0
