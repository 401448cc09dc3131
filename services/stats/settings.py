"""Stats settings (SHOPSTACK_STATS_* for its own knobs)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import CommonSettings, Environment


class StatsSettings(CommonSettings):
    service_name: ClassVar[str] = "stats"

    # Redis names. Tests give each run its own so they never share a stream.
    stats_stream: str = Field(default="stats:events", min_length=1, max_length=200)
    stats_group: str = Field(default="stats-writers", min_length=1, max_length=200)
    stats_dead_letter_stream: str = Field(default="stats:events:dead", min_length=1, max_length=200)
    stats_key_prefix: str = Field(default="stats:agg", min_length=1, max_length=200)

    # Admission: refuse (503 overloaded) rather than let more than this many accepted
    # events wait unacknowledged (this bounds the Redis memory of the backlog)...
    stats_max_backlog: int = Field(default=500_000, ge=1000, le=100_000_000)
    # ...and while the oldest unacknowledged entry is older than this (0: no lag budget).
    stats_max_lag_s: float = Field(default=10.0, ge=0, le=3600)
    stats_retry_after_s: int = Field(default=2, ge=1, le=300)

    # Accepted event timestamps: at most this far in the future / in the past.
    stats_max_future_s: int = Field(default=300, ge=0, le=86_400)
    stats_max_age_s: int = Field(default=7 * 86_400, ge=60, le=365 * 86_400)

    # Writer: one per worker process, in one consumer group.
    stats_writer_enabled: bool = True
    # Consumers per process, each with its own Postgres connection, so one batch's
    # round trips overlap another's.
    stats_consumers_per_process: int = Field(default=4, ge=1, le=16)
    stats_batch_size: int = Field(default=500, ge=1, le=5000)
    stats_flush_interval_s: float = Field(default=1.0, gt=0, le=60)
    stats_claim_min_idle_s: float = Field(default=30.0, ge=0.1, le=3600)
    stats_max_deliveries: int = Field(default=5, ge=1, le=100)
    stats_maintenance_interval_s: float = Field(default=1.0, ge=0.05, le=60)
    stats_shutdown_drain_s: float = Field(default=3.0, ge=0, le=60)
    stats_consumer_reap_idle_s: float = Field(default=300.0, ge=10, le=86_400)
    stats_retry_backoff_max_s: float = Field(default=5.0, ge=0.05, le=300)

    # Aggregates: windows up to this many seconds are exact to the second (1 s tier);
    # longer ones use whole minutes at their old edge (see docs/stats.md).
    stats_fine_window_s: int = Field(default=120, ge=60, le=900)
    stats_top_cache_s: int = Field(default=1, ge=0, le=60)

    # Test-only fault hooks (refused in prod): the writer fails every write that holds
    # an event of this user, or sleeps this long before each batch write.
    stats_fault_poison_user_id: str | None = None
    stats_fault_write_delay_s: float = Field(default=0.0, ge=0, le=60)

    @model_validator(mode="after")
    def _check_stats(self) -> StatsSettings:
        faults = self.stats_fault_poison_user_id is not None or self.stats_fault_write_delay_s > 0
        if faults and self.env is Environment.PROD:
            raise ValueError("stats fault hooks are for tests and refused in prod")
        if self.stats_dead_letter_stream == self.stats_stream:
            raise ValueError("the dead-letter stream must differ from the event stream")
        return self
