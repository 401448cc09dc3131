"""Inventory races against real Postgres and Redis (RELIABILITY INV-1/2/3/5/7/9)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from services.catalog import orders, storage
from services.catalog.gate import Admission, InventoryGate, now_ms
from services.catalog.inventory import Inventory, load_products
from services.common.errors import LimitExceeded, Problem, SoldOut
from tests.catalog.conftest import OPEN_SALE, assert_consistent, create_product, open_inventory
from tests.support.faultproxy import FaultProxy
from tests.support.servers import migrated_database

pytestmark = pytest.mark.slow


async def _stock(inv: Inventory, pid: int) -> int:
    async with inv.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT stock FROM products WHERE id = $1", pid))


async def test_inv1_postgres_conditional_decrement_race(inventory: Inventory) -> None:
    """INV-1: 10,000 concurrent buy(1) on 100 units straight at Postgres (pool 20)."""
    pid = await create_product(inventory, stock=100)
    now = datetime.now(UTC)
    outcomes: list[str] = []
    negative_reads = 0

    async def buy(i: int) -> None:
        nonlocal negative_reads
        row = await storage.reserve(
            inventory.pool,
            order_id=uuid.uuid4(),
            user_id=f"inv1-{i}",
            product_id=pid,
            quantity=1,
            now=now,
            expires_at=now + timedelta(minutes=15),
        )
        outcomes.append("ok" if row is not None else "sold-out")
        if i % 100 == 0 and await _stock(inventory, pid) < 0:
            negative_reads += 1

    started = time.monotonic()
    results = await asyncio.gather(*(buy(i) for i in range(10_000)), return_exceptions=True)
    elapsed = time.monotonic() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert outcomes.count("ok") == 100
    assert outcomes.count("sold-out") == 9_900
    assert negative_reads == 0
    assert await _stock(inventory, pid) == 0
    assert elapsed < 60
    async with inventory.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE product_id = $1", pid) == 100
    # The gate was bypassed here; repair it so the invariant check covers it too.
    await inventory.gate.adjust(product_id=pid, delta=-100)
    await assert_consistent(inventory, pid)


async def test_inv2_gate_and_postgres_race(inventory: Inventory) -> None:
    """INV-2: 10,000 concurrent buys through the Lua gate, then Postgres."""
    pid = await create_product(inventory, stock=100)
    sem = asyncio.Semaphore(500)

    async def buy(i: int) -> str:
        async with sem:
            try:
                await orders.place_order(
                    inv=inventory, user_id=f"inv2-{i}", product_id=pid, quantity=1
                )
            except SoldOut:
                return "sold-out"
            return "ok"

    started = time.monotonic()
    results = await asyncio.gather(*(buy(i) for i in range(10_000)), return_exceptions=True)
    assert time.monotonic() - started < 60
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert results.count("ok") == 100
    assert results.count("sold-out") == 9_900
    row = await assert_consistent(inventory, pid)  # Redis stock == PG stock
    assert row["stock"] == 0
    assert row["held"] == 100
    assert await inventory.gate.loaded_stock(pid) == 0


async def test_inv3_multi_quantity_race(inventory: Inventory) -> None:
    """INV-3: 2,000 buyers of 1-5 units race for 500 units."""
    pid = await create_product(inventory, stock=500)
    rng = random.Random(3)
    wants = [rng.randint(1, 5) for _ in range(2_000)]
    sem = asyncio.Semaphore(200)

    async def buy(i: int, qty: int) -> int:
        async with sem:
            try:
                row = await orders.place_order(
                    inv=inventory, user_id=f"inv3-{i}", product_id=pid, quantity=qty
                )
            except SoldOut:
                return 0
            return int(row["quantity"])

    got = await asyncio.gather(*(buy(i, q) for i, q in enumerate(wants)))
    sold = sum(got)
    leftover = await _stock(inventory, pid)
    assert sold <= 500
    assert sold + leftover == 500
    assert leftover < 5
    # Stock only fell during the race, so a refused buyer saw at most... at least
    # `leftover` units: every refusal asked for more than what was left at the end.
    refused = [q for q, g in zip(wants, got, strict=True) if g == 0]
    assert refused
    assert all(q > leftover for q in refused)
    await assert_consistent(inventory, pid)


async def test_inv5_gate_rerun_decrements_once(inventory: Inventory, redis_url: str) -> None:
    """INV-5: the reply of the admit script is lost after it ran; the client retries.

    1,000 trials through a proxy that swallows the reply and resets the client:
    redis-py (with retries on) runs the script a second time with the same
    reservation id, and the stock still falls exactly once per id.
    """
    pid = await create_product(inventory, stock=5_000)
    proxy = FaultProxy.for_url(redis_url)
    await proxy.start()
    client = Redis.from_url(
        proxy.url,
        retry=Retry(NoBackoff(), 3),
        retry_on_error=[RedisConnectionError],
        socket_timeout=2,
    )
    gate = InventoryGate(client, tombstone_ttl_s=3600)
    try:
        before = await inventory.gate.loaded_stock(pid)
        assert before == 5_000
        await gate.admit(product_id=pid, rid=str(uuid.uuid4()), user_id="warm", quantity=1, at_ms=0)
        decisions = []
        for i in range(1_000):
            rid = str(uuid.uuid4())
            proxy.drop_next_reply()
            result = await gate.admit(
                product_id=pid, rid=rid, user_id=f"inv5-{i}", quantity=1, at_ms=now_ms()
            )
            decisions.append(result.decision)
        assert proxy.drops == 1_000
        # Every call ran twice; the second run found its own marker.
        assert set(decisions) == {Admission.ALREADY_ADMITTED}
        assert await inventory.gate.loaded_stock(pid) == 5_000 - 1 - 1_000
        # A plain rerun with the same id, and a rerun after undo, change nothing either.
        rid = str(uuid.uuid4())
        for _ in range(3):
            await gate.admit(product_id=pid, rid=rid, user_id="again", quantity=2, at_ms=now_ms())
        assert await inventory.gate.loaded_stock(pid) == 5_000 - 1_001 - 2
        assert await gate.undo(product_id=pid, rid=rid)
        assert not await gate.undo(product_id=pid, rid=rid)
        closed = await gate.admit(product_id=pid, rid=rid, user_id="again", quantity=2, at_ms=0)
        assert closed.decision is Admission.CLOSED
        assert await inventory.gate.loaded_stock(pid) == 5_000 - 1_001
        # Clean up: these admissions never reach Postgres; reload the gate from it.
        await inventory.redis.delete(*(f"gate:{pid}:{part}" for part in "purq"))
        await load_products(inventory, [pid], replace=False)
        await assert_consistent(inventory, pid)
    finally:
        await client.aclose()
        await proxy.stop()


@pytest.fixture(scope="module")
def sweep_database(servers: tuple[str, str]) -> Iterator[str]:
    """INV-7's own database: a catalog process another test left running on the shared
    one (its expiry sweeper) must not claim rows while this test counts who claimed them."""
    with migrated_database(servers[0]) as dsn:
        yield dsn


@pytest.fixture
async def sweep_inventory(
    settings_kwargs: dict[str, Any], sweep_database: str
) -> AsyncIterator[Inventory]:
    async with open_inventory({**settings_kwargs, "database_url": sweep_database}) as inv:
        yield inv


async def test_inv7_concurrent_sweepers_claim_each_row_once(sweep_inventory: Inventory) -> None:
    """INV-7: 8 sweepers over 1,000 expired reservations: each expired exactly once."""
    inventory = sweep_inventory
    pid = await create_product(inventory, stock=1_000)
    past = datetime.now(UTC) - timedelta(hours=1)
    for start in range(0, 1_000, 100):
        await asyncio.gather(
            *(
                orders.place_order(inv=inventory, user_id=f"inv7-{i}", product_id=pid, quantity=1)
                for i in range(start, start + 100)
            )
        )
    async with inventory.pool.acquire() as conn:
        await conn.execute(
            "UPDATE orders SET expires_at = $2 WHERE product_id = $1 AND status = 'reserved'",
            pid,
            past,
        )
    assert await _stock(inventory, pid) == 0

    async def sweeper() -> list[str]:
        mine: list[str] = []
        while True:
            rows = await orders.expire_due_orders(inv=inventory, limit=25)
            if not rows:
                return mine
            mine.extend(str(row["id"]) for row in rows if row["product_id"] == pid)

    claimed = await asyncio.gather(*(sweeper() for _ in range(8)))
    every = [rid for batch in claimed for rid in batch]
    assert len(every) == 1_000
    assert len(set(every)) == 1_000
    assert sum(1 for batch in claimed if batch) > 1  # the work really was shared
    assert await _stock(inventory, pid) == 1_000
    row = await assert_consistent(inventory, pid)
    assert row["held"] == 0
    assert await orders.expire_due_orders(inv=inventory) == []


async def test_inv9_per_user_cap_under_concurrency(inventory: Inventory) -> None:
    """INV-9: 1 user, 50 concurrent buys, cap 2 -> at most 2 units."""
    pid = await create_product(inventory, stock=100, flash_sale=OPEN_SALE)

    async def buy() -> str:
        try:
            await orders.place_order(inv=inventory, user_id="inv9-user", product_id=pid, quantity=1)
        except LimitExceeded:
            return "limit"
        return "ok"

    results = await asyncio.gather(*(buy() for _ in range(50)))
    assert results.count("ok") == 2
    assert results.count("limit") == 48
    await assert_consistent(inventory, pid)


async def test_inv9_postgres_guard_alone_holds_the_cap(inventory: Inventory) -> None:
    """INV-9 without the gate: the order_limits CHECK refuses the third unit."""
    pid = await create_product(inventory, stock=100, flash_sale=OPEN_SALE)
    now = datetime.now(UTC)

    async def buy() -> str:
        try:
            row = await storage.reserve(
                inventory.pool,
                order_id=uuid.uuid4(),
                user_id="inv9-pg",
                product_id=pid,
                quantity=1,
                now=now,
                expires_at=now + timedelta(minutes=15),
            )
        except asyncpg.CheckViolationError as exc:
            return "limit" if exc.constraint_name == "per_user_limit" else "other check"
        return "ok" if row is not None else "sold-out"

    results = await asyncio.gather(*(buy() for _ in range(50)))
    assert results.count("ok") == 2
    assert results.count("limit") == 48
    assert await _stock(inventory, pid) == 98


async def test_gate_refusal_by_postgres_is_undone(inventory: Inventory) -> None:
    """The gate admits but Postgres refuses: the gate gives the units back."""
    pid = await create_product(inventory, stock=3)
    async with inventory.pool.acquire() as conn:  # Postgres lost 2 units the gate still has
        await conn.execute(
            "UPDATE products SET stock = 1, units_on_sale = units_on_sale - 2 WHERE id = $1",
            pid,
        )
    with pytest.raises(SoldOut):
        await orders.place_order(inv=inventory, user_id="undo", product_id=pid, quantity=2)
    assert await inventory.gate.loaded_stock(pid) == 3  # undone, not leaked
    view = await inventory.gate.view(pid)
    assert view.markers == {}
    with pytest.raises(Problem):
        await orders.place_order(inv=inventory, user_id="undo", product_id=pid, quantity=3)
