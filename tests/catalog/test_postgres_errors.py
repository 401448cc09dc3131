"""The order path tells a Postgres outage (503) from a bug that only looks like one (500).

asyncpg's ClientConfigurationError (a bad DSN or connection option) subclasses
InterfaceError, which also covers "connection is closed"; the catalog's order path used
to answer both with 503, so a misconfiguration read as an outage and clients were told
to retry what no retry fixes.
"""

from __future__ import annotations

import asyncpg
import pytest

from services.catalog import orders
from services.common.errors import UpstreamUnavailable


async def test_an_outage_becomes_503_with_retry_after(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    await conn.close()
    with pytest.raises(UpstreamUnavailable) as caught:
        async with orders.postgres_guard():
            await conn.fetchval("SELECT 1")  # a connection that died under us
    assert caught.value.status == 503
    assert caught.value.headers == {"Retry-After": "1"}
    assert "database is unavailable" in str(caught.value)


async def test_a_data_error_is_a_bug_not_an_outage(pg: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.DataError):
        async with orders.postgres_guard():
            await pg.fetchval("SELECT $1::int", "not a number")
    assert await pg.fetchval("SELECT 1") == 1  # the session itself is fine


async def test_a_misconfiguration_is_not_an_outage(database_url: str) -> None:
    joiner = "&" if "?" in database_url else "?"
    with pytest.raises(asyncpg.ClientConfigurationError):
        async with orders.postgres_guard():
            await asyncpg.connect(f"{database_url}{joiner}sslmode=bogus")
