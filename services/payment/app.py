"""The payment app factory. This release answers health and metrics only."""

from __future__ import annotations

from fastapi import FastAPI

from services.common import settings as common_settings
from services.common.app import build_app
from services.common.state import open_data_state
from services.payment.settings import PaymentSettings


def create_app(settings: PaymentSettings | None = None) -> FastAPI:
    """Build the payment app; settings come from the environment unless given."""
    resolved = settings or common_settings.load(PaymentSettings)
    resolved.secret("psp_webhook_secret")  # fail fast on a missing or weak secret
    return build_app(
        settings=resolved,
        title="shopstack payment",
        description="Payments with idempotency keys, retries and a circuit breaker.",
        lifespan=open_data_state,
        routers=[],
    )
