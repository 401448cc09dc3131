"""FLT-2: PostgreSQL restarted (`pg_ctl restart -m fast`) under 200 req/s.

The catalog runs as a real process (granian, one worker) on a PostgreSQL and a Redis of
its own, so the restart touches nothing else. An open-model load (requests fired on a
fixed schedule, whatever the answers) reads product pages, a route that queries
Postgres through the service's asyncpg pool on every request (no cache). Three
seconds in, the server is restarted in fast mode: every session is ended (57P01) and
new ones are refused, then told "starting up" (57P03), until it is back.

What must hold:
- failures only within 5 s of the restart, each a 503 `upstream-unavailable`
  problem+json with Retry-After (never a 500, a trace or a dropped connection);
- no request slower than the service's command timeout (plus scheduling noise);
- the pool is whole again within 10 s: every request answered 200 again, /readyz
  green, every pooled connection opened by the new server (none left dead), a burst
  of twice the pool size served;
- the service never holds more connections than its pool's max_size.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aiohttp
import asyncpg
import httpx
import pytest

from services.catalog.seed import seed_products
from services.catalog.settings import CatalogSettings
from services.common.embedded import EmbeddedPostgres, EmbeddedRedis
from services.common.migrations import apply_migrations
from tests.support.problems import assert_problem
from tests.support.process import ServiceProcess, start_service
from tests.support.servers import free_port

pytestmark = pytest.mark.slow

RATE = 200  # requests per second, as RELIABILITY.md's FLT-2
WARM_UP_S = 3.0  # load before the restart
AFTER_S = 10.0  # load after it: the pool must be whole again within this
ERROR_WINDOW_S = 5.0  # failures allowed only this long after the restart began
# The catalog under test: statements time out after 2 s (RELIABILITY.md's figure), and a
# small pool, so that "never more than max_size" is a bound the load could reach.
POOL_MIN, POOL_MAX, COMMAND_TIMEOUT_S = 2, 5, 2.0
# Scheduling noise on a shared 2-core machine: a request can wait this long for a CPU
# with nothing wrong in the service (slowest measured: 0.04 s when idle, 1.2 s at a load
# average of 9). A request held by a dead connection, or waiting for a pool slot that
# never frees, would last until the client's timeout instead.
NOISE_S = 1.0
PRODUCTS = 50
CLIENT_TIMEOUT_S = 15.0
PAGE = "/api/v1/products?limit=20&after={after}"


@dataclass
class Reply:
    sent: float
    done: float
    status: int | None  # None: the connection to the service failed
    response: httpx.Response | None = None  # kept for failures only
    error: str = ""


@dataclass
class Sample:
    at: float
    backends: list[tuple[int, datetime]] | None  # (pid, backend_start); None: PG down


@dataclass
class Run:
    replies: list[Reply] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    restart_began: float = 0.0
    restart_ended: float = 0.0


@pytest.fixture(scope="module")
def private_servers() -> Iterator[tuple[EmbeddedPostgres, EmbeddedRedis]]:
    # Outside pytest's tmp dirs: those are 0700 root, and postgres runs as its own user.
    data_dir = Path(tempfile.mkdtemp(prefix="shopstack-flt2-"))
    pg = EmbeddedPostgres(data_dir / "postgres", port=free_port())
    redis = EmbeddedRedis(data_dir / "redis", port=free_port())
    try:
        pg.start()
        redis.start()
        asyncio.run(_prepare(pg.dsn))
        yield pg, redis
    finally:
        redis.stop()
        pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def _prepare(dsn: str) -> None:
    await apply_migrations(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await seed_products(conn, PRODUCTS)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def catalog(
    private_servers: tuple[EmbeddedPostgres, EmbeddedRedis],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    pg, redis = private_servers
    service = start_service(
        "catalog",
        env={
            "SHOPSTACK_DATABASE_URL": pg.dsn,
            "SHOPSTACK_REDIS_URL": redis.url,
            "SHOPSTACK_DB_POOL_MIN": str(POOL_MIN),
            "SHOPSTACK_DB_POOL_MAX": str(POOL_MAX),
            "SHOPSTACK_DB_COMMAND_TIMEOUT_S": str(COMMAND_TIMEOUT_S),
            "SHOPSTACK_LOG_LEVEL": "WARNING",
        },
        log_path=tmp_path_factory.mktemp("flt2") / "catalog.log",
    )
    yield service
    service.stop()


def _admin_dsn(pg: EmbeddedPostgres) -> str:
    return pg.dsn.rsplit("/", 1)[0] + "/postgres"


async def _backends(conn: asyncpg.Connection) -> list[tuple[int, datetime]]:
    """The catalog's sessions: the only client of the `shopstack` database during the run."""
    rows = await conn.fetch(
        "SELECT pid, backend_start FROM pg_stat_activity"
        " WHERE datname = 'shopstack' AND backend_type = 'client backend'"
    )
    return [(row["pid"], row["backend_start"]) for row in rows]


async def _watch_connections(admin_dsn: str, run: Run, stop: asyncio.Event) -> None:
    """Sample the catalog's sessions every 100 ms, reconnecting across the restart."""
    conn: asyncpg.Connection | None = None
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(admin_dsn, timeout=1.0)
            run.samples.append(Sample(time.monotonic(), await _backends(conn)))
        except Exception:
            # Any failure is a gap in the samples. (Seen here: a session told "terminating"
            # while idle fails its next query with InternalClientError until asyncpg reads
            # the EOF that follows.)
            run.samples.append(Sample(time.monotonic(), None))
            if conn is not None:
                conn.terminate()
            conn = None
        await asyncio.sleep(0.1)
    if conn is not None:
        await conn.close()


