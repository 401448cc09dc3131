"""SEC-5: secrets are validated at start-up and never printed."""

from __future__ import annotations

import pytest

from services.common.settings import DEV_SECRETS, CommonSettings, ConfigError, Environment, load
from services.gateway.app import create_app as create_gateway
from services.gateway.settings import GatewaySettings


def test_dev_mode_falls_back_to_documented_defaults() -> None:
    settings = CommonSettings(env=Environment.DEV)
    assert settings.secret("jwt_secret") == DEV_SECRETS["jwt_secret"]
    assert settings.secret("admin_password") == "admin-password"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (None, "must be set"),
        ("short-secret", "too short"),
        (DEV_SECRETS["jwt_secret"], "dev default"),
    ],
)
def test_prod_refuses_missing_short_or_default_secrets(value: str | None, fragment: str) -> None:
    settings = CommonSettings(env=Environment.PROD, jwt_secret=value)
    with pytest.raises(ConfigError, match=fragment) as caught:
        settings.secret("jwt_secret")
    if value:
        assert value not in str(caught.value)


def test_prod_refuses_the_dev_admin_password() -> None:
    settings = CommonSettings(env=Environment.PROD, admin_password="admin-password")
    with pytest.raises(ConfigError):
        settings.secret("admin_password")


def test_prod_accepts_strong_secrets() -> None:
    strong = "s" * 40
    settings = CommonSettings(env=Environment.PROD, jwt_secret=strong)
    assert settings.secret("jwt_secret") == strong
    assert strong not in repr(settings)
    assert strong not in str(settings.model_dump())


def test_gateway_refuses_to_start_without_a_secret_in_prod() -> None:
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        create_gateway(GatewaySettings(env=Environment.PROD))


def test_bad_values_fail_fast_with_a_clear_message() -> None:
    from services.catalog.settings import CatalogSettings

    with pytest.raises(ConfigError, match="invalid catalog settings"):
        load(CatalogSettings, db_pool_min=50, db_pool_max=5)


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPSTACK_DB_POOL_MAX", "7")
    monkeypatch.setenv("SHOPSTACK_ENV", "prod")
    settings = CommonSettings()
    assert settings.db_pool_max == 7
    assert not settings.is_dev
