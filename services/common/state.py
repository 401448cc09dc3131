"""Lifespan state for services that own a Postgres pool and a Redis client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from redis.asyncio import Redis

from services.common import db, redis
from services.common.app import ServiceState
from services.common.health import Check
from services.common.settings import CommonSettings


class DataState(ServiceState):
    """A service state with a Postgres pool and a Redis client, both checked by /readyz."""

    def __init__(self, settings: CommonSettings, pool: asyncpg.Pool, client: Redis) -> None:
        super().__init__(settings)
        self.db = pool
        self.redis = client

    def readiness_checks(self) -> dict[str, Check]:
        return {"postgres": lambda: db.ping(self.db), "redis": lambda: redis.ping(self.redis)}


@asynccontextmanager
async def open_data_state(settings: CommonSettings) -> AsyncIterator[DataState]:
    """Open the pool and the client, yield the state, close both in reverse order."""
    async with db.open_pool(settings) as pool, redis.open_redis(settings) as client:
        yield DataState(settings, pool, client)
