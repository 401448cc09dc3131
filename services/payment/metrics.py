"""Payment metrics: breaker state, provider attempts and retries, outcomes, outbox, webhooks."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BREAKER_STATE = Gauge(
    "shopstack_payment_breaker_state",
    "Circuit breaker state per provider and worker: 0 closed, 1 half-open, 2 open.",
    ["provider"],
    multiprocess_mode="max",
)
BREAKER_TRANSITIONS = Counter(
    "shopstack_payment_breaker_transitions_total",
    "Circuit breaker state changes.",
    ["provider", "state"],
)
BREAKER_REJECTIONS = Counter(
    "shopstack_payment_breaker_rejections_total",
    "Calls refused without touching the provider because the breaker was open.",
    ["provider"],
)
PROVIDER_ATTEMPTS = Counter(
    "shopstack_payment_provider_attempts_total",
    "Provider calls made, by operation and outcome.",
    ["provider", "operation", "outcome"],
)
PROVIDER_LATENCY = Histogram(
    "shopstack_payment_provider_duration_seconds",
    "Time of one provider call attempt.",
    ["provider", "operation"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
RETRIES = Counter(
    "shopstack_payment_retries_total",
    "Provider call retries, by operation.",
    ["provider", "operation"],
)
RETRY_BUDGET_EXHAUSTED = Counter(
    "shopstack_payment_retry_budget_exhausted_total",
    "Retries skipped because the retry budget was spent.",
    ["provider", "operation"],
)
PAYMENT_OUTCOMES = Counter(
    "shopstack_payment_outcomes_total",
    "Payment state changes, by the status reached and what caused it.",
    ["status", "source"],
)
OUTBOX_DELIVERIES = Counter(
    "shopstack_payment_outbox_deliveries_total",
    "Outbox messages sent to the catalog, by kind and result.",
    ["kind", "result"],
)
WEBHOOKS = Counter(
    "shopstack_payment_webhooks_total",
    "Provider callbacks received, by result.",
    ["result"],
)
