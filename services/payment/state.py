"""What the payment service's lifespan owns."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from services.common.state import DataState, open_data_state
from services.payment.breaker import Clock, ProviderBreaker
from services.payment.catalog import CatalogClient
from services.payment.provider import PaymentProvider, ProviderError, SandboxProvider
from services.payment.resilience import RetryBudget, RetryPolicy
from services.payment.settings import PaymentSettings


def is_breaker_failure(exc: BaseException) -> bool:
    """Provider trouble trips the breaker; a rejected request (4xx) does not."""
    if isinstance(exc, ProviderError):
        return exc.counts_as_failure
    return isinstance(exc, TimeoutError)


class PaymentState(DataState):
    def __init__(
        self,
        base: DataState,
        settings: PaymentSettings,
        *,
        provider: PaymentProvider,
        catalog: CatalogClient,
        breaker_clock: Clock,
    ) -> None:
        super().__init__(settings, base.db, base.redis)
        self.config = settings
        self.provider = provider
        self.catalog = catalog
        self.breaker = ProviderBreaker(
            provider.name,
            fail_max=settings.psp_breaker_fail_max,
            reset_timeout_s=settings.psp_breaker_reset_s,
            is_failure=is_breaker_failure,
            clock=breaker_clock,
        )
        self.retry_policy = RetryPolicy(
            max_attempts=settings.psp_max_attempts,
            base_s=settings.psp_retry_base_s,
            cap_s=settings.psp_retry_cap_s,
            deadline_s=settings.psp_deadline_s,
        )
        self.retry_budget = RetryBudget(
            ratio=settings.psp_retry_budget_ratio,
            min_per_s=settings.psp_retry_budget_min_per_s,
            window_s=settings.psp_retry_budget_window_s,
        )
        self.rng = random.Random()  # jitter, not security
        self.webhook_secret = settings.secret("psp_webhook_secret")
        # Set after a commit that queued outbox messages: the relay sends them at once.
        self.outbox_wakeup = asyncio.Event()
        # Provider event ids known to be recorded (committed): a redelivery is answered
        # `duplicate` without a query. A record is never undone, so the set cannot go stale.
        self.recorded_events = RecentSet(settings.psp_event_cache_size)


class RecentSet:
    """A set that keeps at most `size` members, forgetting the oldest first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._members: dict[str, None] = {}

    def __contains__(self, member: str) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)

    def add(self, member: str) -> None:
        if self.size <= 0 or member in self._members:
            return
        if len(self._members) >= self.size:
            del self._members[next(iter(self._members))]
        self._members[member] = None


@asynccontextmanager
async def open_payment_state(
    settings: PaymentSettings, *, breaker_clock: Clock = time.monotonic
) -> AsyncIterator[PaymentState]:
    """Open Postgres, Redis, the catalog client and the provider; close them in reverse."""
    async with open_data_state(settings) as base:
        catalog = CatalogClient(
            base_url=settings.catalog_url,
            timeout_s=settings.catalog_timeout_s,
            pool_size=settings.catalog_pool_size,
        )
        try:
            provider = SandboxProvider(
                name=settings.psp_name,
                base_url=settings.psp_url,
                pool_size=settings.psp_pool_size,
                connect_timeout_s=settings.psp_connect_timeout_s,
            )
            try:
                yield PaymentState(
                    base, settings, provider=provider, catalog=catalog, breaker_clock=breaker_clock
                )
            finally:
                await provider.close()
        finally:
            await catalog.close()
