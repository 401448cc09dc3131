"""What the sandbox's lifespan owns: Redis, its store, a random source, the dispatcher."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from redis.asyncio import Redis

from services.common import redis
from services.common.app import ServiceState
from services.common.health import Check
from services.psp_sandbox.domain import FaultsInForce
from services.psp_sandbox.jobs import CallbackDispatcher
from services.psp_sandbox.settings import SandboxSettings
from services.psp_sandbox.store import SandboxStore


class SandboxState(ServiceState):
    def __init__(self, settings: SandboxSettings, client: Redis) -> None:
        super().__init__(settings)
        self.sandbox_settings = settings
        self.redis = client
        self.store = SandboxStore(
            client, prefix=settings.psp_key_prefix, retention_s=settings.psp_retention_s
        )
        self.rng = random.Random()  # fault injection, not security
        self.faults = FaultsInForce(settings)
        self.dispatcher = CallbackDispatcher(
            settings, self.store, settings.secret("psp_webhook_secret")
        )

    def readiness_checks(self) -> dict[str, Check]:
        return {"redis": lambda: redis.ping(self.redis)}


@asynccontextmanager
async def open_sandbox_state(settings: SandboxSettings) -> AsyncIterator[SandboxState]:
    async with redis.open_redis(settings) as client:
        state = SandboxState(settings, client)
        state.dispatcher.start()
        try:
            yield state
        finally:
            await state.dispatcher.stop()
