"""Base settings every service shares: DSNs, pools, limits, secrets."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PORTS: dict[str, int] = {
    "gateway": 8000,
    "catalog": 8001,
    "payment": 8002,
    "stats": 8003,
    "psp_sandbox": 8009,
}
SERVICES: tuple[str, ...] = tuple(DEFAULT_PORTS)

# Documented development defaults. They are refused outside dev mode.
DEV_SECRETS: dict[str, str] = {
    "jwt_secret": "dev-only-jwt-secret-change-me-0123456789abcdef",
    "psp_webhook_secret": "dev-only-psp-webhook-secret-0123456789abcdef",
    "admin_password": "admin-password",
}
MIN_SECRET_BYTES = 32
MIN_ADMIN_PASSWORD_CHARS = 12


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PROD = "prod"


class ConfigError(Exception):
    """Configuration is missing or unsafe; the process must not start."""


class CommonSettings(BaseSettings):
    """Settings shared by all services, read once from SHOPSTACK_* variables."""

    model_config = SettingsConfigDict(
        env_prefix="SHOPSTACK_", extra="ignore", frozen=True, validate_default=True
    )

    service_name: ClassVar[str] = "common"

    env: Environment = Field(
        default=Environment.DEV, description="dev, test or prod; prod refuses dev secrets"
    )
    database_url: str | None = Field(
        default=None, description="PostgreSQL DSN (unset under `shopstack up`: embedded server)"
    )
    redis_url: str | None = Field(
        default=None, description="Redis URL (unset under `shopstack up`: embedded server)"
    )

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="port to listen on (default: the service's own, 8000-8009)",
    )
    workers: int = Field(default=1, ge=1, le=64, description="granian worker processes")

    db_pool_min: int = Field(
        default=2, ge=0, le=100, description="asyncpg pool minimum size, per worker process"
    )
    db_pool_max: int = Field(
        default=10, ge=1, le=200, description="asyncpg pool maximum size, per worker process"
    )
    db_command_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=120,
        description="timeout of every SQL statement and of opening a connection",
    )
    db_acquire_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=120,
        description="longest wait for a free pooled connection; then the request gets 503",
    )
    redis_pool_max: int = Field(
        default=50,
        ge=1,
        le=10_000,
        description="Redis connections per worker process (callers wait, bounded)",
    )
    redis_timeout_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="connect, command and pool-wait timeout for Redis; the gateway's Redis "
        "budget per request (rate limits fail open past it, login fails closed)",
    )

    max_body_bytes: int = Field(
        default=1_048_576,
        ge=1024,
        le=64 * 1_048_576,
        description="largest request body accepted (413 beyond)",
    )
    body_read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="time a client has to send a whole request body (408 beyond)",
    )
    fast_lane: bool = Field(
        default=True,
        description="answer each service's hottest routes past the framework stack "
        "(same middleware, errors and limits; off: FastAPI serves them)",
    )
    max_header_bytes: int = Field(
        default=16_384,
        ge=8192,
        le=1_048_576,
        description="request line plus headers; larger (or > 100 headers) gets 431",
    )
    header_read_timeout_ms: int = Field(
        default=10_000,
        ge=100,
        le=60_000,
        description="time a client has to send request headers (granian closes the connection)",
    )

    # granian options for `shopstack serve` (a service may change its defaults).
    shutdown_timeout_s: int = Field(
        default=10,
        ge=1,
        le=300,
        description="on SIGTERM, time in-flight requests get to finish before the worker is killed",
    )
    cpu_sched_policy: Literal["batch", "other"] = Field(
        default="batch",
        description="Linux scheduling policy of the server processes: batch (no wake-up "
        "preemption, so services sharing a busy core switch less often) or other (the default)",
    )
    granian_backlog: int = Field(
        default=2048, ge=128, le=65_535, description="listen backlog (capped by somaxconn)"
    )
    granian_backpressure: int | None = Field(
        default=None,
        ge=1,
        le=100_000,
        description="requests in progress per worker before new ones wait (unset: granian's)",
    )
    granian_http1_only: bool = Field(
        default=False, description="serve HTTP/1.1 only (no per-connection HTTP/2 detection)"
    )
    granian_keep_alive: bool = Field(
        default=True, description="keep HTTP/1.1 connections open between requests"
    )

    log_level: str = Field(default="INFO", description="root log level")
    json_logs: bool = Field(default=True, description="one JSON object per log line")

    jwt_secret: SecretStr | None = Field(
        default=None, description="HMAC key for access tokens (secret; >= 32 bytes outside dev)"
    )
    psp_webhook_secret: SecretStr | None = Field(
        default=None, description="HMAC key the provider signs callbacks with (secret)"
    )
    admin_password: SecretStr | None = Field(
        default=None, description="password of the seeded admin user (secret)"
    )

    @model_validator(mode="after")
    def _check(self) -> CommonSettings:
        if self.db_pool_min > self.db_pool_max:
            raise ValueError("db_pool_min must not exceed db_pool_max")
        return self

    @property
    def listen_port(self) -> int:
        return self.port if self.port is not None else DEFAULT_PORTS.get(self.service_name, 8000)

    @property
    def is_dev(self) -> bool:
        return self.env is not Environment.PROD

    def require_database_url(self) -> str:
        if not self.database_url:
            raise ConfigError(
                "SHOPSTACK_DATABASE_URL is not set (`shopstack up` sets it, or starts an "
                "embedded PostgreSQL)"
            )
        return self.database_url

    def require_redis_url(self) -> str:
        if not self.redis_url:
            raise ConfigError(
                "SHOPSTACK_REDIS_URL is not set (`shopstack up` sets it, or starts an "
                "embedded Redis)"
            )
        return self.redis_url

    def secret(self, name: str) -> str:
        """Return a secret's value; dev mode falls back to the documented dev default.

        Outside dev mode a missing or short secret is a ConfigError, and the error
        message never contains the value.
        """
        value: SecretStr | None = getattr(self, name)
        if value is not None and value.get_secret_value():
            raw = value.get_secret_value()
            if not self.is_dev:
                if raw == DEV_SECRETS.get(name):
                    raise ConfigError(f"SHOPSTACK_{name.upper()} is the dev default")
                minimum = MIN_ADMIN_PASSWORD_CHARS if name == "admin_password" else MIN_SECRET_BYTES
                if len(raw.encode()) < minimum:
                    raise ConfigError(
                        f"SHOPSTACK_{name.upper()} is too short (at least {minimum} bytes)"
                    )
            return raw
        if self.is_dev and name in DEV_SECRETS:
            return DEV_SECRETS[name]
        raise ConfigError(f"SHOPSTACK_{name.upper()} must be set outside dev mode")


def load(settings_cls: type[CommonSettings], **overrides: Any) -> CommonSettings:
    """Build and validate settings, turning validation errors into a ConfigError."""
    from pydantic import ValidationError

    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(f"invalid {settings_cls.service_name} settings: {exc}") from exc
