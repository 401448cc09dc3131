"""docs/configuration.md names every setting (regenerate: python tools/gen_config_docs.py)."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

import pytest

from services.common.settings import CommonSettings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [
    ("services.common.settings", "CommonSettings"),
    ("services.gateway.settings", "GatewaySettings"),
    ("services.catalog.settings", "CatalogSettings"),
    ("services.payment.settings", "PaymentSettings"),
    ("services.stats.settings", "StatsSettings"),
    ("services.psp_sandbox.settings", "SandboxSettings"),
]


@pytest.mark.parametrize(("module", "name"), SETTINGS)
def test_every_setting_is_documented(module: str, name: str) -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    cls: type[CommonSettings] = getattr(import_module(module), name)
    missing = [
        f"SHOPSTACK_{f.upper()}" for f in cls.model_fields if f"SHOPSTACK_{f.upper()}`" not in doc
    ]
    assert missing == [], "undocumented settings (run tools/gen_config_docs.py)"


def test_readme_opens_with_the_two_commands() -> None:
    head = (ROOT / "README.md").read_text().splitlines()[:6]
    assert any(line.startswith("make run") for line in head)
    assert any(line.startswith("make test") for line in head)
