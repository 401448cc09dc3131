"""Token buckets in Redis, shared by every gateway worker.

One Lua script refills and takes atomically; the bucket's state is a hash
with a TTL, so idle keys disappear. Time comes from Redis (TIME), so workers
with skewed clocks agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis

# KEYS: buckets, in order. ARGV: per bucket rate, burst, cost, consume (1/0).
# Buckets are taken in order and the first that cannot pay stops the run (the ones
# before it keep what they paid, as separate calls would). Returns {refused, wait}:
# refused is the 1-based index of that bucket, 0 when every bucket paid.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i, key in ipairs(KEYS) do
    local at = (i - 1) * 4
    local rate = tonumber(ARGV[at + 1])
    local burst = tonumber(ARGV[at + 2])
    local cost = tonumber(ARGV[at + 3])
    local consume = ARGV[at + 4] == '1'
    local state = redis.call('HMGET', key, 'tokens', 'ts')
    local tokens = tonumber(state[1])
    local ts = tonumber(state[2])
    if tokens == nil then
        tokens = burst
        ts = now
    end
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
    local allowed = tokens >= cost
    if allowed and consume then
        tokens = tokens - cost
    end
    if consume then
        redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(now))
        redis.call('EXPIRE', key, math.ceil(burst / rate) + 1)
    end
    if not allowed then
        return {i, tostring((cost - tokens) / rate)}
    end
end
return {0, '0'}
"""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: int


@dataclass(frozen=True)
class Bucket:
    rate_per_s: float
    burst: int


class RateLimiter:
    def __init__(self, redis: Redis, *, prefix: str = "ratelimit") -> None:
        self._script = redis.register_script(_TAKE)
        self.prefix = prefix

    async def take(self, key: str, bucket: Bucket, cost: int = 1) -> Decision:
        """Take `cost` tokens if there are enough; RedisError propagates (callers fail closed)."""
        return await self._run([(key, bucket)], cost, consume=True)

    async def take_each(self, *buckets: tuple[str, Bucket]) -> Decision:
        """`take` one token from each bucket in order, in one round trip.

        The first bucket that cannot pay refuses the whole request; the buckets
        before it keep what they paid, as the same `take` calls in a row would.
        """
        return await self._run(list(buckets), 1, consume=True)

    async def peek(self, key: str, bucket: Bucket, cost: int = 1) -> Decision:
        """Would `take` succeed? Takes nothing."""
        return await self._run([(key, bucket)], cost, consume=False)

    async def _run(
        self, buckets: list[tuple[str, Bucket]], cost: int, *, consume: bool
    ) -> Decision:
        args: list[float | int | str] = []
        for _, bucket in buckets:
            args += [bucket.rate_per_s, bucket.burst, cost, "1" if consume else "0"]
        refused, wait = await self._script(
            keys=[f"{self.prefix}:{key}" for key, _ in buckets], args=args
        )
        return Decision(int(refused) == 0, max(1, math.ceil(float(wait))))
