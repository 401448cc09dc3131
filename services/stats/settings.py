"""Stats settings."""

from __future__ import annotations

from typing import ClassVar

from services.common.settings import CommonSettings


class StatsSettings(CommonSettings):
    service_name: ClassVar[str] = "stats"
