"""The gateway's routing table: one place says where each path goes and what it needs."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from services.gateway.settings import GatewaySettings


class Local(StrEnum):
    """Routes the gateway answers itself."""

    HEALTHZ = "healthz"
    READYZ = "readyz"
    METRICS = "metrics"
    LOGIN = "login"


@dataclass(frozen=True)
class Route:
    name: str  # the metrics label: a template, never a raw path
    prefix: str
    methods: frozenset[str] | None  # None: any, the upstream answers 405 with its own Allow
    upstream: str | None = None  # service name, or None for a local route
    local: Local | None = None
    needs_user: bool = False
    exact: bool = False
    timeout_s: float = 3.0
    max_body_bytes: int = 65_536
    rate_limited: bool = False  # write routes: per-user and per-IP token buckets
    sheddable: bool = True
    cached: bool = False  # product detail: served from the micro-cache

    def matches(self, path: str) -> bool:
        if path == self.prefix:
            return True
        return not self.exact and path.startswith(self.prefix + "/")


READ = frozenset({"GET", "HEAD"})
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# The upstream's own router knows which methods each path under the prefix takes: it
# answers the rest with a 405 whose Allow names that path's methods, not the prefix's.
ANY = None


def build_routes(settings: GatewaySettings) -> list[Route]:
    """First match wins, so more specific prefixes come first."""
    small = settings.gateway_small_body_bytes
    read_t = settings.gateway_read_timeout_s
    write_t = settings.gateway_write_timeout_s
    return [
        Route("/healthz", "/healthz", READ, local=Local.HEALTHZ, exact=True, sheddable=False),
        Route("/readyz", "/readyz", READ, local=Local.READYZ, exact=True, sheddable=False),
        Route("/metrics", "/metrics", READ, local=Local.METRICS, exact=True, sheddable=False),
        Route(
            "/api/v1/auth/login",
            "/api/v1/auth/login",
            frozenset({"POST"}),
            local=Local.LOGIN,
            exact=True,
            max_body_bytes=4096,
        ),
        Route(
            "/api/v1/products", "/api/v1/products", READ, "catalog", exact=True, timeout_s=read_t
        ),
        Route(
            "/api/v1/products/{id}",
            "/api/v1/products",
            READ,
            "catalog",
            timeout_s=read_t,
            cached=True,
        ),
        Route(
            "/api/v1/orders",
            "/api/v1/orders",
            ANY,
            "catalog",
            needs_user=True,
            timeout_s=write_t,
            max_body_bytes=small,
            rate_limited=True,
        ),
        Route(
            "/api/v1/admin/products",
            "/api/v1/admin/products",
            ANY,
            "catalog",
            needs_user=True,
            timeout_s=write_t,
            max_body_bytes=small,
        ),
        Route(
            "/api/v1/payments/callbacks/psp",
            "/api/v1/payments/callbacks/psp",
            frozenset({"POST"}),
            "payment",
            exact=True,
            timeout_s=write_t,
            max_body_bytes=small,
        ),
        Route(
            "/api/v1/payments",
            "/api/v1/payments",
            ANY,
            "payment",
            needs_user=True,
            timeout_s=write_t,
            max_body_bytes=small,
            rate_limited=True,
        ),
        Route(
            "/api/v1/events",
            "/api/v1/events",
            frozenset({"POST"}),
            "stats",
            exact=True,
            timeout_s=write_t,
            max_body_bytes=settings.max_body_bytes,
            rate_limited=True,
        ),
        Route("/api/v1/stats", "/api/v1/stats", READ, "stats", timeout_s=read_t),
    ]


def match(routes: list[Route], path: str) -> Route | None:
    """The first route whose prefix covers `path`."""
    for route in routes:
        if route.matches(path):
            return route
    return None
