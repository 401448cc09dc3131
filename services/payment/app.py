"""The payment app factory (what granian serves)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.common import settings as common_settings
from services.common.app import build_app
from services.common.fastlane import ServiceApp
from services.payment.breaker import Clock
from services.payment.jobs import Jobs
from services.payment.routes import FAST_ROUTES, router
from services.payment.settings import PaymentSettings
from services.payment.state import PaymentState, open_payment_state


def create_app(
    settings: PaymentSettings | None = None,
    *,
    breaker_clock: Clock = time.monotonic,
    run_jobs: bool = True,
) -> ServiceApp:
    """Build the payment app; settings come from the environment unless given.

    `breaker_clock` (monotonic seconds) is injectable for tests of the breaker's timing.
    """
    resolved = settings or common_settings.load(PaymentSettings)
    assert isinstance(resolved, PaymentSettings)
    resolved.secret("psp_webhook_secret")  # fail fast on a missing or weak secret

    @asynccontextmanager
    async def lifespan(_: common_settings.CommonSettings) -> AsyncIterator[PaymentState]:
        async with open_payment_state(resolved, breaker_clock=breaker_clock) as state:
            jobs = Jobs(state)
            if run_jobs:
                jobs.start()
            try:
                yield state
            finally:
                await jobs.stop()

    return build_app(
        settings=resolved,
        title="shopstack payment",
        description="Pay orders exactly once through a flaky provider: idempotency keys, "
        "retries with a budget, a circuit breaker, signed callbacks and an outbox to the catalog.",
        lifespan=lifespan,
        routers=[router],
        fast_routes=FAST_ROUTES,
    )
