"""Token buckets in Redis: several buckets taken in one round trip, as separate calls would."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.gateway.ratelimit import _TAKE_SHA, MAX_BATCH, Bucket, RateLimiter
from tests.support.faultproxy import FaultProxy
from tests.support.servers import free_port

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


async def test_calls_of_one_loop_turn_share_a_pipeline_and_keep_their_order(
    rds: aioredis.Redis,
) -> None:
    limiter = RateLimiter(rds)
    user, ip = keys()
    bucket = Bucket(rate_per_s=0.001, burst=20)
    decisions = await asyncio.gather(*(limiter.take_each((user, bucket)) for _ in range(30)))
    # Each script runs atomically in arrival order: the first 20 pay, the rest are refused.
    assert [d.allowed for d in decisions] == [True] * 20 + [False] * 10
    assert round(await tokens(rds, user)) == 0
    # A batch mixes callers and buckets; every caller gets its own answer.
    mixed = await asyncio.gather(
        limiter.take_each((ip, ROOMY)), limiter.take_each((user, bucket)), limiter.peek(ip, ROOMY)
    )
    assert [d.allowed for d in mixed] == [True, False, True]
    assert round(await tokens(rds, ip)) == 99


async def test_noscript_after_a_script_flush_loads_it_and_charges_once(
    rds: aioredis.Redis,
) -> None:
    limiter = RateLimiter(rds)
    user, ip = keys()
    assert (await limiter.take_each((user, SLOW), (ip, ROOMY))).allowed
    await rds.script_flush()  # as a Redis restart or failover would
    assert (await limiter.take_each((user, SLOW), (ip, ROOMY))).allowed
    assert round(await tokens(rds, user)) == 0
    assert round(await tokens(rds, ip)) == 98
    await rds.script_flush()
    # A whole batch answered NOSCRIPT: loaded once, each call resent once, limits still hold.
    batch = await asyncio.gather(
        limiter.take_each((user, SLOW), (ip, ROOMY)), limiter.take_each((ip, ROOMY))
    )
    assert [d.allowed for d in batch] == [False, True]
    assert round(await tokens(rds, ip)) == 97
    assert (await rds.script_exists(_TAKE_SHA)) == [True]


async def test_every_caller_of_a_failed_batch_gets_the_redis_error() -> None:
    dead = aioredis.Redis.from_url(
        f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.2, socket_timeout=0.2
    )
    limiter = RateLimiter(dead)
    try:
        results = await asyncio.gather(
            *(limiter.take_each((f"k{i}", ROOMY)) for i in range(3)), return_exceptions=True
        )
    finally:
        await dead.aclose()
    assert all(isinstance(r, RedisError) for r in results), results


async def test_a_turn_with_more_calls_than_one_pipeline_holds(rds: aioredis.Redis) -> None:
    limiter = RateLimiter(rds)
    user, _ = keys()
    bucket = Bucket(rate_per_s=0.001, burst=MAX_BATCH + 50)
    decisions = await asyncio.gather(
        *(limiter.take_each((user, bucket)) for _ in range(MAX_BATCH + 60))
    )
    assert sum(d.allowed for d in decisions) == MAX_BATCH + 50
    assert round(await tokens(rds, user)) == 0


async def test_take_then_peek_in_one_round_trip_as_two_calls_would(rds: aioredis.Redis) -> None:
    limiter = RateLimiter(rds)
    ip, user = keys()
    assert (await limiter.take_then_peek((ip, SLOW), (user, SLOW))).allowed
    assert round(await tokens(rds, ip)) == 1
    assert await rds.exists(f"ratelimit:{user}") == 0  # peeked, not written
    await limiter.take(user, SLOW, cost=2)
    # The peeked bucket refuses: the first keeps what it paid, as take-then-peek would.
    refused = await limiter.take_then_peek((ip, SLOW), (user, SLOW))
    assert not refused.allowed
    assert refused.retry_after_s >= 1
    assert round(await tokens(rds, ip)) == 0
    # The first refuses: the second is not asked.
    assert not (await limiter.take_then_peek((ip, SLOW), (user, ROOMY))).allowed


async def test_a_caller_waits_at_most_its_timeout_and_the_command_still_runs(
    rds: aioredis.Redis, redis_url: str
) -> None:
    user, _ = keys()
    async with FaultProxy.for_url(redis_url) as proxy:
        # One connection: every command waits for it instead of opening another
        # (whose handshake, four round trips on the slow link, would blur the timings).
        pool = aioredis.BlockingConnectionPool.from_url(proxy.url, max_connections=1, timeout=5)
        slow = aioredis.Redis(connection_pool=pool)
        limiter = RateLimiter(slow, timeout_s=0.1)
        try:
            await limiter.peek(user, ROOMY)  # connected before the link slows down
            proxy.latency(400, direction="downstream")
            started = time.monotonic()
            with pytest.raises(RedisTimeoutError):
                await limiter.take(user, ROOMY)
            assert time.monotonic() - started < 0.3
            with pytest.raises(RedisTimeoutError):
                await limiter.take(user, ROOMY, timeout_s=0)  # sent, not waited for
            # Both scripts ran in Redis all the same (the replies were what was slow).
            for _ in range(300):
                if round(await tokens(rds, user)) == 98:
                    break
                await asyncio.sleep(0.01)
            assert round(await tokens(rds, user)) == 98
            # A longer budget for one call gets its answer.
            assert (await limiter.take(user, ROOMY, timeout_s=2)).allowed
        finally:
            await slow.aclose()
            await pool.aclose()
