"""The stats app factory (what granian serves)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common import settings as common_settings
from services.common.app import build_app
from services.stats.ingress import EventsIngress
from services.stats.routes import router
from services.stats.settings import StatsSettings
from services.stats.state import StatsState, open_stats_state


def create_app(settings: StatsSettings | None = None) -> FastAPI:
    """Build the stats app; settings come from the environment unless given."""
    resolved = settings or common_settings.load(StatsSettings)
    assert isinstance(resolved, StatsSettings)

    @asynccontextmanager
    async def lifespan(_: common_settings.CommonSettings) -> AsyncIterator[StatsState]:
        async with open_stats_state(resolved) as state:
            yield state

    app = build_app(
        settings=resolved,
        title="shopstack stats",
        description="Batched ingestion of user-behaviour events and real-time aggregates.",
        lifespan=lifespan,
        routers=[router],
    )
    # Outermost of the service's middleware: it answers POST /api/v1/events itself.
    app.add_middleware(EventsIngress, settings=resolved)
    return app
