"""The stats app factory (what granian serves)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.common import settings as common_settings
from services.common.app import build_app
from services.common.fastlane import ServiceApp
from services.stats.routes import FAST_ROUTES, router
from services.stats.settings import StatsSettings
from services.stats.state import StatsState, open_stats_state


def create_app(settings: StatsSettings | None = None) -> ServiceApp:
    """Build the stats app; settings come from the environment unless given."""
    resolved = settings or common_settings.load(StatsSettings)
    assert isinstance(resolved, StatsSettings)

    @asynccontextmanager
    async def lifespan(_: common_settings.CommonSettings) -> AsyncIterator[StatsState]:
        async with open_stats_state(resolved) as state:
            yield state

    return build_app(
        settings=resolved,
        title="shopstack stats",
        description="Batched ingestion of user-behaviour events and real-time aggregates.",
        lifespan=lifespan,
        routers=[router],
        fast_routes=FAST_ROUTES,
    )
