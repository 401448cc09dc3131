"""redis-py asyncio client factory; the lifespan opens and closes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import BlockingConnectionPool, Redis

from services.common.settings import CommonSettings


def make_client(settings: CommonSettings) -> Redis:
    """A client with a bounded pool and timeouts on connect and every command."""
    pool = BlockingConnectionPool.from_url(
        settings.require_redis_url(),
        max_connections=settings.redis_pool_max,
        timeout=settings.redis_timeout_s,
        socket_timeout=settings.redis_timeout_s,
        socket_connect_timeout=settings.redis_timeout_s,
        health_check_interval=30,
    )
    return Redis(connection_pool=pool)


@asynccontextmanager
async def open_redis(settings: CommonSettings) -> AsyncIterator[Redis]:
    """Open a client for the lifespan and close its pool afterwards."""
    client = make_client(settings)
    try:
        yield client
    finally:
        await client.aclose()
        # A pool passed in explicitly is not closed by the client.
        await client.connection_pool.aclose()


async def ping(client: Redis) -> None:
    """Raise unless Redis answers PING."""
    await client.ping()
