"""The PSP sandbox app factory. This release answers health and metrics only."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common import settings as common_settings
from services.common.app import ServiceState, build_app
from services.psp_sandbox.settings import SandboxSettings


def create_app(settings: SandboxSettings | None = None) -> FastAPI:
    """Build the sandbox app; it needs no database."""
    resolved = settings or common_settings.load(SandboxSettings)
    resolved.secret("psp_webhook_secret")

    @asynccontextmanager
    async def lifespan(_: common_settings.CommonSettings) -> AsyncIterator[ServiceState]:
        yield ServiceState(resolved)

    return build_app(
        settings=resolved,
        title="shopstack psp_sandbox",
        description="A stand-in payment provider with fault injection.",
        lifespan=lifespan,
        routers=[],
    )
