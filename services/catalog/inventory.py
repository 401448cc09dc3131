"""Inventory rules around the gate: load it from Postgres, rebuild it, reconcile it.

Postgres is the authority; everything here makes the Redis gate agree with it.
Per-reservation repairs are exact (each gate script is idempotent per id); the
remaining stock drift is only corrected after two runs in a row saw the same
value, so a buy that is merely in flight is never "repaired".
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.catalog import storage
from services.catalog.cache import ProductCache
from services.catalog.gate import GateSource, GateView, InventoryGate, now_ms
from services.catalog.metrics import (
    GATE_DRIFT,
    GATE_REPAIRS,
    INVENTORY_DISCREPANCY,
    RECONCILER_LAST_RUN,
)
from services.catalog.settings import CatalogSettings
from services.common.flags import SoldOutFlags

log = logging.getLogger("shopstack.catalog.inventory")

STOCK_RESTORED_CHANNEL = "catalog:stock-restored"
REBUILD_LOCK_KEY = "gate:rebuild-lock"
RECONCILE_LOCK_KEY = "gate:reconcile-lock"
BATCH = 500


@dataclass
class Inventory:
    """What the order path and the jobs share: pool, gate, flags, cache, settings."""

    pool: asyncpg.Pool
    redis: Redis
    gate: InventoryGate
    flags: SoldOutFlags
    cache: ProductCache
    settings: CatalogSettings
    # product id -> drift seen by the previous reconcile run
    drift_seen: dict[int, int] = field(default_factory=dict)

    @property
    def grace_ms(self) -> int:
        return int(self.settings.catalog_gate_pending_grace_s * 1000)


def _ms(value: datetime | None) -> int:
    return 0 if value is None else int(value.timestamp() * 1000)


async def _sources(
    inv: Inventory, product_ids: list[int] | None, pending: dict[int, list[str]]
) -> list[GateSource]:
    """One consistent Postgres snapshot of what each product's gate must hold."""
    async with (
        inv.pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        products = await storage.fetch_gate_products(conn, product_ids)
        reserved = await storage.fetch_reserved_orders(conn, product_ids)
        units = await storage.fetch_user_units(conn, product_ids)
        all_pending = [uuid.UUID(rid) for rids in pending.values() for rid in rids]
        statuses = await storage.fetch_order_statuses(conn, all_pending)
    orders_by: dict[int, list[tuple[str, str, int]]] = {}
    for row in reserved:
        orders_by.setdefault(row["product_id"], []).append(
            (str(row["id"]), row["user_id"], row["quantity"])
        )
    units_by: dict[int, list[tuple[str, int]]] = {}
    for row in units:
        units_by.setdefault(row["product_id"], []).append((row["user_id"], row["units"]))
    return [
        GateSource(
            product_id=row["id"],
            stock=row["stock"],
            cap=row["flash_per_user_limit"],
            sale_from_ms=_ms(row["flash_starts_at"]),
            sale_until_ms=_ms(row["flash_ends_at"]),
            reserved=orders_by.get(row["id"], []),
            user_units=units_by.get(row["id"], []),
            known_pending=[rid for rid in pending.get(row["id"], []) if rid in statuses],
        )
        for row in products
    ]


async def _pending_ids(inv: Inventory, product_ids: list[int]) -> dict[int, list[str]]:
    async with inv.redis.pipeline(transaction=False) as pipe:
        for pid in product_ids:
            pipe.zrange(f"gate:{pid}:q", 0, -1)
        results = await pipe.execute()
    return {
        pid: [r.decode() if isinstance(r, bytes) else r for r in rids]
        for pid, rids in zip(product_ids, results, strict=True)
        if rids
    }


async def load_products(inv: Inventory, product_ids: list[int], *, replace: bool) -> set[int]:
    """Write the gate of the given products from Postgres; return the ids that exist."""
    pending = await _pending_ids(inv, product_ids)
    sources = await _sources(inv, product_ids, pending)
    for source in sources:
        await inv.gate.install(source, replace=replace, grace_ms=inv.grace_ms)
    return {source.product_id for source in sources}


async def rebuild_gate(inv: Inventory) -> int:
    """Rebuild every product's gate from Postgres (start-up, Redis restart); return count."""
    async with inv.pool.acquire() as conn:
        ids = [row["id"] for row in await storage.fetch_gate_products(conn, None)]
    for start in range(0, len(ids), BATCH):
        chunk = ids[start : start + BATCH]
        pending = await _pending_ids(inv, chunk)
        sources = await _sources(inv, chunk, pending)
        async with inv.redis.pipeline(transaction=False) as pipe:
            for source in sources:
                await inv.gate.install(source, replace=True, grace_ms=inv.grace_ms, client=pipe)
            await pipe.execute()
    inv.flags.clear_all()
    GATE_REPAIRS.labels("rebuild").inc()
    return len(ids)


async def ensure_gate(inv: Inventory, *, force: bool = False) -> bool:
    """Rebuild the gate when Redis restarted since the last rebuild (or when forced).

    The gate remembers the Redis run id it was built under; a restarted Redis has
    a new run id (and may have lost writes), so its gate is rebuilt. One worker
    rebuilds at a time. Returns True when this call rebuilt it.

    The lock is per run id: a restarted Redis may come back from its append-only
    file with the lock of a rebuild it was killed in (or whose unlock it lost), and
    that lock must not hold up the rebuild of the new Redis until it expires (INV-6).
    """
    run_id = await inv.gate.server_run_id()
    if not force and await inv.gate.installed_run_id() == run_id:
        return False
    lock_key = f"{REBUILD_LOCK_KEY}:{run_id}"
    lock = uuid.uuid4().hex
    if not await inv.redis.set(lock_key, lock, nx=True, ex=60):
        return False
    try:
        count = await rebuild_gate(inv)
        await inv.gate.mark_rebuilt(run_id)
        log.info("gate rebuilt", extra={"products": count, "redis_run_id": run_id})
    finally:
        if await inv.redis.get(lock_key) == lock.encode():
            await inv.redis.delete(lock_key)
    return True


async def announce_stock_restored(inv: Inventory, product_ids: Iterable[int]) -> None:
    """Stock came back: clear sold-out flags everywhere and drop cached product bodies."""
    for pid in sorted(set(product_ids)):
        inv.flags.clear(pid)
        try:
            await inv.redis.publish(STOCK_RESTORED_CHANNEL, str(pid))
            await inv.cache.invalidate(pid)
        except RedisError:
            log.warning("stock-restored announcement failed", extra={"product_id": pid})


@dataclass
class ReconcileReport:
    discrepancy_units: int = 0
    drift_units: int = 0
    committed: int = 0
    undone: int = 0
    released: int = 0
    forgotten: int = 0
    adopted: int = 0
    loaded: int = 0
    adjusted: dict[int, int] = field(default_factory=dict)
    rebuilt: bool = False


async def check_invariant(pool: asyncpg.Pool) -> list[Any]:
    """Products where units_on_sale != stock + units in reserved or paid orders."""
    async with pool.acquire() as conn:
        return await storage.fetch_inventory_discrepancies(conn)


async def publish_invariant(inv: Inventory) -> int:
    """Check the invariant, export the discrepancy gauge, log offenders; return units."""
    bad = await check_invariant(inv.pool)
    units = sum(abs(int(row["discrepancy"])) for row in bad)
    INVENTORY_DISCREPANCY.set(units)
    for row in bad:
        log.error(
            "inventory invariant broken",
            extra={
                "product_id": row["id"],
                "units_on_sale": row["units_on_sale"],
                "stock": row["stock"],
                "held": int(row["held"]),
            },
        )
    return units


async def reconcile(inv: Inventory) -> ReconcileReport:
    """Check the invariant in Postgres and repair the gate from it (one run)."""
    report = ReconcileReport()
    report.discrepancy_units = await publish_invariant(inv)
    report.rebuilt = await ensure_gate(inv)
    if not report.rebuilt:
        async with inv.pool.acquire() as conn:
            ids = [row["id"] for row in await storage.fetch_gate_products(conn, None)]
        for start in range(0, len(ids), BATCH):
            await _reconcile_chunk(inv, ids[start : start + BATCH], report)
    GATE_DRIFT.set(report.drift_units)
    RECONCILER_LAST_RUN.set(time.time())
    return report


async def _views(inv: Inventory, product_ids: list[int]) -> dict[int, GateView]:
    return await inv.gate.views(product_ids) if product_ids else {}


async def _reconcile_chunk(inv: Inventory, ids: list[int], report: ReconcileReport) -> None:
    gate = inv.gate
    views = await _views(inv, ids)
    marker_ids = [uuid.UUID(rid) for view in views.values() for rid in view.markers]
    async with inv.pool.acquire() as conn:
        statuses = await storage.fetch_order_statuses(conn, marker_ids)
        reserved = await storage.fetch_reserved_orders(conn, ids)
    now = now_ms()
    missing = [pid for pid, view in views.items() if view.stock is None]
    if missing:
        report.loaded += len(await load_products(inv, missing, replace=False))
    # 1. Per reservation: exact, idempotent repairs.
    for pid, view in views.items():
        if view.stock is None:
            continue
        for rid, marker in view.markers.items():
            status = statuses.get(rid)
            if marker.pending and status is None:
                since = view.pending_since_ms.get(rid, now)
                if now - since >= inv.grace_ms and await gate.undo(product_id=pid, rid=rid):
                    report.undone += 1
                continue
            if status in ("cancelled", "expired"):
                if await gate.release(product_id=pid, rid=rid):
                    report.released += 1
                continue
            if marker.pending and status in ("reserved", "paid"):
                await gate.commit(
                    product_id=pid, rid=rid, user_id=marker.user_id, quantity=marker.quantity
                )
                report.committed += 1
            if status == "paid" and await gate.forget(product_id=pid, rid=rid):
                report.forgotten += 1
    for row in reserved:
        pid, rid = row["product_id"], str(row["id"])
        seen = views.get(pid)
        if seen is None or seen.stock is None or rid in seen.markers:
            continue
        adopted = await gate.commit(
            product_id=pid, rid=rid, user_id=row["user_id"], quantity=row["quantity"]
        )
        if adopted == 2:
            report.adopted += 1
    # 2. Stock drift: Postgres first, then the gate; act only on a drift seen twice.
    await _check_drift(inv, [pid for pid in ids if views[pid].stock is not None], report)
    GATE_REPAIRS.labels("commit").inc(report.committed)
    GATE_REPAIRS.labels("undo").inc(report.undone)
    GATE_REPAIRS.labels("release").inc(report.released)
    GATE_REPAIRS.labels("adopt").inc(report.adopted)


async def _check_drift(inv: Inventory, ids: list[int], report: ReconcileReport) -> None:
    if not ids:
        return
    # One snapshot for stock and statuses, taken before the gate is read: a buy that
    # commits in between is seen by the gate but not by the snapshot, so it counts
    # as in flight, never as drift.
    async with (
        inv.pool.acquire() as conn,
        conn.transaction(isolation="repeatable_read", readonly=True),
    ):
        products = {row["id"]: row for row in await storage.fetch_gate_products(conn, ids)}
        views = await _views(inv, ids)
        pending = [
            uuid.UUID(rid) for v in views.values() for rid, m in v.markers.items() if m.pending
        ]
        known = await storage.fetch_order_statuses(conn, pending)
    for pid in ids:
        view = views[pid]
        if view.stock is None or pid not in products:
            continue
        in_flight = sum(
            m.quantity for rid, m in view.markers.items() if m.pending and rid not in known
        )
        drift = view.stock - (products[pid]["stock"] - in_flight)
        report.drift_units += abs(drift)
        previous = inv.drift_seen.pop(pid, 0)
        if drift == 0:
            continue
        if drift == previous:
            await inv.gate.adjust(product_id=pid, delta=-drift)
            report.adjusted[pid] = -drift
            GATE_REPAIRS.labels("adjust").inc()
            log.warning("gate stock repaired", extra={"product_id": pid, "drift": drift})
            if drift < 0:
                await announce_stock_restored(inv, [pid])
        else:
            inv.drift_seen[pid] = drift
