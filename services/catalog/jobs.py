"""Background loops the catalog lifespan starts and stops.

- the expiry sweeper: expires due reservations (FOR UPDATE SKIP LOCKED, so every
  worker may run it) and purges expired idempotency keys;
- the reconciler: checks the inventory invariant, watches for a Redis restart
  (rebuilds the gate), and repairs the gate from Postgres (one worker at a time);
- the stock-restored listener: clears this process's sold-out flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import UTC, datetime

from redis.exceptions import RedisError

from services.catalog import orders, storage
from services.catalog.inventory import (
    RECONCILE_LOCK_KEY,
    STOCK_RESTORED_CHANNEL,
    Inventory,
    ensure_gate,
    publish_invariant,
    reconcile,
)
from services.common.outage import OutageLog
from services.common.tasks import BackgroundTasks

log = logging.getLogger("shopstack.catalog.jobs")

IDEMPOTENCY_PURGE_EVERY_S = 60.0


async def sweep_once(inv: Inventory) -> int:
    """Expire every due reservation now (batch after batch); return how many."""
    total = 0
    while True:
        rows = await orders.expire_due_orders(inv=inv)
        total += len(rows)
        if len(rows) < inv.settings.catalog_sweep_batch:
            return total


async def _sweeper(inv: Inventory, stopping: asyncio.Event) -> None:
    errors = OutageLog(log, "catalog-sweeper")
    last_purge = 0.0
    while not stopping.is_set():
        try:
            await sweep_once(inv)
            if time.monotonic() - last_purge > IDEMPOTENCY_PURGE_EVERY_S:
                async with inv.pool.acquire() as conn:
                    await storage.purge_idempotency_keys(conn, now=datetime.now(UTC), limit=5000)
                last_purge = time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            errors.failed("expiry sweep failed", exc)
        else:
            errors.succeeded()
        await asyncio.sleep(inv.settings.catalog_sweep_interval_s)


async def reconcile_if_leader(inv: Inventory) -> bool:
    """Run one reconcile unless another worker holds the reconcile lock."""
    token = uuid.uuid4().hex
    ttl_ms = max(1000, int(inv.settings.catalog_reconcile_interval_s * 900))
    if not await inv.redis.set(RECONCILE_LOCK_KEY, token, nx=True, px=ttl_ms):
        return False
    report = await reconcile(inv)
    if report.undone or report.released or report.adopted or report.adjusted:
        log.warning(
            "gate repaired",
            extra={
                "undone": report.undone,
                "released": report.released,
                "adopted": report.adopted,
                "adjusted": report.adjusted,
            },
        )
    return True


async def _reconciler(inv: Inventory, stopping: asyncio.Event) -> None:
    errors = OutageLog(log, "catalog-reconciler")
    interval = inv.settings.catalog_reconcile_interval_s
    watch = min(1.0, interval)
    next_run = time.monotonic() + interval
    while not stopping.is_set():
        await asyncio.sleep(watch)
        try:
            await ensure_gate(inv)  # a restarted Redis is rebuilt within ~1 s
            if time.monotonic() >= next_run:
                next_run = time.monotonic() + interval
                if not await reconcile_if_leader(inv):
                    await publish_invariant(inv)  # this worker's gauge stays current
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            errors.failed("reconcile failed", exc)
        else:
            errors.succeeded()


async def _stock_restored_listener(inv: Inventory, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        pubsub = inv.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(STOCK_RESTORED_CHANNEL)
            inv.flags.clear_all()  # messages may have been missed while unsubscribed
            while not stopping.is_set():
                message = await pubsub.get_message(timeout=0.5)
                if message is None or message.get("type") != "message":
                    continue
                with contextlib.suppress(ValueError):
                    inv.flags.clear(int(message["data"]))
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError):
            log.warning("stock-restored listener lost Redis; retrying")
            inv.flags.clear_all()
            await asyncio.sleep(1.0)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


Jobs = BackgroundTasks


def start_jobs(inv: Inventory) -> Jobs:
    """Start the sweeper, the reconciler and the stock-restored listener."""
    jobs = Jobs()
    stop = jobs.stopping
    jobs.start("catalog-listener", lambda: _stock_restored_listener(inv, stop))
    if inv.settings.catalog_jobs_enabled:
        jobs.start("catalog-sweeper", lambda: _sweeper(inv, stop))
        jobs.start("catalog-reconciler", lambda: _reconciler(inv, stop))
    return jobs
