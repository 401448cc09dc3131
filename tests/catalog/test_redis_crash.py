"""INV-6: Redis is killed (SIGKILL) mid-sale and comes back with the last second of its
append-only file gone; the gate is rebuilt from Postgres and the sale goes on.

A Redis of our own (redis-server with appendonly yes, appendfsync everysec, in a temp
dir) and a database of our own with 10,000 products. The catalog runs as a real process
(`shopstack serve catalog`, two granian workers, its reconciler on), and buyers hammer
four flash-sale products (100 units each, 2 per customer) over HTTP. A third of the way
into the sale redis-server is SIGKILLed. A SIGKILL alone loses nothing that Redis had
written (the page cache survives it); what everysec risks is the last second of writes
on a machine crash, so the test cuts the file back to its size of one second before the
kill, as a power cut would. Redis restarts from that file: gate decrements, per-customer
counts and commit marks of orders that Postgres committed are gone. The catalog notices
the new Redis run id, rebuilds the gate from Postgres and the buyers carry on until the
sale is sold out. What must hold:

- never an oversell: units in reserved or paid orders never exceed the units on sale,
  the stock invariant holds, no customer holds more than the per-customer limit;
- every 201 is an order in Postgres and every order got its 201;
- the whole sale sells out after the crash (the stale gate strands nothing for good);
- after the reconciler's repair the gate agrees with Postgres: stock, per-customer
  units, no admission left pending.

The sale starts as soon as the catalog answers /readyz, which one worker may do while
the other is still rebuilding the gate at start-up. In every run before the fix in
services/catalog/inventory.py, the cut AOF kept that rebuild's lock (60 s) but lost its
unlock, and the restarted Redis was not rebuilt within the test's 30 s. The second test
pins that case down: Redis killed in the middle of a rebuild.

The third test times the rebuild itself: from an empty Redis to all 10,000 products
loaded (the catalog's target is 2 s on 2 cores; the bound here is generous for a
shared machine, the figure is printed).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.catalog.inventory import ensure_gate
from services.catalog.seed import seed_products
from services.catalog.settings import CatalogSettings
from services.catalog.state import CatalogState
from services.common.embedded import EmbeddedRedis
from services.common.state import open_data_state
from tests.support.process import start_service
from tests.support.servers import free_port, kill_redis, migrated_database

pytestmark = pytest.mark.slow

PRODUCTS = 10_000
SALE = [1, 2, 3, 4]  # the seed's flash sales: 100 units each, 2 per customer
UNITS = 100
CAP = 2
CUSTOMERS = 120  # up to 240 units per product: the per-customer limit is hit too
BUYERS = 32  # concurrent buyers, each pausing between attempts: a sale of several seconds
PAUSE_S = 0.35
SOLD_OUT_S = 1.0  # buyers keep trying this long after the last unit is gone
KILL_AT = 130  # orders placed before Redis is killed (of 400 units)
LOST_S = 1.0  # appendfsync everysec: the writes of the last second may be lost
SALE_DEADLINE_S = 60.0
REBUILD_RUNS = 5
REBUILD_BOUND_S = 10.0  # the target is 2 s; a shared, busy machine gets 5x


@dataclass
class CrashServers:
    redis: EmbeddedRedis
    redis_dir: Path
    dsn: str


@dataclass
class Sale:
    orders: dict[str, tuple[int, str]] = field(default_factory=dict)  # id -> (product, user)
    statuses: Counter[int | str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def crash_servers(
    servers: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CrashServers]:
    """A private redis-server (AOF, everysec) and a database with 10,000 products."""
    redis_dir = tmp_path_factory.mktemp("inv6-redis")
    redis = EmbeddedRedis(redis_dir, port=free_port())
    try:
        redis.start()
        with migrated_database(servers[0]) as dsn:
            asyncio.run(_seed(dsn))
            yield CrashServers(redis, redis_dir, dsn)
    finally:
        redis.stop()


async def _seed(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await seed_products(conn, PRODUCTS)
    finally:
        await conn.close()


def _aof_file(data_dir: Path) -> Path:
    """The file redis-server appends to (one file before Redis 7, the incr part after)."""
    single = data_dir / "appendonly.aof"
    if single.exists():
        return single
    parts = sorted((data_dir / "appendonlydir").glob("*.incr.aof"), key=lambda p: p.stat().st_mtime)
    return parts[-1]


async def _watch_aof(path: Path, sizes: list[tuple[float, int]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        sizes.append((time.monotonic(), path.stat().st_size))
        await asyncio.sleep(0.01)


def _size_before(sizes: list[tuple[float, int]], moment: float) -> int:
    earlier = [size for at, size in sizes if at <= moment]
    assert earlier, "the sale had not run for a second when Redis was killed"
    return earlier[-1]


async def _buy(client: aiohttp.ClientSession, sale: Sale, stop: asyncio.Event) -> None:
    rng = random.Random()
    while not stop.is_set():
        product_id = rng.choice(SALE)
        user = f"inv6-{rng.randrange(CUSTOMERS)}"
        try:
            async with client.post(
                "/api/v1/orders",
                json={"product_id": product_id, "quantity": 1},
                headers={"X-User-Id": user, "X-User-Role": "user"},
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            sale.unexpected.append(repr(exc))
            continue
        sale.statuses[resp.status] += 1
        if resp.status == 201:
            sale.orders[body["id"]] = (product_id, user)
        elif resp.status == 503:
            assert body["type"].endswith("/upstream-unavailable"), body
        elif resp.status != 409 or body["type"].rsplit("/", 1)[-1] not in (
            "sold-out",
            "limit-exceeded",
        ):
            sale.unexpected.append(f"{resp.status} {body}")
        await asyncio.sleep(PAUSE_S)


async def _pg_sale(conn: asyncpg.Connection) -> dict[int, dict[str, Any]]:
    rows = await conn.fetch(
        """
        SELECT p.id, p.stock, p.units_on_sale,
               coalesce((SELECT sum(quantity) FROM orders o WHERE o.product_id = p.id
                         AND o.status IN ('reserved', 'paid')), 0)::int AS held
        FROM products p WHERE p.id = ANY($1::bigint[])
        """,
        SALE,
    )
    return {row["id"]: dict(row) for row in rows}


async def _gate_agrees(rds: Redis, conn: asyncpg.Connection) -> list[str]:
    """Differences between the gate and Postgres for the sale (empty: they agree)."""
    problems: list[str] = []
    pg = await _pg_sale(conn)
    limits = await conn.fetch(
        "SELECT product_id, user_id, units FROM order_limits"
        " WHERE units > 0 AND product_id = ANY($1::bigint[])",
        SALE,
    )
    for pid in SALE:
        stock = await rds.hget(f"gate:{pid}:p", "stock")
        if stock is None or int(stock) != pg[pid]["stock"]:
            problems.append(f"{pid}: gate stock {stock!r}, Postgres {pg[pid]['stock']}")
        pending = await rds.zcard(f"gate:{pid}:q")
        if pending:
            problems.append(f"{pid}: {pending} admissions pending")
        units = {k.decode(): int(v) for k, v in (await rds.hgetall(f"gate:{pid}:u")).items()}
        want = {row["user_id"]: row["units"] for row in limits if row["product_id"] == pid}
        if units != want:
            problems.append(f"{pid}: gate has per-customer units of {len(units)} customers")
    return problems


@pytest.fixture
async def rds(crash_servers: CrashServers) -> AsyncIterator[Redis]:
    client = Redis.from_url(crash_servers.redis.url)
    yield client
    await client.aclose()


async def test_inv6_redis_killed_mid_sale_loses_its_last_second(
    crash_servers: CrashServers, rds: Redis, tmp_path: Path
) -> None:
    redis, dsn = crash_servers.redis, crash_servers.dsn
    catalog = start_service(
        "catalog",
        env={
            "SHOPSTACK_DATABASE_URL": dsn,
            "SHOPSTACK_REDIS_URL": redis.url,
            "SHOPSTACK_WORKERS": "2",
            "SHOPSTACK_LOG_LEVEL": "WARNING",
            "SHOPSTACK_CATALOG_RECONCILE_INTERVAL_S": "2",
            # Admissions the crash left pending with no order behind them come back soon.
            "SHOPSTACK_CATALOG_GATE_PENDING_GRACE_S": "2",
        },
        log_path=tmp_path / "catalog.log",
        timeout_s=60,
    )
    aof = _aof_file(crash_servers.redis_dir)
    sale = Sale()
    sizes: list[tuple[float, int]] = []
    stop, stop_watch = asyncio.Event(), asyncio.Event()
    conn = await asyncpg.connect(dsn)
    try:
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(catalog.url, timeout=timeout) as client:
            watcher = asyncio.create_task(_watch_aof(aof, sizes, stop_watch))
            buyers = [asyncio.create_task(_buy(client, sale, stop)) for _ in range(BUYERS)]
            try:
                while len(sale.orders) < KILL_AT:
                    assert not sale.unexpected, sale.unexpected[:5]
                    await asyncio.sleep(0.01)
                old_run = str((await rds.info("server"))["run_id"])
                placed_before = set(sale.orders)
                killed_at = time.monotonic()
                await asyncio.to_thread(kill_redis, redis)
                stop_watch.set()
                await watcher
                kept = _size_before(sizes, killed_at - LOST_S)
                lost_bytes = aof.stat().st_size - kept
                with aof.open("r+b") as file:  # what a power cut would have left
                    file.truncate(kept)
                survivors = aof.read_bytes()
                lost = {oid for oid in placed_before if oid.encode() not in survivors}
                await asyncio.to_thread(redis.start)  # same port, the cut file
                restarted_at = time.monotonic()
                await rds.connection_pool.disconnect()  # our own sockets died with it
                new_run = str((await rds.info("server"))["run_id"])
                # The catalog notices the new run id and rebuilds the gate from Postgres.
                while (await rds.hget("gate:meta", "run_id") or b"").decode() != new_run:
                    assert time.monotonic() - restarted_at < 30, "the gate was not rebuilt"
                    await asyncio.sleep(0.05)
                rebuilt_s = time.monotonic() - restarted_at
                # The sale goes on until Postgres has sold every unit.
                while any(row["stock"] for row in (await _pg_sale(conn)).values()):
                    assert time.monotonic() - killed_at < SALE_DEADLINE_S, await _pg_sale(conn)
                    assert not sale.unexpected, sale.unexpected[:5]
                    await asyncio.sleep(0.2)
                sold_out_replies = sale.statuses[409]
                await asyncio.sleep(SOLD_OUT_S)
                sold_out_replies = sale.statuses[409] - sold_out_replies
            finally:
                stop.set()
                stop_watch.set()
                await asyncio.gather(*buyers, watcher)
        # The reconciler repairs what the rebuild could not know (orders that committed
        # while it ran, admissions left pending): the gate converges on Postgres.
        deadline = time.monotonic() + 30
        while problems := await _gate_agrees(rds, conn):
            assert time.monotonic() < deadline, problems
            await asyncio.sleep(0.2)
        pg = await _pg_sale(conn)
        in_pg = {
            str(row["id"]): (row["product_id"], row["user_id"])
            for row in await conn.fetch(
                "SELECT id, product_id, user_id FROM orders"
                " WHERE product_id = ANY($1::bigint[]) AND status IN ('reserved', 'paid')",
                SALE,
            )
        }
        per_customer = await conn.fetchval(
            "SELECT max(units) FROM order_limits WHERE product_id = ANY($1::bigint[])", SALE
        )
        metrics = httpx.get(catalog.url + "/metrics", timeout=5).text
    finally:
        await conn.close()
        catalog.stop()
        catalog.ensure_stopped()

    print(
        f"INV-6: killed after {len(placed_before)} orders; last {LOST_S:.0f} s of the AOF "
        f"({lost_bytes} bytes) cut, {len(lost)} committed orders' gate writes gone; "
        f"gate rebuilt {rebuilt_s:.2f} s after the restart; replies {dict(sale.statuses)}"
    )
    assert old_run != new_run  # a new Redis, whose gate the catalog rebuilt
    assert lost, "the cut AOF still held every order: nothing was lost"
    assert sale.unexpected == []
    assert sold_out_replies > 0  # demand went on after the last unit: all refused
    for pid in SALE:
        assert pg[pid]["stock"] == 0  # sold out, after the crash too
        assert pg[pid]["units_on_sale"] == UNITS == pg[pid]["stock"] + pg[pid]["held"]
    assert per_customer <= CAP
    # Every 201 is an order and every order got its 201: 400 units, 400 orders.
    assert in_pg == sale.orders
    assert len(in_pg) == len(SALE) * UNITS
    assert "shopstack_inventory_discrepancy_units 0.0" in metrics


async def test_inv6_redis_killed_mid_rebuild_is_rebuilt_at_once(
    crash_servers: CrashServers,
) -> None:
    """Redis dies while a worker rebuilds the gate: it comes back from its AOF with that
    rebuild's lock (60 s) and half a gate. The next check rebuilds it at once; it does
    not wait for a lock that belonged to the Redis that died."""
    redis = crash_servers.redis
    settings = CatalogSettings(
        database_url=crash_servers.dsn, redis_url=redis.url, log_level="WARNING"
    )
    async with open_data_state(settings) as base:
        inv = CatalogState(base, settings).inventory
        await inv.redis.flushdb()
        rebuilding = asyncio.create_task(ensure_gate(inv, force=True))
        while not await inv.redis.keys("gate:rebuild-lock*"):
            assert not rebuilding.done(), rebuilding
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.2)  # part of the gate is written
        await asyncio.to_thread(kill_redis, redis)
        with pytest.raises(RedisError):
            await rebuilding
        await asyncio.to_thread(redis.start)
        await inv.redis.connection_pool.disconnect()
        assert await inv.redis.keys("gate:rebuild-lock*")  # back from the AOF
        assert await inv.gate.installed_run_id() is None
        assert await ensure_gate(inv)
        assert await inv.gate.installed_run_id() == await inv.gate.server_run_id()
        assert await inv.gate.loaded_stock(PRODUCTS) is not None


async def test_inv6_gate_rebuild_of_10k_products(crash_servers: CrashServers) -> None:
    """From an empty Redis to every product's gate loaded from Postgres."""
    settings = CatalogSettings(
        database_url=crash_servers.dsn, redis_url=crash_servers.redis.url, log_level="WARNING"
    )
    timings: list[float] = []
    async with open_data_state(settings) as base:
        inv = CatalogState(base, settings).inventory
        async with inv.pool.acquire() as conn:
            rows = await conn.fetch("SELECT id, stock FROM products ORDER BY id")
        stock = {row["id"]: row["stock"] for row in rows}
        assert len(stock) == PRODUCTS
        for _ in range(REBUILD_RUNS):
            await inv.redis.flushdb()
            started = time.monotonic()
            assert await ensure_gate(inv, force=True)
            timings.append(time.monotonic() - started)
            async with inv.redis.pipeline(transaction=False) as pipe:
                for pid in stock:
                    pipe.hget(f"gate:{pid}:p", "stock")
                loaded = await pipe.execute()
            assert [int(value) for value in loaded] == list(stock.values())
    median = statistics.median(timings)
    print(
        f"INV-6: gate rebuild of {PRODUCTS} products: median {median:.2f} s, "
        f"runs {[round(t, 2) for t in timings]}"
    )
    assert median < REBUILD_BOUND_S
