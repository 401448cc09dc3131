"""Gateway settings (SHOPSTACK_GATEWAY_* and the upstream URLs)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import DEFAULT_PORTS, CommonSettings


def _local(service: str) -> str:
    return f"http://127.0.0.1:{DEFAULT_PORTS[service]}"


class GatewaySettings(CommonSettings):
    service_name: ClassVar[str] = "gateway"

    catalog_url: str = _local("catalog")
    payment_url: str = _local("payment")
    stats_url: str = _local("stats")

    # Upstream pools: explicit limits; idle sockets are dropped well before the
    # upstream's own keep-alive/header-read timeout closes them.
    gateway_upstream_pool_size: int = Field(default=64, ge=1, le=4096)
    gateway_upstream_idle_s: float = Field(default=4.0, gt=0, le=300)
    gateway_upstream_connect_timeout_s: float = Field(default=1.0, gt=0, le=30)
    gateway_read_timeout_s: float = Field(default=3.0, gt=0, le=120)
    gateway_write_timeout_s: float = Field(default=10.0, gt=0, le=120)
    gateway_small_body_bytes: int = Field(default=65_536, ge=1024, le=16 * 1_048_576)

    # Hot path: micro-cache of product detail, sold-out flags, load shedding.
    gateway_microcache_ttl_s: float = Field(default=0.8, ge=0, le=1.0)
    gateway_microcache_entries: int = Field(default=20_000, ge=1, le=1_000_000)
    gateway_sold_out_ttl_s: float = Field(default=1.0, ge=0, le=10.0)
    gateway_max_in_flight: int = Field(default=512, ge=1, le=100_000)
    gateway_token_cache_entries: int = Field(default=50_000, ge=0, le=1_000_000)

    # Write routes (orders, payments, events): token buckets per user and per client IP.
    write_user_rate_per_s: float = Field(default=10.0, gt=0)
    write_user_burst: int = Field(default=20, ge=1)
    write_ip_rate_per_s: float = Field(default=1000.0, gt=0)
    write_ip_burst: int = Field(default=2000, ge=1)

    jwt_issuer: str = "shopstack"
    jwt_audience: str = "shopstack-api"
    jwt_ttl_s: int = Field(default=900, ge=60, le=900)

    # Password hashing: argon2id, OWASP parameters; bounded concurrency.
    argon2_time_cost: int = Field(default=2, ge=2, le=10)
    argon2_memory_kib: int = Field(default=19_456, ge=19_456, le=1_048_576)
    argon2_parallelism: int = Field(default=1, ge=1, le=8)
    gateway_hash_concurrency: int = Field(default=4, ge=1, le=64)
    gateway_hash_queue: int = Field(default=64, ge=0, le=10_000)

    # Login throttling (token buckets in Redis, shared by every gateway worker).
    login_ip_rate_per_s: float = Field(default=20.0, gt=0)
    login_ip_burst: int = Field(default=40, ge=1)
    login_failure_rate_per_s: float = Field(default=1 / 60, gt=0)
    login_failure_burst: int = Field(default=5, ge=1)
    trusted_proxies: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _urls(self) -> GatewaySettings:
        for name in ("catalog_url", "payment_url", "stats_url"):
            url: str = getattr(self, name)
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL")
        return self
