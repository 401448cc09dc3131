"""PSP sandbox settings: fault injection defaults (SHOPSTACK_PSP_*) and callback delivery."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import CommonSettings

Rate = Field(default=0.0, ge=0.0, le=1.0)


class SandboxSettings(CommonSettings):
    service_name: ClassVar[str] = "psp_sandbox"

    # Where signed callbacks go (the launcher points it at payment); unset: none are sent.
    psp_callback_url: str | None = None

    # Fault injection defaults; `POST /_sandbox/faults` overrides them at run time.
    psp_latency_ms: int = Field(default=0, ge=0, le=60_000)
    psp_error_rate: float = Rate
    psp_timeout_rate: float = Rate
    psp_reset_rate: float = Rate
    psp_decline_rate: float = Rate
    psp_reject_rate: float = Rate
    psp_duplicate_rate: float = Rate
    psp_out_of_order_rate: float = Rate
    psp_callback_drop_rate: float = Rate
    psp_callback_delay_ms: int = Field(default=0, ge=0, le=600_000)

    # A black-holed reply waits this long (or until the client hangs up) before answering.
    psp_hang_s: float = Field(default=30.0, gt=0, le=600)

    # Callback delivery: at least once, with backoff, then given up.
    psp_callback_timeout_s: float = Field(default=2.0, gt=0, le=60)
    psp_callback_max_attempts: int = Field(default=8, ge=1, le=100)
    psp_callback_backoff_s: float = Field(default=0.5, gt=0, le=600)
    psp_callback_poll_s: float = Field(default=0.05, gt=0, le=10)
    psp_callback_concurrency: int = Field(default=16, ge=1, le=1000)

    # Redis keys of the sandbox's state (every worker shares them).
    psp_key_prefix: str = Field(default="psp:", min_length=1, max_length=64)
    psp_retention_s: int = Field(default=7 * 86_400, ge=60)

    @model_validator(mode="after")
    def _callback_url(self) -> SandboxSettings:
        url = self.psp_callback_url
        if url is not None and url and not url.startswith(("http://", "https://")):
            raise ValueError("psp_callback_url must be an http(s) URL")
        return self
