"""Token buckets in Redis, shared by every gateway worker.

One Lua script refills and takes atomically; the bucket's state is a hash
with a TTL, so idle keys disappear. Time comes from Redis (TIME), so workers
with skewed clocks agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis

_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local consume = ARGV[4] == '1'
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then
    tokens = burst
    ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
local allowed = 0
local wait = 0
if tokens >= cost then
    allowed = 1
    if consume then
        tokens = tokens - cost
    end
else
    wait = (cost - tokens) / rate
end
if consume then
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
    redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 1)
end
return {allowed, tostring(wait)}
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
        return await self._run(key, bucket, cost, consume=True)

    async def peek(self, key: str, bucket: Bucket, cost: int = 1) -> Decision:
        """Would `take` succeed? Takes nothing."""
        return await self._run(key, bucket, cost, consume=False)

    async def _run(self, key: str, bucket: Bucket, cost: int, *, consume: bool) -> Decision:
        allowed, wait = await self._script(
            keys=[f"{self.prefix}:{key}"],
            args=[bucket.rate_per_s, bucket.burst, cost, "1" if consume else "0"],
        )
        return Decision(bool(int(allowed)), max(1, math.ceil(float(wait))))
