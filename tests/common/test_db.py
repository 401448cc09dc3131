"""The pool's release: no reset query, but no transaction or listener survives a release."""

from __future__ import annotations

import asyncpg
import pytest

from services.common.db import open_pool
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
