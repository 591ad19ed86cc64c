"""Every Prometheus metric of the engine, declared in this one module, on one registry.

Names follow the conventions SREs already query: the gRPC server series carry the
go-grpc-prometheus names and labels, and everything else has the single prefix ``txengine_``,
base units in the name (``_seconds``, ``_bytes``) and ``_total`` on counters. Every label set is
bounded by something fixed at start-up: the RPC methods, the status codes, the pipeline stages,
the result enums, the shard count. No label ever carries an account or transfer id.

``grpc_code`` values are spelled as grpc-go prints them (``OK``, ``InvalidArgument``,
``ResourceExhausted``, ``Unavailable``, ...) so dashboards and alerts written for Go services
work unchanged.

Three kinds of source feed the registry:

* the gRPC interceptor (``engine.server.interceptors``) counts and times every RPC;
* the commit pipeline observes stage times and batch sizes (``engine.observability.stages``)
  and, from the commit loop, the results of each committed batch (``record_outcomes``) and
  each failed commit (``record_commit_failure``);
* ``EngineCollector`` reads gauges (queue depths, pool, lease, availability) from the running
  engine at scrape time, so the hot path pays nothing for them.
"""
from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable

import grpc
import numpy as np
from prometheus_client import (
    CollectorRegistry, Counter, Enum, GCCollector, Histogram, PlatformCollector, ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.results import AccountResult, TransferResult

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(registry=REGISTRY)  # process_cpu_seconds_total, process_resident_memory_bytes
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

# -- gRPC server (go-grpc-prometheus names) ------------------------------------------------

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")

# grpc-go's codes.Code.String() spelling, for every status code.
GRPC_CODE_LABEL: dict[grpc.StatusCode, str] = {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
    grpc.StatusCode.UNKNOWN: "Unknown",
    grpc.StatusCode.INVALID_ARGUMENT: "InvalidArgument",
    grpc.StatusCode.DEADLINE_EXCEEDED: "DeadlineExceeded",
    grpc.StatusCode.NOT_FOUND: "NotFound",
    grpc.StatusCode.ALREADY_EXISTS: "AlreadyExists",
    grpc.StatusCode.PERMISSION_DENIED: "PermissionDenied",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "ResourceExhausted",
    grpc.StatusCode.FAILED_PRECONDITION: "FailedPrecondition",
    grpc.StatusCode.ABORTED: "Aborted",
    grpc.StatusCode.OUT_OF_RANGE: "OutOfRange",
    grpc.StatusCode.UNIMPLEMENTED: "Unimplemented",
    grpc.StatusCode.INTERNAL: "Internal",
    grpc.StatusCode.UNAVAILABLE: "Unavailable",
    grpc.StatusCode.DATA_LOSS: "DataLoss",
    grpc.StatusCode.UNAUTHENTICATED: "Unauthenticated",
}

# Request latency buckets: prom.DefBuckets plus 1 ms and 2.5 ms, so that the latency objectives
# (25 ms single transfers, 100 ms batches) fall on bucket boundaries.
RPC_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                       10.0)

GRPC_STARTED = Counter(
    "grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS, registry=REGISTRY)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, whatever their status.",
    (*GRPC_LABELS, "grpc_code"), registry=REGISTRY)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Seconds from the start of an RPC until the server sent its status.",
    GRPC_LABELS, buckets=RPC_SECONDS_BUCKETS, registry=REGISTRY)
GRPC_MSG_RECEIVED = Counter(
    "grpc_server_msg_received_total", "Request messages received by the server.", GRPC_LABELS,
    registry=REGISTRY)
GRPC_MSG_SENT = Counter(
    "grpc_server_msg_sent_total", "Response messages sent by the server.", GRPC_LABELS,
    registry=REGISTRY)

# -- the commit pipeline -----------------------------------------------------------------------

# Stage times span a 20 µs kernel call to a multi-second stalled commit.
STAGE_SECONDS_BUCKETS = (0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                         0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Items per commit: one single-transfer request up to COMMIT_ITEMS_MAX (32,768).
BATCH_ITEMS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
                       32768)

STAGE_SECONDS = Histogram(
    "txengine_stage_seconds",
    "Seconds per pipeline stage: decode and encode once per request (servicer), the others once "
    "per commit; 'prepare' encloses 'kernel', 'write' is the Postgres transaction.",
    ("stage",), buckets=STAGE_SECONDS_BUCKETS, registry=REGISTRY)
COMMIT_FAILURES = Counter(
    "txengine_commit_failures_total",
    "Batches whose commit failed (every request of the batch got an error) and after which "
    "the engine rebuilt its state: storage (Postgres, connection, fencing), cache_full, defect.",
    ("reason",), registry=REGISTRY)
