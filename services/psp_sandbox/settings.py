"""PSP sandbox settings: fault injection defaults (SHOPSTACK_PSP_*) and callback delivery."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import CommonSettings


def _rate(what: str) -> float:
    return Field(default=0.0, ge=0.0, le=1.0, description=what)


class SandboxSettings(CommonSettings):
    service_name: ClassVar[str] = "psp_sandbox"

    psp_callback_url: str | None = Field(
        default=None, description="where signed callbacks go (unset: none are sent)"
    )

    # Fault injection defaults; `POST /_sandbox/faults` overrides them at run time.
    psp_latency_ms: int = Field(
        default=0, ge=0, le=60_000, description="sandbox: delay before each charge is handled"
    )
    psp_error_rate: float = _rate("sandbox: share of charges answered 503, nothing charged")
    psp_timeout_rate: float = _rate("sandbox: share charged, then never answered in time")
    psp_reset_rate: float = _rate("sandbox: share charged, then the connection dropped mid-reply")
    psp_decline_rate: float = _rate("sandbox: share of charges declined (status failed)")
    psp_reject_rate: float = _rate("sandbox: share answered 400, nothing charged")
    psp_duplicate_rate: float = _rate("sandbox: share of callbacks delivered twice")
    psp_out_of_order_rate: float = _rate(
        "sandbox: share of successes also sending an older charge.failed, after"
    )
    psp_callback_drop_rate: float = _rate("sandbox: share of charges whose callback is never sent")
    psp_callback_delay_ms: int = Field(
        default=0, ge=0, le=600_000, description="sandbox: delay before a callback is sent"
    )
    psp_hang_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="sandbox: a black-holed reply waits this long (or until the client leaves)",
    )

    psp_callback_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="sandbox: timeout of one callback delivery"
    )
    psp_callback_max_attempts: int = Field(
        default=8, ge=1, le=100, description="sandbox: callback deliveries before giving up"
    )
    psp_callback_backoff_s: float = Field(
        default=0.5, gt=0, le=600, description="sandbox: first retry delay (doubles, max 30 s)"
    )
    psp_callback_poll_s: float = Field(
        default=0.05, gt=0, le=10, description="sandbox: how often due callbacks are looked for"
    )
    psp_callback_concurrency: int = Field(
        default=16, ge=1, le=1000, description="sandbox: callbacks in flight per worker"
    )

    psp_key_prefix: str = Field(
        default="psp:", min_length=1, max_length=64, description="sandbox: Redis key prefix"
    )
    psp_retention_s: int = Field(
        default=7 * 86_400, ge=60, description="sandbox: charges and keys are kept this long"
    )

    @model_validator(mode="after")
    def _callback_url(self) -> SandboxSettings:
        url = self.psp_callback_url
        if url is not None and url and not url.startswith(("http://", "https://")):
            raise ValueError("psp_callback_url must be an http(s) URL")
        return self
