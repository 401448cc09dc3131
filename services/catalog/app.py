"""The catalog app factory (what granian serves)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.catalog.order_routes import FAST_ROUTES, internal_router
from services.catalog.order_routes import router as order_router
from services.catalog.routes import router
from services.catalog.settings import CatalogSettings
from services.catalog.state import CatalogState, open_catalog_state
from services.common import settings as common_settings
from services.common.app import build_app
from services.common.fastlane import ServiceApp


def create_app(settings: CatalogSettings | None = None) -> ServiceApp:
    """Build the catalog app; settings come from the environment unless given."""
    resolved = settings or common_settings.load(CatalogSettings)
    assert isinstance(resolved, CatalogSettings)

    @asynccontextmanager
    async def lifespan(_: common_settings.CommonSettings) -> AsyncIterator[CatalogState]:
        async with open_catalog_state(resolved) as state:
            yield state

    return build_app(
        settings=resolved,
        title="shopstack catalog",
        description=(
            "Products, flash-sale inventory and orders. /internal/v1 is for the payment "
            "service only (the gateway does not route it)."
        ),
        lifespan=lifespan,
        routers=[router, order_router, internal_router],
        fast_routes=FAST_ROUTES,
    )
