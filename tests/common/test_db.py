"""The pool: no reset query on release, yet no transaction survives one; bounded waits."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from services.common.db import open_pool
from services.common.outage import unavailable_problem
from services.common.settings import CommonSettings


async def test_a_released_connection_never_carries_an_open_transaction(database_url: str) -> None:
    settings = CommonSettings(database_url=database_url, db_pool_min=1, db_pool_max=1)
    async with open_pool(settings) as pool:
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("CREATE TEMP TABLE left_open (x int)")
            # Released mid-transaction (as a cancelled request would): never committed.
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.execute("SELECT * FROM left_open")


async def test_a_release_sends_no_reset_query(database_url: str) -> None:
    settings = CommonSettings(database_url=database_url, db_pool_min=1, db_pool_max=1)
    observer = await asyncpg.connect(database_url)
    try:
        async with open_pool(settings) as pool:
            pid = await pool.fetchval("SELECT pg_backend_pid()")
            await pool.fetchval("SELECT 42 AS marker")
            # The pooled session's last statement is ours, not asyncpg's RESET ALL/UNLISTEN.
            last = await observer.fetchval("SELECT query FROM pg_stat_activity WHERE pid = $1", pid)
            assert last == "SELECT 42 AS marker"
    finally:
        await observer.close()


async def test_a_wait_for_a_pooled_connection_is_bounded(database_url: str) -> None:
    settings = CommonSettings(
        database_url=database_url, db_pool_min=1, db_pool_max=1, db_acquire_timeout_s=0.3
    )
    async with open_pool(settings) as pool:
        async with pool.acquire() as held:
            loop = asyncio.get_running_loop()
            started = loop.time()
            # The shortcut waits for the only connection, then gives up: TimeoutError,
            # which the catch-alls answer with 503 (services/common/outage.py).
            with pytest.raises(TimeoutError):
                await pool.fetchval("SELECT 1")
            waited = loop.time() - started
            assert 0.3 <= waited < 3.0
            assert unavailable_problem(TimeoutError()) is not None
            # A caller's own timeout still wins over the default.
            with pytest.raises(TimeoutError):
                async with pool.acquire(timeout=0.05):
                    pass
            assert await held.fetchval("SELECT 2") == 2
        # Freed again: the next wait is served at once, and the pool is whole.
        assert await pool.fetchval("SELECT 3") == 3
        assert pool.get_size() == 1
        assert pool.get_idle_size() == 1
