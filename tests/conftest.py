"""Session fixtures: real Postgres and Redis, a fresh database, settings, the stack."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from tests.support.servers import base_servers, migrated_database, with_redis_db

# Each concurrent test run on one Redis picks its own index (0 is left to `make run`).
REDIS_TEST_DB = int(os.environ.get("SHOPSTACK_TEST_REDIS_DB", "9"))


@pytest.fixture(scope="session")
def servers() -> Iterator[tuple[str, str]]:
    # Not under pytest's tmp base: a later pytest run on the same machine prunes old
    # /tmp/pytest-of-<user>/pytest-N directories, live embedded data dirs included.
    data_dir = Path(tempfile.mkdtemp(prefix="shopstack-test-servers-"))
    try:
        with base_servers(data_dir) as found:
            yield found
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(servers: tuple[str, str]) -> Iterator[str]:
    with migrated_database(servers[0]) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def redis_url(servers: tuple[str, str]) -> Iterator[str]:
    url = with_redis_db(servers[1], REDIS_TEST_DB)

    async def flush() -> None:
        client = aioredis.Redis.from_url(url)
        await client.flushdb()
        await client.aclose()

    asyncio.run(flush())
    yield url
    asyncio.run(flush())


@pytest.fixture(scope="session")
def service_env(database_url: str, redis_url: str) -> dict[str, str]:
    """Environment for service processes and settings objects under test."""
    return {
        "SHOPSTACK_ENV": "test",
        "SHOPSTACK_DATABASE_URL": database_url,
        "SHOPSTACK_REDIS_URL": redis_url,
        "SHOPSTACK_LOG_LEVEL": "WARNING",
    }


@pytest.fixture(scope="session")
def settings_kwargs(database_url: str, redis_url: str) -> dict[str, Any]:
    return {"database_url": database_url, "redis_url": redis_url, "log_level": "WARNING"}


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def rds(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()
