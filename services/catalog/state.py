"""What the catalog's lifespan owns."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.exceptions import RedisError

from services.catalog.cache import ProductCache
from services.catalog.gate import InventoryGate
from services.catalog.inventory import Inventory, ensure_gate
from services.catalog.jobs import start_jobs
from services.catalog.settings import CatalogSettings
from services.common.flags import SoldOutFlags
from services.common.state import DataState, open_data_state

log = logging.getLogger("shopstack.catalog")


class CatalogState(DataState):
    def __init__(self, base: DataState, settings: CatalogSettings) -> None:
        super().__init__(settings, base.db, base.redis)
        self.cache = ProductCache(
            base.redis,
            ttl_s=settings.catalog_cache_ttl_s,
            negative_ttl_s=settings.catalog_negative_cache_ttl_s,
        )
        self.inventory = Inventory(
            pool=base.db,
            redis=base.redis,
            gate=InventoryGate(base.redis, tombstone_ttl_s=settings.catalog_gate_tombstone_ttl_s),
            flags=SoldOutFlags(settings.catalog_sold_out_ttl_s),
            cache=self.cache,
            settings=settings,
        )


@asynccontextmanager
async def open_catalog_state(settings: CatalogSettings) -> AsyncIterator[CatalogState]:
    """Open pool and client, rebuild the gate from Postgres, run the jobs, close all."""
    async with open_data_state(settings) as base:
        state = CatalogState(base, settings)
        try:
            await ensure_gate(state.inventory, force=True)
        except RedisError:
            # Redis down at start-up: the order path answers 503 until it is back,
            # and the reconciler rebuilds the gate then.
            log.warning("gate rebuild at start-up failed: Redis unavailable")
        jobs = start_jobs(state.inventory)
        try:
            yield state
        finally:
            await jobs.stop()
