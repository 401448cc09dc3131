"""What the stats lifespan owns: the stream, the aggregates and (optionally) a writer."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.common.app import Check
from services.common.errors import ServiceNotReady
from services.common.state import DataState, open_data_state
from services.stats.aggregates import Aggregates
from services.stats.buckets import Tiers
from services.stats.jobs import Writer
from services.stats.settings import StatsSettings
from services.stats.stream import EventStream


class StatsState(DataState):
    def __init__(self, base: DataState, settings: StatsSettings, writer: Writer | None) -> None:
        super().__init__(settings, base.db, base.redis)
        self.stats_settings = settings
        self.stream = EventStream(base.redis, settings)
        self.aggregates = Aggregates(
            base.redis, prefix=settings.stats_key_prefix, top_cache_s=settings.stats_top_cache_s
        )
        self.tiers = Tiers(settings.stats_fine_window_s)
        self.writer = writer

    def readiness_checks(self) -> dict[str, Check]:
        checks = super().readiness_checks()
        writer = self.writer
        if writer is not None:

            async def writer_alive() -> None:
                if not writer.is_running:
                    raise ServiceNotReady("the writer stopped")

            checks["writer"] = writer_alive
        return checks


@asynccontextmanager
async def open_stats_state(settings: StatsSettings) -> AsyncIterator[StatsState]:
    """Open pool and client; run this process's writer while the app serves."""
    async with open_data_state(settings) as base:
        writer = Writer(settings) if settings.stats_writer_enabled else None
        if writer is not None:
            writer.start()
        try:
            yield StatsState(base, settings, writer)
        finally:
            if writer is not None:
                await writer.stop()
