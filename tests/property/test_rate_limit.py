"""GCRA in process memory (the rate limiter's fallback): it never admits more than the rate
plus the burst, and a refused request fits once its announced wait has passed."""
from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.security.ratelimit import Rate, RateLimited, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


steps = st.lists(st.tuples(st.floats(0, 2, allow_nan=False), st.integers(1, 50)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(per_second=st.floats(1, 1000), burst_seconds=st.floats(0.05, 3), steps=steps)
def test_admitted_units_never_exceed_rate_times_time_plus_burst(per_second, burst_seconds, steps):
    clock = Clock()
    limiter = RateLimiter(None, clock=clock)
    burst_units = max(per_second * burst_seconds, 1)
    admitted, elapsed = 0, 0.0
    for advance, cost in steps:
        cost = min(cost, int(burst_units) or 1)
        clock.now += advance
        elapsed += advance
        try:
            asyncio.run(limiter.acquire("t", [Rate("k", per_second, burst_seconds, cost)]))
            admitted += cost
        except RateLimited:
            pass
        assert admitted <= per_second * elapsed + burst_units + 1e-6 * (1 + admitted)


@settings(max_examples=150, deadline=None)
@given(per_second=st.floats(1, 1000), burst_seconds=st.floats(0.05, 3),
       costs=st.lists(st.integers(1, 5000), min_size=1, max_size=30))
def test_a_refused_request_fits_after_its_announced_wait(per_second, burst_seconds, costs):
    clock = Clock()
    limiter = RateLimiter(None, clock=clock)
    for cost in costs:
        rate = Rate("k", per_second, burst_seconds, cost)
        try:
            asyncio.run(limiter.acquire("t", [rate]))
        except RateLimited as refused:
            assert refused.retry_after_seconds > 0
            clock.now += refused.retry_after_seconds + 1e-6
            asyncio.run(limiter.acquire("t", [rate]))


def test_limits_of_one_request_are_charged_together_or_not_at_all():
    clock = Clock()
    limiter = RateLimiter(None, clock=clock)
    requests, transfers = Rate("r", 100, 1, 1), Rate("t", 10, 1, 10)
    asyncio.run(limiter.acquire("t", [requests, transfers]))
    budget_before = dict(limiter._local)
    try:
        asyncio.run(limiter.acquire("t", [requests, transfers]))
    except RateLimited:
        pass
    else:
        raise AssertionError("the transfer budget was spent")
    assert limiter._local == budget_before
