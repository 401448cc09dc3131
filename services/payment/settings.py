"""Payment settings (SHOPSTACK_PSP_*, SHOPSTACK_PAYMENT_* and the upstream URLs)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import DEFAULT_PORTS, CommonSettings


def _local(service: str) -> str:
    return f"http://127.0.0.1:{DEFAULT_PORTS[service]}"


class PaymentSettings(CommonSettings):
    service_name: ClassVar[str] = "payment"

    catalog_url: str = Field(
        default=_local("catalog"), description="catalog base URL (its /internal/v1 order API)"
    )
    psp_url: str = Field(default=_local("psp_sandbox"), description="payment provider base URL")
    psp_name: str = Field(
        default="sandbox",
        pattern=r"^[a-z0-9_\-]{1,32}$",
        description="provider name in metrics, logs and payment rows",
    )

    # Provider calls: a per-attempt timeout, an overall deadline that stays under the
    # gateway's 10 s write timeout, and retries with full jitter under a budget.
    psp_timeout_s: float = Field(
        default=3.0, gt=0, le=60, description="timeout of one provider call attempt"
    )
    psp_connect_timeout_s: float = Field(
        default=1.0, gt=0, le=30, description="TCP connect timeout towards the provider"
    )
    psp_deadline_s: float = Field(
        default=8.0,
        gt=0,
        le=120,
        description="all attempts of one provider call, backoff included, end within this",
    )
    psp_max_attempts: int = Field(
        default=3, ge=1, le=10, description="attempts of a retryable provider call (1 + retries)"
    )
    psp_retry_base_s: float = Field(
        default=0.1, gt=0, le=10, description="full-jitter backoff base (retry n: up to base*2^n)"
    )
    psp_retry_cap_s: float = Field(
        default=1.0, gt=0, le=60, description="full-jitter backoff ceiling"
    )
    psp_retry_budget_ratio: float = Field(
        default=0.2, ge=0, le=10, description="retries may add this share of calls, per worker"
    )
    psp_retry_budget_min_per_s: float = Field(
        default=5.0, ge=0, le=10_000, description="retries always allowed per second (floor)"
    )
    psp_retry_budget_window_s: float = Field(
        default=10.0, gt=0, le=600, description="sliding window of the retry budget"
    )
    psp_pool_size: int = Field(
        default=100, ge=1, le=10_000, description="connections to the provider, per worker"
    )

    # Circuit breaker per provider (per worker process).
    psp_breaker_fail_max: int = Field(
        default=5, ge=1, le=1000, description="consecutive provider failures that open the breaker"
    )
    psp_breaker_reset_s: float = Field(
        default=10.0, gt=0, le=3600, description="open period before one trial call is let through"
    )

    # Catalog's internal order API.
    catalog_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="timeout of one call to the catalog"
    )
    catalog_pool_size: int = Field(
        default=100, ge=1, le=10_000, description="connections to the catalog, per worker"
    )

    payment_idempotency_ttl_s: int = Field(
        default=86_400,
        ge=86_400,
        le=30 * 86_400,
        description="Idempotency-Key records are kept this long (at least 24 h)",
    )
    payment_idempotency_lock_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="an unfinished key older than this is taken over and resumed",
    )

    # Settling unknown outcomes.
    payment_settle_interval_s: float = Field(
        default=1.0, gt=0, le=600, description="how often the settle job looks for due payments"
    )
    payment_settle_after_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="a payment unsettled this long after its charge attempt is asked about",
    )
    payment_settle_grace_s: float = Field(
        default=30.0,
        ge=0,
        le=86_400,
        description="no charge at the provider this long after our last attempt: not charged",
    )
    payment_settle_batch: int = Field(
        default=50, ge=1, le=10_000, description="payments the settle job claims at once"
    )

    # The outbox relay to the catalog.
    payment_outbox_poll_s: float = Field(
        default=0.5, gt=0, le=60, description="outbox relay poll interval (commits also wake it)"
    )
    payment_outbox_batch: int = Field(
        default=50, ge=1, le=10_000, description="outbox messages the relay claims at once"
    )
    payment_outbox_max_backoff_s: float = Field(
        default=10.0, gt=0, le=3600, description="ceiling of the relay's retry backoff"
    )

    psp_webhook_tolerance_s: int = Field(
        default=300, ge=1, le=3600, description="callbacks are accepted while |now - t| <= this"
    )
    psp_event_cache_size: int = Field(
        default=100_000,
        ge=0,
        le=10_000_000,
        description="provider event ids remembered per worker as recorded, so a redelivery "
        "is answered without a query (0: always ask Postgres)",
    )

    # Short connections (docs/payments.md): a deep accept queue, HTTP/1 only, a quick
    # header timeout, a cap on concurrent requests per worker, small bodies.
    granian_backlog: int = Field(default=4096, ge=128, le=65_535, description="listen backlog")
    granian_backpressure: int | None = Field(
        default=256, ge=1, le=100_000, description="requests in progress per worker"
    )
    granian_http1_only: bool = Field(default=True, description="serve HTTP/1.1 only")
    header_read_timeout_ms: int = Field(
        default=5_000, ge=100, le=60_000, description="time a client has to send headers"
    )
    max_body_bytes: int = Field(
        default=65_536, ge=1024, le=1_048_576, description="largest request body accepted"
    )

    @model_validator(mode="after")
    def _payment_checks(self) -> PaymentSettings:
        for name in ("catalog_url", "psp_url"):
            url: str = getattr(self, name)
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL")
        if self.psp_retry_cap_s < self.psp_retry_base_s:
            raise ValueError("psp_retry_cap_s must not be below psp_retry_base_s")
        return self
