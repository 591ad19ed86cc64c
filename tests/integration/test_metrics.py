"""/metrics of an engine served in-process: the gRPC series move with the right labels for
unary and streaming RPCs (aborted ones included), the engine internals are there, and every
label set stays bounded. Also the correlation id: echoed back and bound to the RPC's logs."""
from __future__ import annotations

import asyncio
import collections
import re
import urllib.request

import grpc
import numpy as np
import pytest
import pytest_asyncio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from engine.gen.txengine.v1 import ledger_pb2 as pb
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.observability import metrics
from engine.results import TransferResult
from engine.server import app as app_module
from engine.server.interceptors import CORRELATION_ID_KEY, grpc_type
from tests.harness import account, transfer

SERVICE = "txengine.v1.LedgerService"
Samples = dict[tuple[str, frozenset], float]


def scrape_text(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(address: str) -> Samples:
    return parse(await asyncio.to_thread(scrape_text, address))


def value(samples: Samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def rpc(method: str, kind: str = "unary", service: str = SERVICE) -> dict:
    return {"grpc_type": kind, "grpc_service": service, "grpc_method": method}


@pytest_asyncio.fixture
async def served(settings):
    app = await app_module.start(settings.model_copy(update={"metrics_listen": "127.0.0.1:0"}))
    yield app
    await app.stop(0)


@pytest_asyncio.fixture
async def channel(served):
    async with grpc.aio.insecure_channel(served.address) as channel:
        yield channel


async def _stream_transfers(channel, requests) -> tuple[int, grpc.StatusCode]:
    """(responses received, final status) of one StreamTransfers call."""
    call = ledger_pb2_grpc.LedgerServiceStub(channel).StreamTransfers(iter(requests))
    responses = 0
    try:
        async for _ in call:
            responses += 1
    except grpc.aio.AioRpcError as error:
        return responses, error.code()
    return responses, grpc.StatusCode.OK


async def test_rpcs_move_the_grpc_series(served, channel):
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    before = await scrape(served.metrics.address)
    alice, bob = account(), account()
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[alice, bob]))
    good = transfer(alice.id, bob.id, 10)
    for _ in range(2):  # OK, then an idempotent replay (EXISTS)
        await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[good]))
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.CreateTransfers(pb.CreateTransfersRequest(
            transfers=[transfer(b"short", bob.id, 10)]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    streamed = pb.StreamTransfersRequest(transfers=[transfer(alice.id, bob.id, 5)])
    assert await _stream_transfers(channel, [streamed]) == (1, grpc.StatusCode.OK)
    malformed = pb.StreamTransfersRequest(transfers=[transfer(b"short", bob.id, 5)])
    assert await _stream_transfers(channel, [malformed]) == (
        0, grpc.StatusCode.INVALID_ARGUMENT)  # the stream is aborted with the status
    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    after = await scrape(served.metrics.address)

    create = rpc("CreateTransfers")
    assert delta(before, after, "grpc_server_started_total", **create) == 3
    assert delta(before, after, "grpc_server_handled_total", **create, grpc_code="OK") == 2
    assert delta(before, after, "grpc_server_handled_total", **create,
                 grpc_code="InvalidArgument") == 1
    assert delta(before, after, "grpc_server_handling_seconds_count", **create) == 3
    assert delta(before, after, "grpc_server_msg_received_total", **create) == 3
    assert delta(before, after, "grpc_server_msg_sent_total", **create) == 2  # none when aborted
    assert delta(before, after, "grpc_server_handled_total", **rpc("CreateAccounts"),
                 grpc_code="OK") == 1

    stream = rpc("StreamTransfers", "bidi_stream")
    assert delta(before, after, "grpc_server_started_total", **stream) == 2
    assert delta(before, after, "grpc_server_handled_total", **stream, grpc_code="OK") == 1
    assert delta(before, after, "grpc_server_handled_total", **stream,
                 grpc_code="InvalidArgument") == 1
    assert delta(before, after, "grpc_server_handling_seconds_count", **stream) == 2
    assert delta(before, after, "grpc_server_msg_received_total", **stream) == 2
    assert delta(before, after, "grpc_server_msg_sent_total", **stream) == 1

    health = rpc("Check", service="grpc.health.v1.Health")
    assert delta(before, after, "grpc_server_handled_total", **health, grpc_code="OK") == 1


async def test_every_ledger_method_is_there_before_its_first_call(served):
    samples = await scrape(served.metrics.address)
    for method in pb.DESCRIPTOR.services_by_name["LedgerService"].methods:
        labels = rpc(method.name, grpc_type(method.client_streaming, method.server_streaming))
        assert ("grpc_server_started_total", frozenset(labels.items())) in samples
        assert ("grpc_server_handled_total",
                frozenset({**labels, "grpc_code": "Unavailable"}.items())) in samples


async def test_an_unknown_method_is_not_counted(served, channel):
    call = channel.unary_unary(f"/{SERVICE}/NoSuchMethod")
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(b"")
    assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    text = await asyncio.to_thread(scrape_text, served.metrics.address)
    assert "NoSuchMethod" not in text


async def test_engine_internals(served, channel):
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    before = await scrape(served.metrics.address)
    accounts = [account() for _ in range(4)]
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=accounts))
    await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[
        transfer(accounts[0].id, accounts[1].id, 5), transfer(accounts[2].id, accounts[3].id, 7),
    ]))
    after = await scrape(served.metrics.address)

    assert value(after, "txengine_engine_available") == 1
    assert value(after, "txengine_shards") == 4
    assert value(after, "txengine_shards_owned") == 4
    assert value(after, "txengine_lease_epoch") >= 1
    assert value(after, "txengine_shard_queue_items_max") == served.settings.shard_queue_items_max
    for shard in range(4):
        assert ("txengine_shard_queue_items", frozenset({("shard", str(shard))})) in after
    assert value(after, "txengine_db_pool_connections_max") == served.settings.database_pool_size
    assert ("txengine_db_pool_connections", frozenset({("state", "in_use")})) in after
    assert value(after, "txengine_account_cache_accounts") >= 4

    assert delta(before, after, "txengine_commit_batch_items_count") == 2
    assert delta(before, after, "txengine_commit_batch_items_sum") == 6
    for stage in ("load_accounts", "write"):
        assert delta(before, after, "txengine_stage_seconds_count", stage=stage) == 2
    for stage in ("decode", "kernel", "encode"):
        assert delta(before, after, "txengine_stage_seconds_count", stage=stage) == 1
    for reason in metrics.COMMIT_FAILURE_REASONS:
        assert value(after, "txengine_commit_failures_total", reason=reason) == 0
    assert ("txengine_optimistic_conflicts_total", frozenset()) in after
    assert value(after, "process_cpu_seconds_total") > 0


