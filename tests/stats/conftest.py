"""Stats fixtures: per-test stream names, events, the app in-process, brute-force counts."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from services.stats.app import create_app
from services.stats.settings import StatsSettings
from tests.support.asgi import client_for

_blocks = itertools.count(1)


@dataclass(frozen=True)
class Names:
    """Redis names of one test's stream, so tests never share a backlog or aggregates."""

    stream: str
    group: str
    dead: str
    prefix: str

    def settings(self) -> dict[str, str]:
        return {
            "stats_stream": self.stream,
            "stats_group": self.group,
            "stats_dead_letter_stream": self.dead,
            "stats_key_prefix": self.prefix,
        }

    def env(self) -> dict[str, str]:
        return {f"SHOPSTACK_{k.upper()}": v for k, v in self.settings().items()}


@pytest.fixture
def names() -> Names:
    tag = uuid.uuid4().hex[:8]
    return Names(f"t{tag}:events", f"t{tag}:writers", f"t{tag}:dead", f"t{tag}:agg")


@pytest.fixture
def pid_base() -> int:
    """A block of 10,000 product ids nobody else in this session uses."""
    return next(_blocks) * 10_000


def event(
    product_id: int,
    *,
    type: str = "view",
    user_id: str = "u1",
    ts: datetime | None = None,
    event_id: str | None = None,
) -> dict[str, Any]:
    moment = ts or datetime.now(UTC) - timedelta(seconds=5)
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "type": type,
        "product_id": product_id,
        "user_id": user_id,
        "ts": moment.isoformat(),
    }


def body(events: list[dict[str, Any]]) -> bytes:
    return orjson.dumps(events)


JSON = {"Content-Type": "application/json"}


def fast_settings(settings_kwargs: dict[str, Any], names: Names, **overrides: Any) -> StatsSettings:
    """Test settings: quick flushes and reclaims, this test's names."""
    values: dict[str, Any] = {
        **settings_kwargs,
        **names.settings(),
        "stats_flush_interval_s": 0.1,
        "stats_claim_min_idle_s": 1.0,
        "stats_maintenance_interval_s": 0.2,
        **overrides,
    }
    return StatsSettings(**values)


@pytest.fixture
def stats_app(settings_kwargs: dict[str, Any], names: Names) -> Callable[..., Any]:
    """Open the stats app in-process (with its writer) with settings overrides."""

    def open_app(**overrides: Any) -> Any:
        return client_for(create_app(fast_settings(settings_kwargs, names, **overrides)))

    return open_app


@pytest.fixture
async def stats(stats_app: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    async with stats_app() as client:
        yield client


@pytest.fixture
async def ingest_only(stats_app: Callable[..., Any]) -> AsyncIterator[httpx.AsyncClient]:
    """The app without a writer: for requests whose outcome never reaches Postgres."""
    async with stats_app(stats_writer_enabled=False) as client:
        yield client


async def wait_for(
    check: Callable[[], Awaitable[bool]], *, timeout_s: float, interval_s: float = 0.05
) -> float:
    """Poll until `check` is true; return the seconds it took (fail after the timeout)."""
    started = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(interval_s)


async def stored(pg: asyncpg.Connection, ids: list[str]) -> int:
    """How many of these event ids are in Postgres."""
    count: int = await pg.fetchval(
        "SELECT count(*) FROM stats_events WHERE event_id = ANY($1::uuid[])", ids
    )
    return count


async def brute_force(
    pg: asyncpg.Connection, product_id: int, start: datetime, end: datetime
) -> dict[str, int]:
    """The product's counts over [start, end) straight from Postgres."""
    row = await pg.fetchrow(
        """
        SELECT count(*) FILTER (WHERE type = 'view') AS views,
               count(*) FILTER (WHERE type = 'cart') AS carts,
               count(*) FILTER (WHERE type = 'purchase') AS purchases,
               count(DISTINCT user_id) AS unique_visitors
        FROM stats_events WHERE product_id = $1 AND ts >= $2 AND ts < $3
        """,
        product_id,
        start,
        end,
    )
    return dict(row)


async def brute_force_top(
    pg: asyncpg.Connection, type_: str, start: datetime, end: datetime, lo: int, hi: int
) -> dict[int, int]:
    """Per-product counts of one type over [start, end) for products lo..hi."""
    rows = await pg.fetch(
        """
        SELECT product_id, count(*) AS n FROM stats_events
        WHERE type = $1 AND ts >= $2 AND ts < $3 AND product_id BETWEEN $4 AND $5
        GROUP BY product_id
        """,
        type_,
        start,
        end,
        lo,
        hi,
    )
    return {row["product_id"]: row["n"] for row in rows}


def span(doc: dict[str, Any]) -> tuple[datetime, datetime]:
    return datetime.fromisoformat(doc["from"]), datetime.fromisoformat(doc["to"])


async def pending_count(rds: aioredis.Redis, names: Names) -> int:
    try:
        summary = await rds.xpending(names.stream, names.group)
    except aioredis.ResponseError:
        return 0
    return int(summary["pending"])


async def backlog(rds: aioredis.Redis, names: Names) -> int:
    return int(await rds.get(names.stream + ":backlog") or 0)
