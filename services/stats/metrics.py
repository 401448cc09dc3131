"""Prometheus metrics of the stats service (the HTTP ones live in services.common.metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_ACCEPTED = Counter(
    "shopstack_stats_events_accepted_total", "Events accepted (202) and appended to the stream."
)
BATCHES_REFUSED = Counter(
    "shopstack_stats_batches_refused_total",
    "Event batches refused, by reason (invalid, overloaded, unavailable).",
    ["reason"],
)
EVENTS_STORED = Counter(
    "shopstack_stats_events_stored_total",
    "Events written by the writer, by outcome (inserted, duplicate).",
    ["outcome"],
)
EVENTS_TOO_OLD = Counter(
    "shopstack_stats_events_unaggregated_total",
    "Stored events too old for any window, so kept in Postgres only.",
)
WRITE_FAILURES = Counter(
    "shopstack_stats_write_failures_total",
    "Failed batch writes, by kind (transient: retried; permanent: isolated).",
    ["kind"],
)
DEAD_LETTERED = Counter(
    "shopstack_stats_dead_lettered_total", "Entries moved to the dead-letter stream."
)
BATCH_SIZE = Histogram(
    "shopstack_stats_write_batch_events",
    "Events per batch written to Postgres.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
)
FLUSH_LATENCY = Histogram(
    "shopstack_stats_flush_duration_seconds",
    "Time to write one batch: COPY, insert, commit, ack and count.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
STREAM_LENGTH = Gauge(
    "shopstack_stats_stream_length",
    "Entries (accepted batches) in the event stream, unacknowledged plus not yet trimmed.",
    multiprocess_mode="livemax",
)
BACKLOG_EVENTS = Gauge(
    "shopstack_stats_backlog_events",
    "Events accepted and not yet acknowledged (the budget SHOPSTACK_STATS_MAX_BACKLOG caps).",
    multiprocess_mode="livemax",
)
PENDING = Gauge(
    "shopstack_stats_pending_entries",
    "Entries delivered to a writer and not yet acknowledged.",
    multiprocess_mode="livemax",
)
UNDELIVERED = Gauge(
    "shopstack_stats_undelivered_entries",
    "Entries not yet delivered to any writer.",
    multiprocess_mode="livemax",
)
CONSUMER_LAG = Gauge(
    "shopstack_stats_consumer_lag_seconds",
    "Age of the oldest entry not yet acknowledged (pending or undelivered).",
    multiprocess_mode="livemax",
)
DEAD_LETTER_LENGTH = Gauge(
    "shopstack_stats_dead_letter_length",
    "Entries in the dead-letter stream.",
    multiprocess_mode="livemax",
)
