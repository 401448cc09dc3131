"""The PSP sandbox app factory: a stand-in payment provider with fault injection."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.common import settings as common_settings
from services.common.app import build_app
from services.common.fastlane import ServiceApp
from services.psp_sandbox.routes import FAST_ROUTES, router
from services.psp_sandbox.settings import SandboxSettings
from services.psp_sandbox.state import SandboxState, open_sandbox_state


def create_app(settings: SandboxSettings | None = None) -> ServiceApp:
    """Build the sandbox app; its state lives in Redis so several workers agree."""
    resolved = settings or common_settings.load(SandboxSettings)
    assert isinstance(resolved, SandboxSettings)
    resolved.secret("psp_webhook_secret")

    @asynccontextmanager
    async def lifespan(_: common_settings.CommonSettings) -> AsyncIterator[SandboxState]:
        async with open_sandbox_state(resolved) as state:
            yield state

    return build_app(
        settings=resolved,
        title="shopstack psp_sandbox",
        description="A stand-in payment provider: charges with idempotency keys, signed "
        "callbacks (at least once, duplicates and out of order on demand) and fault injection.",
        lifespan=lifespan,
        routers=[router],
        fast_routes=FAST_ROUTES,
    )
