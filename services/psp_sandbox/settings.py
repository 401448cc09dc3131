"""PSP sandbox settings."""

from __future__ import annotations

from typing import ClassVar

from services.common.settings import CommonSettings


class SandboxSettings(CommonSettings):
    service_name: ClassVar[str] = "psp_sandbox"
