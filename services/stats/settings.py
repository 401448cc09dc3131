"""Stats settings (SHOPSTACK_STATS_* for its own knobs; docs/stats.md explains them)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import CommonSettings, Environment


class StatsSettings(CommonSettings):
    service_name: ClassVar[str] = "stats"

    # Redis names. Tests give each run its own so they never share a stream.
    stats_stream: str = Field(
        default="stats:events", min_length=1, max_length=200, description="the event stream"
    )
    stats_group: str = Field(
        default="stats-writers",
        min_length=1,
        max_length=200,
        description="the writers' consumer group",
    )
    stats_dead_letter_stream: str = Field(
        default="stats:events:dead",
        min_length=1,
        max_length=200,
        description="where events that keep failing go, with their error",
    )
    stats_dead_letter_max: int = Field(
        default=100_000,
        ge=100,
        le=10_000_000,
        description="dead letters kept (the oldest are trimmed past this; "
        "shopstack_stats_dead_lettered_total still counts them all)",
    )
    stats_key_prefix: str = Field(
        default="stats:agg", min_length=1, max_length=200, description="prefix of aggregate keys"
    )

    # Admission: refuse (503 overloaded) rather than let the backlog grow past a budget.
    stats_max_backlog: int = Field(
        default=500_000,
        ge=1000,
        le=100_000_000,
        description="events accepted and not yet acknowledged before new batches get 503",
    )
    stats_max_lag_s: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="age of the oldest unacknowledged entry before new batches get 503 (0: off)",
    )
    stats_retry_after_s: int = Field(
        default=2, ge=1, le=300, description="Retry-After of those 503 answers"
    )

    stats_max_future_s: int = Field(
        default=300, ge=0, le=86_400, description="an event's ts may be at most this far ahead"
    )
    stats_max_age_s: int = Field(
        default=7 * 86_400, ge=60, le=365 * 86_400, description="an event's ts may be this old"
    )

    # Writer: a thread per worker process, running several consumers of one group.
    stats_writer_enabled: bool = Field(default=True, description="run a writer in this process")
    stats_consumers_per_process: int = Field(
        default=4,
        ge=1,
        le=16,
        description="consumers (each with a Postgres connection) in a process's writer",
    )
    # 2000 rather than 500: measured ~2 µs less Postgres and ~1 µs less Redis CPU per event
    # (fewer transactions, each aggregate key touched once for more events); lag p99 ~0.2 s.
    stats_batch_size: int = Field(
        default=2000, ge=1, le=5000, description="a batch is written when it holds this many events"
    )
    stats_flush_interval_s: float = Field(
        default=1.0, gt=0, le=60, description="...or this long after its first entry was read"
    )
    stats_claim_min_idle_s: float = Field(
        default=30.0,
        ge=0.1,
        le=3600,
        description="entries pending this long are reclaimed (XAUTOCLAIM) by any writer",
    )
    stats_max_deliveries: int = Field(
        default=5, ge=1, le=100, description="deliveries before failing events are dead-lettered"
    )
    stats_maintenance_interval_s: float = Field(
        default=1.0,
        ge=0.05,
        le=60,
        description="how often the writer trims history, updates gauges and the lag",
    )
    stats_shutdown_drain_s: float = Field(
        default=3.0, ge=0, le=60, description="on shutdown, keep writing the stream this long"
    )
    stats_consumer_reap_idle_s: float = Field(
        default=300.0,
        ge=10,
        le=86_400,
        description="consumers idle this long that own nothing are forgotten",
    )
    stats_retry_backoff_max_s: float = Field(
        default=5.0, ge=0.05, le=300, description="cap of the backoff between transient failures"
    )

    # Aggregates.
    stats_fine_window_s: int = Field(
        default=120,
        ge=60,
        le=900,
        description="windows up to this are exact to the second; longer use whole minutes",
    )
    stats_top_cache_s: int = Field(
        default=1, ge=0, le=60, description="a top query's union is reused this long (0: never)"
    )

    # Test-only fault hooks (refused in prod).
    stats_fault_poison_user_id: str | None = Field(
        default=None,
        description="TEST ONLY: every write holding an event of this user fails (SHD-5)",
    )
    stats_fault_write_delay_s: float = Field(
        default=0.0,
        ge=0,
        le=60,
        description="TEST ONLY: sleep before each batch write (a slow database)",
    )

    @model_validator(mode="after")
    def _check_stats(self) -> StatsSettings:
        faults = self.stats_fault_poison_user_id is not None or self.stats_fault_write_delay_s > 0
        if faults and self.env is Environment.PROD:
            raise ValueError("stats fault hooks are for tests and refused in prod")
        if self.stats_dead_letter_stream == self.stats_stream:
            raise ValueError("the dead-letter stream must differ from the event stream")
        return self