async def _drive(url: str, pg: EmbeddedPostgres) -> Run:
    """Fire RATE requests a second on schedule, restart Postgres after WARM_UP_S."""
    run = Run()
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_connections(_admin_dsn(pg), run, stop))
    # aiohttp, not httpx: with a few hundred requests in flight on a busy machine, httpx's
    # pool spends seconds per request (measured: p50 2-26 s where aiohttp had 6 ms).
    # The client waits far longer than any bound, so a slow reply is measured, not cut.
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(url, timeout=timeout, connector=connector) as client:

        async def one(n: int) -> None:
            sent = time.monotonic()
            try:
                async with client.get(PAGE.format(after=n % PRODUCTS)) as resp:
                    body = await resp.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                run.replies.append(Reply(sent, time.monotonic(), None, error=repr(exc)))
                return
            done = time.monotonic()
            kept = None
            if resp.status != 200:  # kept whole for the problem+json checks
                kept = httpx.Response(resp.status, headers=list(resp.headers.items()), content=body)
            run.replies.append(Reply(sent, done, resp.status, kept))

        async def restart() -> None:
            await asyncio.sleep(WARM_UP_S)
            run.restart_began = time.monotonic()
            await asyncio.to_thread(pg.restart, mode="fast")
            run.restart_ended = time.monotonic()

        restarter = asyncio.create_task(restart())
        requests = []
        start = time.monotonic()
        for n in range(int(RATE * (WARM_UP_S + AFTER_S))):
            # Open model: the schedule does not wait for answers; a late tick fires at once.
            if (delay := start + n / RATE - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            requests.append(asyncio.create_task(one(n)))
        await asyncio.gather(*requests)
        await restarter
    stop.set()
    await watcher
    return run


async def _burst(url: str, size: int) -> list[int]:
    async with aiohttp.ClientSession(url) as client:

        async def one(n: int) -> int:
            async with client.get(PAGE.format(after=n)) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one(n) for n in range(size))))


def test_flt2_postgres_restart_under_load(
    private_servers: tuple[EmbeddedPostgres, EmbeddedRedis], catalog: ServiceProcess
) -> None:
    pg, _ = private_servers
    settings = CatalogSettings(
        database_url=pg.dsn,
        db_pool_min=POOL_MIN,
        db_pool_max=POOL_MAX,
        db_command_timeout_s=COMMAND_TIMEOUT_S,
    )
    first_start = asyncio.run(_postmaster_start(pg))

    run = asyncio.run(_drive(catalog.url, pg))
    t0 = run.restart_began
    assert len(run.replies) == int(RATE * (WARM_UP_S + AFTER_S))

    # The restart happened: a new postmaster, so every session of the old one ended.
    new_start = asyncio.run(_postmaster_start(pg))
    assert new_start > first_start

    # Failures: only clean, retryable 503s, and only within ERROR_WINDOW_S of the restart.
    failures = [r for r in run.replies if r.status != 200]
    for reply in failures:
        assert reply.response is not None, f"connection to the catalog failed: {reply.error}"
        assert_problem(reply.response, 503, "upstream-unavailable")
        assert reply.response.headers["retry-after"] == "1"
        assert t0 <= reply.done <= t0 + ERROR_WINDOW_S, (reply.done - t0, reply.response.text)
    assert "unhandled error" not in catalog.log()

    # Latency: no request outlasts the command timeout (its statement would be cut there).
    bound = settings.db_command_timeout_s + NOISE_S
    slowest = max(run.replies, key=lambda r: r.done - r.sent)
    assert slowest.done - slowest.sent <= bound, (
        f"{slowest.done - slowest.sent:.2f} s, sent {slowest.sent - t0:+.2f} s from the restart"
    )

    # Connections: never more than the pool's max_size (one worker).
    counts = [len(s.backends) for s in run.samples if s.backends is not None]
    assert counts
    assert max(counts) <= settings.db_pool_max, counts

    # The pool is whole again within AFTER_S: at least min_size connections, all opened
    # by the new server (asyncpg refills the floor in the background; requests reconnect).
    refilled = [
        s.at - t0
        for s in run.samples
        if s.at > run.restart_ended
        and s.backends is not None
        and len(s.backends) >= settings.db_pool_min
        and all(start >= new_start for _, start in s.backends)
    ]
    assert refilled, counts
    assert refilled[0] < AFTER_S, counts
    assert httpx.get(catalog.url + "/readyz", timeout=5).json()["checks"]["postgres"] == "ok"
    # Every slot of the pool serves: a burst of twice its size, all answered.
    burst = 2 * settings.db_pool_max
    assert asyncio.run(_burst(catalog.url, burst)) == [200] * burst
    final = asyncio.run(_catalog_backends(pg))
    assert settings.db_pool_min <= len(final) <= settings.db_pool_max
    assert all(start >= new_start for _, start in final)

    last_failure = max((r.done for r in failures), default=t0) - t0
    print(  # the figures, for the report (pytest -s)
        f"\nFLT-2: restart took {run.restart_ended - t0:.2f} s; {len(failures)} of "
        f"{len(run.replies)} failed, the last {last_failure:.2f} s after it began; slowest "
        f"{slowest.done - slowest.sent:.3f} s; pool whole again after {refilled[0]:.2f} s; "
        f"connections at most {max(counts)}/{settings.db_pool_max}"
    )


async def _postmaster_start(pg: EmbeddedPostgres) -> datetime:
    conn = await asyncpg.connect(_admin_dsn(pg))
    try:
        started: datetime = await conn.fetchval("SELECT pg_postmaster_start_time()")
    finally:
        await conn.close()
    return started


async def _catalog_backends(pg: EmbeddedPostgres) -> list[tuple[int, datetime]]:
    conn = await asyncpg.connect(_admin_dsn(pg))
    try:
        return await _backends(conn)
    finally:
        await conn.close()
