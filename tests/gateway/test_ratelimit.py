"""Token buckets in Redis: several buckets taken in one round trip, as separate calls would."""

from __future__ import annotations

import uuid

import redis.asyncio as aioredis

from services.gateway.ratelimit import Bucket, RateLimiter

SLOW = Bucket(rate_per_s=0.001, burst=2)  # refills ~nothing during a test
ROOMY = Bucket(rate_per_s=0.001, burst=100)


def keys() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    return f"t-user-{tag}", f"t-ip-{tag}"


async def tokens(rds: aioredis.Redis, key: str) -> float:
    raw = await rds.hget(f"ratelimit:{key}", "tokens")
    return float(raw) if raw is not None else float("nan")


async def test_every_bucket_pays_until_the_first_that_cannot(rds: aioredis.Redis) -> None:
    limiter = RateLimiter(rds)
    user, ip = keys()
    first = await limiter.take_each((user, SLOW), (ip, ROOMY))
    second = await limiter.take_each((user, SLOW), (ip, ROOMY))
    assert first.allowed
    assert second.allowed
    assert round(await tokens(rds, user)) == 0
    assert round(await tokens(rds, ip)) == 98
    # The user's bucket is empty: refused, and the IP bucket behind it is not charged.
    third = await limiter.take_each((user, SLOW), (ip, ROOMY))
    assert not third.allowed
    assert third.retry_after_s >= 1
    assert round(await tokens(rds, ip)) == 98


async def test_a_later_bucket_refusing_keeps_what_the_earlier_paid(rds: aioredis.Redis) -> None:
    limiter = RateLimiter(rds)
    user, ip = keys()
    await limiter.take_each((ip, SLOW))
    await limiter.take_each((ip, SLOW))
    refused = await limiter.take_each((user, ROOMY), (ip, SLOW))
    assert not refused.allowed
    # As `take(user)` then `take(ip)` would: the user's token is spent.
    assert round(await tokens(rds, user)) == 99


async def test_take_and_peek_on_one_bucket(rds: aioredis.Redis) -> None:
    limiter = RateLimiter(rds)
    user, _ = keys()
    assert (await limiter.peek(user, SLOW)).allowed
    assert await rds.exists(f"ratelimit:{user}") == 0  # a peek writes nothing
    assert (await limiter.take(user, SLOW, cost=2)).allowed
    assert not (await limiter.peek(user, SLOW)).allowed
    assert not (await limiter.take(user, SLOW)).allowed
