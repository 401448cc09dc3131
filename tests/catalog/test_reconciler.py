"""The reconciler, the gate rebuild and the sold-out flag reset (real Postgres and Redis)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.catalog import orders
from services.catalog.gate import Admission, now_ms
from services.catalog.inventory import (
    Inventory,
    announce_stock_restored,
    ensure_gate,
    reconcile,
)
from services.catalog.jobs import start_jobs, sweep_once
from services.catalog.settings import CatalogSettings
from services.catalog.state import CatalogState
from services.common.state import open_data_state
from tests.catalog.conftest import assert_consistent, create_product, order_settings


def gauge(name: str) -> float | None:
    return REGISTRY.get_sample_value(name)


async def test_reconciler_reports_a_healthy_invariant(inventory: Inventory) -> None:
    pid = await create_product(inventory, stock=5)
    await orders.place_order(inv=inventory, user_id="rec-ok", product_id=pid, quantity=2)
    report = await reconcile(inventory)
    assert report.discrepancy_units == 0
    assert gauge("shopstack_inventory_discrepancy_units") == 0
    last = gauge("shopstack_reconciler_last_run_timestamp_seconds")
    assert last is not None
    assert last > 0
    await assert_consistent(inventory, pid)


async def test_reconciler_exports_a_broken_invariant(inventory: Inventory) -> None:
    pid = await create_product(inventory, stock=5)
    async with inventory.pool.acquire() as conn:
        await conn.execute(
            "UPDATE products SET units_on_sale = units_on_sale + 3 WHERE id = $1", pid
        )
    try:
        report = await reconcile(inventory)
        assert report.discrepancy_units == 3
        assert gauge("shopstack_inventory_discrepancy_units") == 3
    finally:
        async with inventory.pool.acquire() as conn:
            await conn.execute(
                "UPDATE products SET units_on_sale = units_on_sale - 3 WHERE id = $1", pid
            )
    assert (await reconcile(inventory)).discrepancy_units == 0


async def test_dead_admission_is_undone_after_the_grace(settings_kwargs: dict[str, Any]) -> None:
    """A worker died between the gate and the commit: its units come back (INV-4 in small)."""
    settings = order_settings(settings_kwargs, catalog_gate_pending_grace_s=0.2)
    async with open_data_state(settings) as base:
        inv = CatalogState(base, settings).inventory
        pid = await create_product(inv, stock=5)
        rid = str(uuid.uuid4())
        admitted = await inv.gate.admit(
            product_id=pid, rid=rid, user_id="dead", quantity=2, at_ms=now_ms()
        )
        assert admitted.decision is Admission.ADMITTED
        await reconcile(inv)  # still young: it may be in flight, so it stays
        assert await inv.gate.loaded_stock(pid) == 3
        await asyncio.sleep(0.3)
        assert (await reconcile(inv)).undone >= 1
        assert await inv.gate.loaded_stock(pid) == 5
        await assert_consistent(inv, pid)
        # Had it committed after all, its late commit is adopted, not lost.
        late = await inv.gate.commit(product_id=pid, rid=rid, user_id="dead", quantity=2)
        assert late == 2
        assert await inv.gate.loaded_stock(pid) == 3


async def test_lost_gate_commit_and_release_are_repaired(inventory: Inventory) -> None:
    pid = await create_product(inventory, stock=6)
    row = await orders.place_order(inv=inventory, user_id="rec-c", product_id=pid, quantity=2)
    rid = str(row["id"])
    # Simulate a crash before the gate heard of the commit: back to pending.
    await inventory.redis.hset(f"gate:{pid}:r", rid, "P|rec-c|2")
    await inventory.redis.zadd(f"gate:{pid}:q", {rid: now_ms() - 3_600_000})
    report = await reconcile(inventory)
    assert report.committed >= 1
    view = await inventory.gate.view(pid)
    assert not view.markers[rid].pending  # in Postgres: committed, never undone
    await assert_consistent(inventory, pid)
    # A cancel whose gate release was lost: the reconciler releases it.
    async with inventory.pool.acquire() as conn:
        await conn.execute("UPDATE orders SET status = 'cancelled' WHERE id = $1", uuid.UUID(rid))
        await conn.execute("UPDATE products SET stock = stock + 2 WHERE id = $1", pid)
        await conn.execute("UPDATE order_limits SET units = units - 2 WHERE product_id = $1", pid)
    assert (await reconcile(inventory)).released >= 1
    assert rid not in (await inventory.gate.view(pid)).markers
    await assert_consistent(inventory, pid)


async def test_stock_drift_is_repaired_only_when_seen_twice(inventory: Inventory) -> None:
    pid = await create_product(inventory, stock=10)
    await inventory.gate.adjust(product_id=pid, delta=-4)  # the gate lost 4 units
    first = await reconcile(inventory)
    assert pid not in first.adjusted
    assert first.drift_units >= 4
    second = await reconcile(inventory)
    assert second.adjusted[pid] == 4
    await assert_consistent(inventory, pid)
    assert pid not in (await reconcile(inventory)).adjusted


async def test_gate_is_rebuilt_after_redis_loses_it(inventory: Inventory, rds: Redis) -> None:
    pid = await create_product(inventory, stock=8)
    row = await orders.place_order(inv=inventory, user_id="rb", product_id=pid, quantity=3)
    await rds.flushdb()  # what a Redis restart without persistence looks like
    assert await inventory.gate.loaded_stock(pid) is None
    assert await ensure_gate(inventory)  # the run marker is gone: rebuild
    assert not await ensure_gate(inventory)
    await assert_consistent(inventory, pid)
    # The rebuilt gate knows the reservation: a cancel gives its units back once.
    await orders.cancel_order(inv=inventory, user_id="rb", order_id=row["id"])
    await assert_consistent(inventory, pid)
    assert await inventory.gate.loaded_stock(pid) == 8


async def test_a_product_missing_from_the_gate_is_loaded_on_first_buy(
    inventory: Inventory, rds: Redis
) -> None:
    pid = await create_product(inventory, stock=4)
    await rds.delete(f"gate:{pid}:p", f"gate:{pid}:u", f"gate:{pid}:r", f"gate:{pid}:q")
    await orders.place_order(inv=inventory, user_id="lazy", product_id=pid, quantity=1)
    await assert_consistent(inventory, pid)


async def test_sold_out_flags_are_reset_across_workers(settings_kwargs: dict[str, Any]) -> None:
    """Stock restored in one worker clears the sold-out flag of another (pub/sub)."""
    settings = order_settings(settings_kwargs)
    async with open_data_state(settings) as a, open_data_state(settings) as b:
        inv_a = CatalogState(a, settings).inventory
        inv_b = CatalogState(b, settings).inventory
        jobs = start_jobs(inv_b)  # jobs off: only the stock-restored listener runs
        try:
            await asyncio.sleep(0.2)
            inv_b.flags.mark(42)
            assert inv_b.flags.is_sold_out(42)
            await announce_stock_restored(inv_a, [42])
            for _ in range(50):
                if not inv_b.flags.is_sold_out(42):
                    break
                await asyncio.sleep(0.02)
            assert not inv_b.flags.is_sold_out(42)
        finally:
            await jobs.stop()


async def test_background_jobs_expire_and_reconcile(settings_kwargs: dict[str, Any]) -> None:
    """The lifespan's jobs: the sweeper expires a due reservation on its own."""
    settings = CatalogSettings(
        **settings_kwargs,
        catalog_reservation_ttl_s=0.2,
        catalog_sweep_interval_s=0.1,
        catalog_reconcile_interval_s=0.2,
    )
    async with open_data_state(settings) as base:
        inv = CatalogState(base, settings).inventory
        pid = await create_product(inv, stock=3)
        await orders.place_order(inv=inv, user_id="jobs", product_id=pid, quantity=3)
        jobs = start_jobs(inv)
        try:
            for _ in range(100):
                await asyncio.sleep(0.05)
                async with inv.pool.acquire() as conn:
                    stock = await conn.fetchval("SELECT stock FROM products WHERE id = $1", pid)
                if stock == 3:
                    break
            assert stock == 3
            await asyncio.sleep(0.3)
            last = gauge("shopstack_reconciler_last_run_timestamp_seconds")
            assert last is not None
        finally:
            await jobs.stop()
        await assert_consistent(inv, pid)
        assert await sweep_once(inv) == 0
