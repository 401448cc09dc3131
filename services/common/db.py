"""asyncpg pool factory; the lifespan opens and closes it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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


class BoundedPool(asyncpg.Pool):
    """An asyncpg pool whose waits for a free connection are bounded.

    asyncpg's `acquire()` waits forever by default, and so do the `pool.fetch*()` and
    `pool.execute()` shortcuts built on it: under a queue longer than the pool, a
    request could wait well past every other timeout. Here a wait without a timeout of
    its own lasts at most `acquire_timeout_s`, then raises TimeoutError (a 503, like any
    Postgres outage: services/common/outage.py).
    """

    acquire_timeout_s: float | None = None

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self.acquire_timeout_s if timeout is None else timeout)


@asynccontextmanager
async def open_pool(settings: CommonSettings) -> AsyncIterator[asyncpg.Pool]:
    """Open a pool sized per process (each granian worker runs its own lifespan)."""
    # asyncpg.create_pool() with our pool class: the same arguments it passes.
    pool = BoundedPool(
        settings.require_database_url(),
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        max_queries=50_000,
        max_inactive_connection_lifetime=60.0,
        reset=keep_session,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        command_timeout=settings.db_command_timeout_s,
        timeout=settings.db_command_timeout_s,  # the connect timeout
    )
    pool.acquire_timeout_s = settings.db_acquire_timeout_s
    await pool
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
