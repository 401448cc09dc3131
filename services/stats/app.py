"""The stats app factory. This release answers health and metrics only."""

from __future__ import annotations

from fastapi import FastAPI

from services.common import settings as common_settings
from services.common.app import build_app
from services.common.state import open_data_state
from services.stats.settings import StatsSettings


def create_app(settings: StatsSettings | None = None) -> FastAPI:
    """Build the stats app; settings come from the environment unless given."""
    resolved = settings or common_settings.load(StatsSettings)
    return build_app(
        settings=resolved,
        title="shopstack stats",
        description="Batched ingestion of user-behaviour events and real-time aggregates.",
        lifespan=open_data_state,
        routers=[],
    )
