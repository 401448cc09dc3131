"""Payment settings."""

from __future__ import annotations

from typing import ClassVar

from services.common.settings import CommonSettings


class PaymentSettings(CommonSettings):
    service_name: ClassVar[str] = "payment"
