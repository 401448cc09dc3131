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