def _engine_counts_results() -> bool:
    import inspect

    from engine.posting import engine as posting_engine

    return "record_outcomes" in inspect.getsource(posting_engine)


@pytest.mark.skipif(not _engine_counts_results(),
                    reason="needs the engine hook metrics.record_outcomes (issue 8)")
async def test_transfer_results_by_result(served, channel):
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    alice, bob = account(), account()
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[alice, bob]))
    before = await scrape(served.metrics.address)
    good = transfer(alice.id, bob.id, 10)
    await stub.CreateTransfers(pb.CreateTransfersRequest(transfers=[good]))
    await stub.CreateTransfers(pb.CreateTransfersRequest(
        transfers=[good, transfer(alice.id, alice.id, 1)]))
    after = await scrape(served.metrics.address)
    counted = "txengine_transfer_results_total"
    assert delta(before, after, counted, result="OK") == 1
    assert delta(before, after, counted, result="EXISTS") == 1
    assert delta(before, after, counted, result="ACCOUNTS_MUST_BE_DIFFERENT") == 1


def test_result_counting_is_one_bincount_per_batch():
    name = "txengine_transfer_results_total"
    before = parse(generate_latest(metrics.REGISTRY).decode())
    metrics.record_transfer_results(np.array(
        [TransferResult.OK] * 3 + [TransferResult.EXISTS] * 2, np.uint32))
    after = parse(generate_latest(metrics.REGISTRY).decode())
    assert delta(before, after, name, result="OK") == 3
    assert delta(before, after, name, result="EXISTS") == 2


