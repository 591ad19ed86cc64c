"""Rate limits in a real Redis: one budget per principal shared by every replica, and the
local fallback while Redis is down."""
from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from engine.observability import metrics
from engine.security.ratelimit import Rate, RateLimited, RateLimiter
from tests.chaos.controllers import RedisController


def backend() -> str:
    for sample in metrics.RATE_LIMIT_BACKEND.collect()[0].samples:
        if sample.value == 1:
            return sample.labels["txengine_rate_limit_backend"]
    raise AssertionError("no backend state")


async def admitted(limiter: RateLimiter, rate: Rate, attempts: int) -> int:
    count = 0
    for _ in range(attempts):
        try:
            await limiter.acquire("request", [rate])
            count += 1
        except RateLimited as refused:
            assert refused.retry_after_seconds > 0
    return count


async def test_replicas_share_one_budget_per_principal(redis_url):
    # A slow rate, so that the test's own duration adds nothing to the budget.
    rate = Rate("replicas-share:requests", per_second=0.01, burst_seconds=1000, cost=1)
    clients = [aioredis.Redis.from_url(redis_url) for _ in range(2)]
    try:
        first, second = (RateLimiter(client) for client in clients)
        assert await admitted(first, rate, 6) == 6
        assert await admitted(second, rate, 10) == 4  # the burst is 10 units in all
        assert await admitted(first, Rate("another-principal:requests", 0.01, 1000, 1), 3) == 3
        assert backend() == "redis"
    finally:
        for client in clients:
            await client.aclose()


async def test_with_redis_down_limits_hold_per_process(tmp_path):
    server = RedisController(tmp_path)
    server.start()
    client = aioredis.Redis.from_url(server.url, socket_timeout=1, socket_connect_timeout=1)
    limiter = RateLimiter(client)
    rate = Rate("fallback:requests", per_second=0.01, burst_seconds=500, cost=1)
    try:
        assert await admitted(limiter, rate, 2) == 2
        fallbacks = metrics.RATE_LIMIT_FALLBACKS._value.get()
        server.kill()
        assert await admitted(limiter, rate, 8) == 5  # a fresh local budget of 5
        assert backend() == "local"
        assert metrics.RATE_LIMIT_FALLBACKS._value.get() > fallbacks
    finally:
        await client.aclose()
        server.kill()


@pytest.fixture(autouse=True)
def _restore_backend_state():
    yield
    metrics.RATE_LIMIT_BACKEND.state("redis")
