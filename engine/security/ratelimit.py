"""Per-principal rate limits shared by engine replicas through Redis, with a local fallback.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp
per key): each limit stores its theoretical arrival time ``tat``; a request of `cost` units
is allowed when ``tat - now + cost * interval <= burst`` (a request larger than the whole
burst is allowed when the bucket is full, then pays for all of it), and moves ``tat`` on by
``cost * interval``. All limits of one request are checked and charged atomically by one Lua
script, on Redis' clock, so every replica shares one budget per principal.

Redis is never on the path of a commit: when it fails or is slow, the limiter switches to the
same algorithm in process memory (each replica then enforces the whole rate on its own) for
FALLBACK_SECONDS, says so in the log and in ``txengine_rate_limit_backend``, then tries
Redis again.
"""
from __future__ import annotations

import dataclasses
import math
import time

import redis.asyncio as aioredis
import structlog

from engine.observability import metrics

log = structlog.get_logger("engine.security")

KEY_PREFIX = "txengine:rl:"
FALLBACK_SECONDS = 5.0
# Local buckets kept; idle ones are dropped first when the table is full.
LOCAL_KEYS_MAX = 100_000

GCRA_LUA = """
local now_t = redis.call('TIME')
local now = tonumber(now_t[1]) * 1000000 + tonumber(now_t[2])
local tats = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[3 * i - 2])
  local burst = tonumber(ARGV[3 * i - 1])
  local cost = tonumber(ARGV[3 * i])
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local wait = tat - now + math.min(cost * interval, burst) - burst
  if wait > 0 then return {0, math.ceil(wait)} end
  tats[i] = tat + cost * interval
end
for i, key in ipairs(KEYS) do
  local ttl_ms = math.ceil((tats[i] - now) / 1000) + 1000
  redis.call('SET', key, string.format('%.0f', tats[i]), 'PX', ttl_ms)
end
return {1, 0}
"""


@dataclasses.dataclass(frozen=True)
class Rate:
    """`per_second` units per second, up to `burst_seconds` worth at once."""

    key: str
    per_second: float
    burst_seconds: float
    cost: int

    @property
    def interval_us(self) -> float:
        return 1e6 / self.per_second

    @property
    def burst_us(self) -> float:
        # At least one unit fits the burst, whatever the rate.
        return max(self.burst_seconds * 1e6, self.interval_us)


class RateLimited(Exception):
    """A principal's rate limit was hit; retry after `retry_after_seconds`."""

    def __init__(self, what: str, retry_after_seconds: float):
        super().__init__(f"{what} rate limit exceeded; retry in {retry_after_seconds:.3f} s")
        self.retry_after_seconds = retry_after_seconds


class RateLimiter:
    """GCRA limits in Redis, falling back to process memory while Redis fails."""

    def __init__(self, redis: aioredis.Redis | None, clock=time.monotonic):
        self._redis = redis
        self._clock = clock  # seconds, for the local buckets
        self._script = redis.register_script(GCRA_LUA) if redis is not None else None
        self._redis_down_until = 0.0 if redis is not None else math.inf
        self._local: dict[str, float] = {}
        metrics.RATE_LIMIT_BACKEND.state("redis" if redis is not None else "local")

    async def acquire(self, what: str, rates: list[Rate]) -> None:
        """Charge every rate or none; raises RateLimited with the wait of the first that
        cannot pay."""
        rates = [r for r in rates if r.per_second > 0 and r.cost > 0]
        if not rates:
            return
        wait_us = await self._charge(rates)
        if wait_us > 0:
            raise RateLimited(what, wait_us / 1e6)

    async def _charge(self, rates: list[Rate]) -> float:
        if time.monotonic() >= self._redis_down_until:
            try:
                allowed, wait_us = await self._script(
                    keys=[KEY_PREFIX + r.key for r in rates],
                    args=[v for r in rates for v in (r.interval_us, r.burst_us, r.cost)])
                if self._redis_down_until:
                    log.info("rate limits shared through redis again")
                    metrics.RATE_LIMIT_BACKEND.state("redis")
                    self._redis_down_until = 0.0
                return 0.0 if allowed else float(wait_us)
            except (aioredis.RedisError, OSError, TimeoutError) as error:
                if not self._redis_down_until:
                    log.warning("redis unreachable; rate limits enforced per process",
                                error=type(error).__name__, retry_in_s=FALLBACK_SECONDS)
                metrics.RATE_LIMIT_BACKEND.state("local")
                metrics.RATE_LIMIT_FALLBACKS.inc()
                self._redis_down_until = time.monotonic() + FALLBACK_SECONDS
        return self._charge_locally(rates)

    def _charge_locally(self, rates: list[Rate]) -> float:
        now = self._clock() * 1e6
        tats = []
        for rate in rates:
            tat = max(self._local.get(rate.key, now), now)
            wait = tat - now + min(rate.cost * rate.interval_us, rate.burst_us) - rate.burst_us
            if wait > 0:
                return wait
            tats.append(tat + rate.cost * rate.interval_us)
        if len(self._local) >= LOCAL_KEYS_MAX:
            self._local = {k: t for k, t in self._local.items() if t > now}
        for rate, tat in zip(rates, tats):
            self._local[rate.key] = tat
        return 0.0
