"""Gateway settings (SHOPSTACK_GATEWAY_* and the upstream URLs)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import DEFAULT_PORTS, CommonSettings


def _local(service: str) -> str:
    return f"http://127.0.0.1:{DEFAULT_PORTS[service]}"


class GatewaySettings(CommonSettings):
    service_name: ClassVar[str] = "gateway"

    catalog_url: str = Field(default=_local("catalog"), description="catalog base URL")
    payment_url: str = Field(default=_local("payment"), description="payment base URL")
    stats_url: str = Field(default=_local("stats"), description="stats base URL")

    # Upstream pools: explicit limits; idle sockets are dropped well before the
    # upstream's own keep-alive/header-read timeout closes them.
    gateway_upstream_pool_size: int = Field(
        default=64, ge=1, le=4096, description="keep-alive connections per upstream, per worker"
    )
    gateway_upstream_idle_s: float = Field(
        default=4.0,
        gt=0,
        le=300,
        description="idle pooled connections close after this (before the upstream does)",
    )
    gateway_upstream_connect_timeout_s: float = Field(
        default=1.0, gt=0, le=30, description="connect timeout towards an upstream"
    )
    gateway_read_timeout_s: float = Field(
        default=3.0, gt=0, le=120, description="whole-request timeout of read routes"
    )
    gateway_write_timeout_s: float = Field(
        default=10.0, gt=0, le=120, description="whole-request timeout of write routes"
    )
    gateway_small_body_bytes: int = Field(
        default=65_536,
        ge=1024,
        le=16 * 1_048_576,
        description="body limit of JSON write routes (orders, payments, admin)",
    )

    # Hot path: micro-cache of product detail, sold-out flags, load shedding.
    gateway_microcache_ttl_s: float = Field(
        default=0.8,
        ge=0,
        le=1.0,
        description="life of a cached product-detail reply (jittered down by up to 20 %)",
    )
    gateway_microcache_entries: int = Field(
        default=20_000,
        ge=1,
        le=1_000_000,
        description="cached product-detail replies kept per worker",
    )
    gateway_sold_out_ttl_s: float = Field(
        default=1.0,
        ge=0,
        le=10.0,
        description="how long a sold-out answer is repeated without asking the catalog",
    )
    gateway_max_in_flight: int = Field(
        default=512,
        ge=1,
        le=100_000,
        description="requests in progress per worker before new ones get 503 overloaded",
    )
    gateway_token_cache_entries: int = Field(
        default=50_000,
        ge=0,
        le=1_000_000,
        description="verified access tokens remembered per worker",
    )

    # Write routes (orders, payments, events): token buckets per user and per client IP.
    write_user_rate_per_s: float = Field(
        default=10.0, gt=0, description="write requests per second per user (token bucket refill)"
    )
    write_user_burst: int = Field(default=20, ge=1, description="write requests a user may burst")
    write_ip_rate_per_s: float = Field(
        default=1000.0, gt=0, description="write requests per second per client IP"
    )
    write_ip_burst: int = Field(
        default=2000, ge=1, description="write requests a client IP may burst"
    )

    jwt_issuer: str = Field(default="shopstack", description="`iss` of access tokens")
    jwt_audience: str = Field(default="shopstack-api", description="`aud` of access tokens")
    jwt_ttl_s: int = Field(
        default=900, ge=60, le=900, description="access token lifetime (at most 15 min)"
    )

    # Password hashing: argon2id, OWASP parameters; bounded concurrency.
    argon2_time_cost: int = Field(
        default=2, ge=2, le=10, description="argon2id iterations (OWASP: >= 2 at 19 MiB)"
    )
    argon2_memory_kib: int = Field(
        default=19_456, ge=19_456, le=1_048_576, description="argon2id memory per hash"
    )
    argon2_parallelism: int = Field(default=1, ge=1, le=8, description="argon2id lanes")
    gateway_hash_concurrency: int = Field(
        default=4,
        ge=1,
        le=64,
        description="password hashes computed at once per worker (memory bound)",
    )
    gateway_hash_queue: int = Field(
        default=64,
        ge=0,
        le=10_000,
        description="logins that may wait for a hashing slot before 503",
    )

    # Login throttling (token buckets in Redis, shared by every gateway worker).
    login_ip_rate_per_s: float = Field(
        default=20.0, gt=0, description="login attempts per second per client IP"
    )
    login_ip_burst: int = Field(
        default=40, ge=1, description="login attempts a client IP may burst"
    )
    login_failure_rate_per_s: float = Field(
        default=1 / 60, gt=0, description="failed logins per second per username (refill)"
    )
    login_failure_burst: int = Field(
        default=5, ge=1, description="failed logins per username before 429"
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="CIDRs whose X-Forwarded-For is believed (JSON list)"
    )

    @model_validator(mode="after")
    def _urls(self) -> GatewaySettings:
        for name in ("catalog_url", "payment_url", "stats_url"):
            url: str = getattr(self, name)
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{name} must be an http(s) URL")
        return self
