"""Real Postgres and Redis for the tests: the URL variables when set, else embedded ones.

Each test session gets a database of its own (created, migrated, dropped) and a
Redis database index of its own (flushed before and after).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
from aiohttp import web

if TYPE_CHECKING:
    from services.common.embedded import EmbeddedRedis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(offsets: list[int]) -> int:
    """A base port such that base+offset is free for every offset."""
    for _ in range(200):
        base = 20_000 + (uuid.uuid4().int % 30_000)
        ok = True
        for off in offsets:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", base + off))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


def kill_redis(redis: EmbeddedRedis) -> None:
    """SIGKILL an embedded redis-server (no shutdown, no final AOF write) and reap it."""
    port = redis.url.rsplit(":", 1)[1].split("/")[0]
    victims = [
        proc
        for proc in psutil.process_iter(["name", "cmdline"])
        if "redis-server" in (proc.info["name"] or "")
        and any(f":{port}" in part or part == port for part in proc.info["cmdline"] or [])
    ]
    assert len(victims) == 1, victims
    os.kill(victims[0].pid, signal.SIGKILL)
    victims[0].wait(10)


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


def with_redis_db(url: str, index: int) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{index}"))


@contextmanager
def base_servers(data_dir: Path) -> Iterator[tuple[str, str]]:
    """(postgres admin DSN, redis URL): from the environment, else embedded servers."""
    dsn = os.environ.get("SHOPSTACK_DATABASE_URL")
    redis_url = os.environ.get("SHOPSTACK_REDIS_URL")
    pg = rd = None
    try:
        if not dsn:
            from services.common.embedded import EmbeddedPostgres

            pg = EmbeddedPostgres(data_dir / "postgres")
            dsn = pg.start()
        if not redis_url:
            from services.common.embedded import EmbeddedRedis

            rd = EmbeddedRedis(data_dir / "redis")
            redis_url = rd.start()
        yield dsn, redis_url
    finally:
        if rd is not None:
            rd.stop()
        if pg is not None:
            pg.stop()


async def create_database(admin_dsn: str) -> str:
    """Create a fresh database and return its DSN."""
    name = f"shopstack_test_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_dsn, name)


async def drop_database(admin_dsn: str, dsn: str) -> None:
    name = urlsplit(dsn).path.lstrip("/")
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextmanager
def migrated_database(admin_dsn: str) -> Iterator[str]:
    """A fresh database with every migration applied, dropped afterwards."""
    from services.common.migrations import apply_migrations

    dsn = asyncio.run(create_database(admin_dsn))
    try:
        asyncio.run(apply_migrations(dsn))
        yield dsn
    finally:
        asyncio.run(drop_database(admin_dsn, dsn))


@asynccontextmanager
async def aiohttp_site(app: web.Application, port: int) -> AsyncIterator[None]:
    """Serve a small aiohttp app (a test's upstream or receiver) on 127.0.0.1:port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield
    finally:
        await runner.cleanup()
