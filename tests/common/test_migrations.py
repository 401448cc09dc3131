"""Migrations: in order, once, under a lock, and an edited applied file stops the run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from services.common import migrations
from services.common.migrations import MigrationError, apply_migrations, discover
from tests.support.servers import create_database, drop_database


@pytest.fixture
async def fresh_db(servers: tuple[str, str]) -> AsyncIterator[str]:
    dsn = await create_database(servers[0])
    yield dsn
    await drop_database(servers[0], dsn)


async def test_applies_every_service_once(fresh_db: str) -> None:
    first = await apply_migrations(fresh_db)
    assert first == [f"{m.service}/{m.version}" for m in discover()]
    assert await apply_migrations(fresh_db) == []
    conn = await asyncpg.connect(fresh_db)
    try:
        rows = await conn.fetch("SELECT service, version FROM schema_migrations")
        assert await conn.fetchval("SELECT to_regclass('products') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('users') IS NOT NULL")
    finally:
        await conn.close()
    assert len(rows) == len(first)


async def test_concurrent_runs_apply_each_file_once(fresh_db: str) -> None:
    results = await asyncio.gather(*(apply_migrations(fresh_db) for _ in range(4)))
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(f"{m.service}/{m.version}" for m in discover())


async def test_an_edited_applied_migration_stops_the_run(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    await apply_migrations(fresh_db)
    real = discover()
    edited = [migrations.Migration(m.service, m.version, m.sql + "\n-- edited") for m in real]
    monkeypatch.setattr(migrations, "discover", lambda services=(): edited)
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await apply_migrations(fresh_db)


async def test_a_failing_migration_is_rolled_back(
    fresh_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = [migrations.Migration("catalog", "999_broken", "CREATE TABLE t (x int); SELECT 1/0;")]
    monkeypatch.setattr(migrations, "discover", lambda services=(): broken)
    with pytest.raises(MigrationError, match="999_broken"):
        await apply_migrations(fresh_db)
    conn = await asyncpg.connect(fresh_db)
    try:
        assert not await conn.fetchval("SELECT to_regclass('t') IS NOT NULL")
        assert not await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = '999_broken')"
        )
    finally:
        await conn.close()