COMMIT_FAILURE_REASONS = ("storage", "cache_full", "defect")
_COMMIT_FAILURE_CHILDREN = {reason: COMMIT_FAILURES.labels(reason=reason)
                            for reason in COMMIT_FAILURE_REASONS}
COMMIT_BATCH_ITEMS = Histogram(
    "txengine_commit_batch_items",
    "Items (accounts and transfers) per committed Postgres transaction (group commit size).",
    buckets=BATCH_ITEMS_BUCKETS, registry=REGISTRY)
TRANSFER_RESULTS = Counter(
    "txengine_transfer_results_total",
    "Transfer results by result code; result=\"EXISTS\" counts idempotent replays.",
    ("result",), registry=REGISTRY)
ACCOUNT_RESULTS = Counter(
    "txengine_account_results_total",
    "Account results by result code; result=\"EXISTS\" counts idempotent replays.",
    ("result",), registry=REGISTRY)

# -- security (engine.security) --------------------------------------------------------------

SECURITY_REFUSALS = Counter(
    "txengine_security_refusals_total",
    "RPCs refused by the security layer: unauthenticated, not_entitled, rate_limited, "
    "concurrency (the principal's concurrent RPC limit).",
    ("refusal",), registry=REGISTRY)
SECURITY_REFUSAL_REASONS = ("unauthenticated", "not_entitled", "rate_limited", "concurrency")
for _reason in SECURITY_REFUSAL_REASONS:
    SECURITY_REFUSALS.labels(refusal=_reason)
RATE_LIMIT_BACKEND = Enum(
    "txengine_rate_limit_backend",
    "Where rate limits are counted: redis (shared by replicas) or local (this process only, "
    "while Redis is unreachable).",
    states=["redis", "local"], registry=REGISTRY)
RATE_LIMIT_FALLBACKS = Counter(
    "txengine_rate_limit_fallbacks_total",
    "Rate-limit checks that could not reach Redis and were counted in process memory.",
    registry=REGISTRY)
AUDIT_RECORDS = Counter(
    "txengine_audit_records_total", "Audit records committed.", registry=REGISTRY)
AUDIT_FAILURES = Counter(
    "txengine_audit_write_failures_total",
    "Audit flushes that failed (their RPCs were answered UNAVAILABLE).", registry=REGISTRY)

_TRANSFER_RESULT_NAMES = {int(r): r.name for r in TransferResult}
_ACCOUNT_RESULT_NAMES = {int(r): r.name for r in AccountResult}
_TRANSFER_RESULT_CHILDREN = {value: TRANSFER_RESULTS.labels(result=name)
                             for value, name in _TRANSFER_RESULT_NAMES.items()}
_ACCOUNT_RESULT_CHILDREN = {value: ACCOUNT_RESULTS.labels(result=name)
                            for value, name in _ACCOUNT_RESULT_NAMES.items()}


def _record_results(results, children: dict) -> None:
    counts = np.bincount(np.asarray(results, dtype=np.int64))
    for value in np.flatnonzero(counts).tolist():
        child = children.get(value)
        assert child is not None, f"result {value} is not in the enum"
        child.inc(int(counts[value]))


def record_transfer_results(results) -> None:
    """Count transfer results (an array or list of TransferResult values)."""
    _record_results(results, _TRANSFER_RESULT_CHILDREN)


def record_account_results(results) -> None:
    """Count account results (AccountResult values)."""
    _record_results(results, _ACCOUNT_RESULT_CHILDREN)


def record_commit_failure(reason: str) -> None:
    """Count one failed commit; `reason` is one of COMMIT_FAILURE_REASONS."""
    _COMMIT_FAILURE_CHILDREN[reason].inc()


def record_outcomes(batch, outcomes) -> None:
    """Count the results of one committed batch, called by the commit loop after COMMIT, so
    that only results the callers receive are counted.

    One bincount per kind per batch, not per request: about 0.03 µs per item.
    """
    transfers, accounts = [], []
    for request, outcome in zip(batch, outcomes):
        if request.transfers is not None:
            transfers.append(outcome.results)
        elif request.accounts is not None:
            accounts.append(outcome.results)
        # CloseAccounts/ReopenAccounts results are not counted.
    for results, children in ((transfers, _TRANSFER_RESULT_CHILDREN),
                              (accounts, _ACCOUNT_RESULT_CHILDREN)):
        if results:
            _record_results(np.fromiter(itertools.chain.from_iterable(results), np.int64),
                            children)


# -- gauges read from the running engine at scrape time ----------------------------------------

