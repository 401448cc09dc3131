"""What the catalog's lifespan owns."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.catalog.cache import ProductCache
from services.catalog.settings import CatalogSettings
from services.common.state import DataState, open_data_state


class CatalogState(DataState):
    def __init__(self, base: DataState, settings: CatalogSettings) -> None:
        super().__init__(settings, base.db, base.redis)
        self.cache = ProductCache(
            base.redis,
            ttl_s=settings.catalog_cache_ttl_s,
            negative_ttl_s=settings.catalog_negative_cache_ttl_s,
        )


@asynccontextmanager
async def open_catalog_state(settings: CatalogSettings) -> AsyncIterator[CatalogState]:
    async with open_data_state(settings) as base:
        yield CatalogState(base, settings)
