"""Prometheus metric definitions and the /metrics exposition (multiprocess-safe)."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# Metric objects are the one thing created at import (they are process-global by design).
HTTP_REQUESTS = Counter(
    "shopstack_http_requests_total",
    "HTTP requests answered, by route template and status.",
    ["service", "route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "shopstack_http_request_duration_seconds",
    "Time from request start to the end of the response body.",
    ["service", "route", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
HTTP_IN_FLIGHT = Gauge(
    "shopstack_http_requests_in_flight",
    "Requests being handled right now.",
    ["service"],
    multiprocess_mode="livesum",
)

METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST


def render_metrics() -> bytes:
    """Render every metric; aggregates all worker processes when multiprocess mode is on."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


class RequestStats:
    """Cheap per-request accounting for hot paths, folded into the Prometheus metrics.

    `record` costs a dict lookup and a few integer adds; `flush` (a background
    task calls it every second, and /metrics before rendering) moves the sums
    into HTTP_REQUESTS and HTTP_LATENCY, so the exposition is the same as the
    middleware's, without a Prometheus write on every request.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self._bounds = HTTP_LATENCY._upper_bounds  # includes +Inf
        # (route, method, status) -> [count, latency sum, per-bucket counts...]
        self._pending: dict[tuple[str, str, int], list[float]] = {}
        self.in_flight = 0

    def record(self, route: str, method: str, status: int, seconds: float) -> None:
        """Account one finished request."""
        key = (route, method, status)
        slot = self._pending.get(key)
        if slot is None:
            slot = self._pending[key] = [0.0] * (2 + len(self._bounds))
        slot[0] += 1
        slot[1] += seconds
        for i, bound in enumerate(self._bounds):
            if seconds <= bound:
                slot[2 + i] += 1
                break

    def flush(self) -> None:
        """Move what was recorded into the Prometheus metrics."""
        pending, self._pending = self._pending, {}
        for (route, method, status), slot in pending.items():
            HTTP_REQUESTS.labels(self.service, route, method, str(status)).inc(slot[0])
            child = HTTP_LATENCY.labels(self.service, route, method)
            # Bulk form of Histogram.observe: same (non-cumulative) bucket storage.
            child._sum.inc(slot[1])
            for i, count in enumerate(slot[2:]):
                if count:
                    child._buckets[i].inc(count)
        HTTP_IN_FLIGHT.labels(self.service).set(self.in_flight)
