"""FLT-5: 10,000 in-flight calls cancelled at random, on the pools the services use.

Each call asks for a value of its own and checks it got that value back, so a reply
delivered to the wrong caller (a connection returned to the pool with a reply still
on its way) is caught. Cancellations land before, during and after the round trip.
Afterwards the pools are whole: no connection leaked or left busy, and every one of
them still answers correctly.
"""

from __future__ import annotations

import asyncio
import random

from services.common.db import open_pool
from services.common.redis import open_redis
from services.common.settings import CommonSettings

CALLS = 10_000
WAVE = 20  # calls in flight at once: about twice the pool, so most are mid-call


async def _storm(call: object, checked: list[int], window_s: float) -> int:
    """Run CALLS calls in waves, cancelling about half at a random moment; return how
    many were cancelled. `call(n)` returns the value it was asked for, or raises;
    `window_s` spans about one call, so cancels land before, during and after."""
    rng = random.Random(5)
    cancelled = 0
    for start in range(0, CALLS, WAVE):
        tasks = [asyncio.create_task(call(n)) for n in range(start, start + WAVE)]  # type: ignore[operator]
        victims = [t for t in tasks if rng.random() < 0.5]
        await asyncio.sleep(rng.random() * window_s)
        for task in victims:
            task.cancel()
            await asyncio.sleep(0) if rng.random() < 0.1 else None
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for n, result in zip(range(start, start + WAVE), results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                cancelled += 1
            elif isinstance(result, BaseException):
                raise result
            else:
                assert result == n, f"call {n} got the reply of call {result}"
                checked.append(n)
    return cancelled


async def test_flt5_cancelled_postgres_calls_never_cross_replies(database_url: str) -> None:
    settings = CommonSettings(database_url=database_url, db_pool_min=2, db_pool_max=10)
    async with open_pool(settings) as pool:
        mid_query = 0

        async def call(n: int) -> int:
            nonlocal mid_query
            async with pool.acquire() as conn:
                try:
                    # A short server-side wait widens the window a cancel lands in.
                    value = await conn.fetchval("SELECT $1::int FROM pg_sleep(0.0005)", n)
                except asyncio.CancelledError:
                    mid_query += 1  # cancelled with the query sent or on its way
                    raise
            return int(value)

        checked: list[int] = []
        cancelled = await _storm(call, checked, 0.002)
        assert 1_000 < cancelled < CALLS - 1_000  # both kinds happened, plenty of each
        assert mid_query > 500
        assert len(checked) == CALLS - cancelled
        # Whole again: every connection back, idle, outside any transaction, and correct.
        assert pool.get_size() <= settings.db_pool_max
        assert pool.get_idle_size() == pool.get_size()
        conns = [await pool.acquire(timeout=5) for _ in range(settings.db_pool_max)]
        try:
            for i, conn in enumerate(conns):
                assert not conn.is_in_transaction()
                assert await conn.fetchval("SELECT $1::int", 100_000 + i) == 100_000 + i
        finally:
            for conn in conns:
                await pool.release(conn)


async def test_flt5_cancelled_redis_calls_never_cross_replies(redis_url: str) -> None:
    settings = CommonSettings(redis_url=redis_url, redis_pool_max=10)
    async with open_redis(settings) as client:

        async def call(n: int) -> int:
            return int(await client.echo(str(n)))

        checked: list[int] = []
        cancelled = await _storm(call, checked, 0.0003)
        assert 1_000 < cancelled < CALLS - 1_000
        assert len(checked) == CALLS - cancelled
        pool = client.connection_pool
        # Every connection went back to the pool, and each still answers its own call.
        assert len(pool._in_use_connections) == 0  # (no public count)
        replies = await asyncio.gather(*(call(200_000 + i) for i in range(50)))
        assert replies == [200_000 + i for i in range(50)]