# Label values are drawn from sets fixed at start-up; an id (32 hex digits or raw bytes) or a
# free-form string in a label would be an unbounded series.
BOUNDED_LABELS = {
    "grpc_type": {"unary", "client_stream", "server_stream", "bidi_stream"},
    "grpc_code": set(metrics.GRPC_CODE_LABEL.values()),
    "result": {r.name for r in TransferResult} | {r.name for r in metrics.AccountResult},
    "state": {"in_use", "idle"},
    "reason": set(metrics.COMMIT_FAILURE_REASONS),
}


async def test_label_sets_are_bounded(served, channel):
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    await stub.CreateAccounts(pb.CreateAccountsRequest(accounts=[account()]))
    samples = await scrape(served.metrics.address)
    values = collections.defaultdict(set)
    for _, labels in samples:
        for key, label_value in labels:
            values[key].add(label_value)
    for key, allowed in BOUNDED_LABELS.items():
        assert values[key] <= allowed, (key, values[key] - allowed)
    assert values["shard"] <= {str(s) for s in range(served.engine.shard_count)}
    assert values["stage"] <= set(metrics_stages())
    assert values["grpc_service"] <= {SERVICE, "grpc.health.v1.Health",
                                      "grpc.reflection.v1alpha.ServerReflection"}


def metrics_stages():
    from engine.observability.stages import STAGES

    return STAGES


async def test_correlation_id_is_echoed_and_bound_to_logs(served, channel):
    stub = ledger_pb2_grpc.LedgerServiceStub(channel)
    call = stub.LookupAccounts(pb.LookupAccountsRequest(ids=[]),
                               metadata=((CORRELATION_ID_KEY, "order-42"),))
    await call
    assert (CORRELATION_ID_KEY, "order-42") in tuple(await call.trailing_metadata())

    call = stub.LookupAccounts(pb.LookupAccountsRequest(ids=[]))
    await call
    generated = dict(await call.trailing_metadata())[CORRELATION_ID_KEY]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)

    # An error keeps it beside its status details.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[b"short"]),
                                  metadata=((CORRELATION_ID_KEY, "order-44"),))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(refused.value.trailing_metadata())
    assert trailers[CORRELATION_ID_KEY] == "order-44"
    assert "grpc-status-details-bin" in trailers

    # A response stream has it at once, in its initial metadata, and at its end.
    stream = stub.StreamTransfers(metadata=((CORRELATION_ID_KEY, "order-45"),))
    assert (CORRELATION_ID_KEY, "order-45") in tuple(await stream.initial_metadata())
    await stream.done_writing()
    assert [r async for r in stream] == []
    assert (CORRELATION_ID_KEY, "order-45") in tuple(await stream.trailing_metadata())

    with structlog.testing.capture_logs(
            processors=[structlog.contextvars.merge_contextvars]) as captured:
        await stub.LookupAccounts(pb.LookupAccountsRequest(ids=[]),
                                  metadata=((CORRELATION_ID_KEY, "order-43"),))
    lines = [line for line in captured if line.get("correlation_id") == "order-43"]
    assert lines and lines[0]["rpc"] == "LookupAccounts"
    assert structlog.contextvars.get_contextvars().get("correlation_id") is None


async def test_dashboard_and_rules_use_only_exported_metrics(served):
    """Every series the Grafana dashboard and the alert rules read (other than Prometheus's `up`
    and postgres_exporter's pg_*) is on a live engine's /metrics."""
    from tests.unit.test_deploy import metric_names_used

    exported = {name for name, _ in await scrape(served.metrics.address)}
    used = metric_names_used()
    assert used, "no metric names found in deploy/"
    assert used - exported == set()
