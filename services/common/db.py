"""asyncpg pool factory; the lifespan opens and closes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from services.common.settings import CommonSettings

# Errors that mean "Postgres did not answer": it is down, restarting, unreachable or too
# slow. The request may be retried, so it is a 503 with Retry-After, never a 500.
PG_UNAVAILABLE: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,  # 08xxx, ConnectionDoesNotExistError among them
    asyncpg.AdminShutdownError,  # 57P01: session ended by a fast shutdown or restart
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed
    asyncpg.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.TooManyConnectionsError,  # 53300
    asyncpg.InterfaceError,  # "connection is closed": it died between acquire and use
    # An idle session told 57P01 is out of step ("another operation is in progress")
    # until asyncpg reads the EOF behind it; the pool may hand it out meanwhile (FLT-2).
    asyncpg.InternalClientError,
    OSError,  # refused, reset, unreachable
    TimeoutError,  # connect, acquire or command timeout
)
# InterfaceErrors that are our own mistakes, not an outage: a 500 should show them.
PG_NOT_AN_OUTAGE = (asyncpg.DataError, asyncpg.ClientConfigurationError)


async def keep_session(conn: asyncpg.Connection) -> None:
    """Release without the reset query asyncpg sends by default.

    That query (UNLISTEN, RESET ALL, advisory unlock, CLOSE ALL) is a round trip on
    every release, as costly as the statement before it. No code here changes
    session state on a pooled connection (no SET, LISTEN, advisory lock or cursor
    outside a transaction), and asyncpg still rolls back an open transaction and
    drops listeners before calling this.
    """


@asynccontextmanager
async def open_pool(settings: CommonSettings) -> AsyncIterator[asyncpg.Pool]:
    """Open a pool sized per process (each granian worker runs its own lifespan)."""
    pool = await asyncpg.create_pool(
        settings.require_database_url(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        command_timeout=settings.db_command_timeout_s,
        max_inactive_connection_lifetime=60.0,
        # The connect timeout. acquire() has none of its own: a waiter waits until a
        # connection frees up or fails (FLT-3 derives that bound).
        timeout=settings.db_command_timeout_s,
        reset=keep_session,
    )
    try:
        yield pool
    finally:
        await pool.close()


async def ping(pool: asyncpg.Pool) -> None:
    """Raise unless Postgres answers a trivial query."""
    async with pool.acquire(timeout=2.0) as conn:
        await conn.fetchval("SELECT 1", timeout=2.0)


# What storage functions accept: a pool, a pooled connection, or a bare connection.
Executor = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy
Connection = asyncpg.Connection | PoolConnectionProxy
