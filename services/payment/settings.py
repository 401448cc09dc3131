"""Payment settings (SHOPSTACK_PSP_*, SHOPSTACK_PAYMENT_* and the upstream URLs)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import DEFAULT_PORTS, CommonSettings


def _local(service: str) -> str:
    return f"http://127.0.0.1:{DEFAULT_PORTS[service]}"


class PaymentSettings(CommonSettings):
    service_name: ClassVar[str] = "payment"

    catalog_url: str = _local("catalog")
    psp_url: str = _local("psp_sandbox")
    psp_name: str = Field(default="sandbox", pattern=r"^[a-z0-9_\-]{1,32}$")

    # Provider calls: a per-attempt timeout, an overall deadline that stays under the
    # gateway's 10 s write timeout, and retries with full jitter under a budget.
    psp_timeout_s: float = Field(default=3.0, gt=0, le=60)
    psp_connect_timeout_s: float = Field(default=1.0, gt=0, le=30)
    psp_deadline_s: float = Field(default=8.0, gt=0, le=120)
    psp_max_attempts: int = Field(default=3, ge=1, le=10)
    psp_retry_base_s: float = Field(default=0.1, gt=0, le=10)
    psp_retry_cap_s: float = Field(default=1.0, gt=0, le=60)
    psp_retry_budget_ratio: float = Field(default=0.2, ge=0, le=10)
    psp_retry_budget_min_per_s: float = Field(default=5.0, ge=0, le=10_000)
    psp_retry_budget_window_s: float = Field(default=10.0, gt=0, le=600)
    psp_pool_size: int = Field(default=100, ge=1, le=10_000)

    # Circuit breaker per provider (per worker process).
    psp_breaker_fail_max: int = Field(default=5, ge=1, le=1000)
    psp_breaker_reset_s: float = Field(default=10.0, gt=0, le=3600)

    # Catalog's internal order API.
    catalog_timeout_s: float = Field(default=2.0, gt=0, le=60)
    catalog_pool_size: int = Field(default=100, ge=1, le=10_000)

    # Idempotency keys live at least 24 h; an in-flight key whose worker died is taken
    # over after the lock timeout (longer than any request can run).
    payment_idempotency_ttl_s: int = Field(default=86_400, ge=86_400, le=30 * 86_400)
    payment_idempotency_lock_s: float = Field(default=30.0, gt=0, le=3600)

    # Settling unknown outcomes: query the provider for payments unsettled this long;
    # with no charge found after the grace period, nothing was charged.
    payment_settle_interval_s: float = Field(default=1.0, gt=0, le=600)
    payment_settle_after_s: float = Field(default=10.0, ge=0, le=3600)
    payment_settle_grace_s: float = Field(default=30.0, ge=0, le=86_400)
    payment_settle_batch: int = Field(default=50, ge=1, le=10_000)

    # The outbox relay to the catalog.
    payment_outbox_poll_s: float = Field(default=0.5, gt=0, le=60)
    payment_outbox_batch: int = Field(default=50, ge=1, le=10_000)
    payment_outbox_max_backoff_s: float = Field(default=10.0, gt=0, le=3600)

    # Signed callbacks: accepted while |now - t| <= tolerance.
    psp_webhook_tolerance_s: int = Field(default=300, ge=1, le=3600)

    # Short connections (see docs/payments.md): a deep accept queue, HTTP/1 only,
    # a quick header timeout, and a cap on concurrent requests per worker.
    granian_backlog: int = Field(default=4096, ge=128, le=65_535)
    granian_backpressure: int | None = Field(default=256, ge=1, le=100_000)
    granian_http1_only: bool = True
    header_read_timeout_ms: int = Field(default=5_000, ge=100, le=60_000)
    # Payment bodies are a few hundred bytes; refuse anything large before reading it.
    max_body_bytes: int = Field(default=65_536, ge=1024, le=1_048_576)

    @model_validator(mode="after")
    def _payment_checks(self) -> PaymentSettings:
        for name in ("catalog_url", "psp_url"):
            url: str = getattr(self, name)
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL")
        if self.psp_retry_cap_s < self.psp_retry_base_s:
            raise ValueError("psp_retry_cap_s must not be below psp_retry_base_s")
        return self
