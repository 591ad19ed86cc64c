"""Shared fixtures: a real Postgres and Redis for the session, a fresh database per test, and
the engine served in-process on a loopback port."""
from __future__ import annotations

import pathlib
import uuid

import asyncpg
import grpc
import pytest
import pytest_asyncio
import redis

from engine.config import Settings
from engine.gen.txengine.v1 import ledger_pb2_grpc
from engine.server import app as app_module


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run the long variants")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long variant: make chaos (or pytest --run-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A Postgres for the whole session (pgserver, unix socket, deleted afterwards)."""
    import pgserver

    server = pgserver.get_server(tmp_path_factory.mktemp("pg"), cleanup_mode="delete")
    yield server


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    from engine.storage.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.close()


@pytest.fixture
def database_url(postgres):
    """A new, empty database for one test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    postgres.psql(f"CREATE DATABASE {name};")
    yield postgres.get_uri(name)


@pytest.fixture
def settings(database_url, redis_url, tmp_path) -> Settings:
    # A Redis keyspace belongs to one ledger database (README, Committed-event stream): each
    # test's new database starts with an empty one.
    redis.Redis.from_url(redis_url).flushdb()
    return Settings(listen="127.0.0.1:0", database_url=database_url, redis_url=redis_url,
                    data_dir=tmp_path, shards=4, lease_wait_seconds=5)


@pytest_asyncio.fixture
async def engine_app(settings):
    app = await app_module.start(settings)
    yield app
    await app.stop(0)


@pytest_asyncio.fixture
async def stub(engine_app):
    async with grpc.aio.insecure_channel(engine_app.address) as channel:
        yield ledger_pb2_grpc.LedgerServiceStub(channel)


@pytest_asyncio.fixture
async def db(database_url):
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


ROOT = pathlib.Path(__file__).resolve().parent.parent
