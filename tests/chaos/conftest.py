"""Fixtures of the chaos scenarios: one Postgres per module (its own cluster, crashable), and a
factory of scenario clusters that are always torn down and leave Postgres running."""
from __future__ import annotations

import pytest
import pytest_asyncio

from chaos.cluster import SEED_ENV, ChaosCluster
from chaos.controllers import PostgresController


def pytest_addoption(parser):
    # Registered only when this directory is named on the command line (as `make chaos`
    # does); otherwise use $TXENGINE_CHAOS_SEED.
    parser.addoption("--chaos-seed", type=int, default=None,
                     help=f"seed of the chaos workload and fault schedule [{SEED_ENV}]")


@pytest.fixture(scope="module")
def chaos_postgres():
    pg = PostgresController()
    pg.start()
    yield pg
    pg.close()


@pytest_asyncio.fixture
async def make_cluster(chaos_postgres, tmp_path, request):
    made: list[ChaosCluster] = []

    async def make(name: str, *, seed: int, **kwargs) -> ChaosCluster:
        workdir = tmp_path / f"cluster{len(made)}"
        workdir.mkdir()
        cluster = ChaosCluster(name, chaos_postgres, workdir, seed=seed, **kwargs)
        made.append(cluster)
        await cluster.start()
        return cluster

    yield make
    for cluster in made:
        await cluster.close()