class EngineCollector(Collector):
    """Reads queue depths, lease, pool and cache gauges from the engine being served.

    Runs in the metrics HTTP thread: it only reads, and reads defensively, because the event
    loop mutates the same objects concurrently.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._app = None

    def bind(self, app) -> None:
        with self._lock:
            self._app = app

    def unbind(self, app) -> None:
        with self._lock:
            if self._app is app:
                self._app = None

    def describe(self) -> Iterable:
        return []  # metrics appear once an engine is bound; registering must not scrape

    def collect(self) -> Iterable:
        with self._lock:
            app = self._app
        if app is None:
            return
        yield from _engine_families(app.engine, app.settings)
        yield from _pool_families(app.store)
        events = getattr(app, "events", None)
        if events is not None:
            yield from _event_families(events)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _engine_families(engine, settings) -> Iterable[GaugeMetricFamily]:
    shard_count = engine.shard_count
    yield _gauge("txengine_engine_available",
                 "1 while the engine holds its shard lease and can commit, else 0.",
                 1.0 if engine.available else 0.0)
    yield _gauge("txengine_shards", "Shards of the database (fixed when it was created).",
                 shard_count)
    lease = getattr(engine, "_lease", None)
    owned = len(lease.epochs) if lease is not None and engine.available else 0
    yield _gauge("txengine_shards_owned",
                 "Shards this process owns under its lease; below txengine_shards means fenced "
                 "out or recovering.", owned)
    yield _gauge("txengine_lease_epoch",
                 "Highest fencing epoch this process holds; it rises on every lease take-over "
                 "and after every failed commit.",
                 max(lease.epochs.values()) if lease is not None and lease.epochs else 0)
    queue = GaugeMetricFamily("txengine_shard_queue_items",
                              "Items admitted and waiting for a commit, per shard.",
                              labels=("shard",))
    depths = _retry_read(engine.queue_depths) or {}
    for shard in range(shard_count):
        queue.add_metric((str(shard),), depths.get(shard, 0))
    yield queue
    yield _gauge("txengine_shard_queue_items_max",
                 "Per-shard queue limit; past it requests get RESOURCE_EXHAUSTED.",
                 settings.shard_queue_items_max)
    yield _gauge("txengine_queue_requests", "Requests waiting for a commit.",
                 len(getattr(engine, "_queue", ())))
    head_age = _queue_head_age_seconds(engine)
    if head_age is not None:
        yield _gauge("txengine_queue_oldest_age_seconds",
                     "Age of the oldest request waiting for a commit.", head_age)
    yield CounterMetricFamily(
        "txengine_optimistic_conflicts",
        "Batches written on the assumption that their ids were new, then applied again with "
        "every id looked up because one was not (idempotent replays).",
        value=engine.optimistic_conflicts)
    cache = getattr(engine, "_cache", None)
    if cache is not None:
        yield _gauge("txengine_account_cache_accounts",
                     "Accounts held in the engine's memory.", cache.size)


def _event_families(events) -> Iterable:
    yield _gauge("txengine_outbox_lag_seconds",
                 "Age of the oldest committed change not yet published to Redis (0 when the "
                 "relay has caught up).", events.relay.lag_seconds(time.time_ns()))
    yield CounterMetricFamily("txengine_events_published_commits",
                              "Commits published to the Redis event streams by this process.",
                              value=events.relay.commits_published)


def _queue_head_age_seconds(engine) -> float | None:
    """Seconds the oldest queued request has waited (0 with an empty queue)."""
    queue = getattr(engine, "_queue", None)
    if queue is None:
        return None
    if not queue:
        return 0.0
    return max(0.0, time.monotonic() - queue[0].enqueued_at)


def _pool_families(store) -> Iterable[GaugeMetricFamily]:
    pool = getattr(store, "_pool", None)
    family = GaugeMetricFamily("txengine_db_pool_connections",
                               "Connections of the Postgres read pool, by state.",
                               labels=("state",))
    size = pool.get_size() if pool is not None else 0
    idle = pool.get_idle_size() if pool is not None else 0
    family.add_metric(("in_use",), size - idle)
    family.add_metric(("idle",), idle)
    yield family
    yield _gauge("txengine_db_pool_connections_max", "Size limit of the Postgres read pool.",
                 store.pool_size)


def _retry_read(read, attempts: int = 3):
    """A copy of a structure the event loop may be resizing at this instant."""
    for _ in range(attempts):
        try:
            return read()
        except RuntimeError:  # "dictionary changed size during iteration"
            continue
    return None


ENGINE = EngineCollector()
REGISTRY.register(ENGINE)


# -- the /metrics endpoint ---------------------------------------------------------------------

class MetricsServer:
    """The /metrics HTTP endpoint on its own thread, and the engine it reports on."""

    def __init__(self, listen: str, app) -> None:
        host, _, port = listen.rpartition(":")
        self._httpd, self._thread = start_http_server(int(port), host.strip("[]"),
                                                      registry=REGISTRY)
        self.host = host
        self.port = self._httpd.server_port
        self._app = app
        ENGINE.bind(app)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        ENGINE.unbind(self._app)
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
