"""A scenario's outcome over its repeats: medians, run-to-run spread, resources, notes."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from loadtests.measurement import Measurement
from loadtests.runners import Run

Model = Literal["closed", "open"]
RunStatus = Literal["ok", "skipped", "error"]

# Median figures of a scenario; the spread of each is recorded for `compare`.
METRICS: tuple[str, ...] = (
    "rps",
    "avg_ms",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "p99.9_ms",
    "error_rate",
    "kb_per_s",
    "connect_ms",
    "conn_reuse_rate",
)
LOWER_IS_BETTER = {"avg_ms", "p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "error_rate", "connect_ms"}

# The sampled process groups: the stack's services, its data servers and the load generator.
SERVICES = ("gateway", "catalog", "payment", "stats", "psp_sandbox")
PROVIDER = "psp_sandbox"  # outside the stack in production: placed by CpuPlan.provider
GROUPS = (*SERVICES, "postgres", "redis", "loadgen")


def figures(m: Measurement) -> dict[str, float | None]:
    lat = m.latency_ms
    return {
        "rps": m.rps,
        "avg_ms": lat.get("avg"),
        "p50_ms": lat.get("p50"),
        "p90_ms": lat.get("p90"),
        "p99_ms": lat.get("p99"),
        "p99.9_ms": lat.get("p99.9"),
        "error_rate": m.error_rate,
        "kb_per_s": m.kb_per_s,
        "connect_ms": m.connect_ms,
        "conn_reuse_rate": m.conn_reuse_rate,
    }


def clean(values: list[float | None]) -> list[float]:
    """The values that were measured (no None, no NaN)."""
    return [v for v in values if v is not None and not math.isnan(v)]


def run_spread(values: list[float]) -> float | None:
    """(max - min) / |median| over the repeats; None with fewer than two values."""
    if len(values) < 2:
        return None
    middle = statistics.median(values)
    if middle:
        return (max(values) - min(values)) / abs(middle)
    return 0.0 if max(values) == min(values) else 1.0


def representative_index(rps: list[float]) -> int:
    """The repeat whose timeline and resources the report shows: the median by requests/s."""
    ranked = sorted(range(len(rps)), key=lambda i: rps[i])
    return ranked[len(ranked) // 2]


@dataclass
class ScenarioResult:
    """One scenario in one model (closed: wrk/ab; open: fixed arrival rate)."""

    name: str
    title: str
    model: Model
    tool: str
    shape: str  # the calibration shape with the same connections and keep-alive
    status: RunStatus = "ok"
    reason: str = ""
    commands: list[str] = field(default_factory=list)
    repeats: list[dict[str, Any]] = field(default_factory=list)
    median: dict[str, float | None] = field(default_factory=dict)
    spread: dict[str, float] = field(default_factory=dict)
    requests: int = 0
    errors: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    marks: dict[str, int] = field(default_factory=dict)
    timeline: list[list[float]] = field(default_factory=list)
    resources: dict[str, Any] = field(default_factory=dict)
    ceiling: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_ms_per_request: dict[str, Any] = field(default_factory=dict)  # cpucost.compute()

    @property
    def key(self) -> str:
        return self.name if self.model == "closed" else f"{self.name}@open"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "key": self.key}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScenarioResult:
        return cls(**{k: v for k, v in data.items() if k != "key"})

    def add_runs(self, runs: list[Run]) -> ScenarioResult:
        """Record repeats; medians, spread and the median run's timeline and resources."""
        if not runs:
            return self
        self.commands = sorted({r.command for r in runs})
        self.repeats = [{**r.measurement.to_dict(), "resources": r.resources} for r in runs]
        per_run = [figures(r.measurement) for r in runs]
        for metric in METRICS:
            values = clean([f[metric] for f in per_run])
            self.median[metric] = statistics.median(values) if values else None
            spread = run_spread(values)
            if spread is not None:
                self.spread[metric] = spread
        middle = runs[representative_index([r.measurement.rps for r in runs])]
        self.timeline = middle.measurement.timeline
        self.resources = middle.resources
        self.requests = sum(r.measurement.requests for r in runs)
        self.errors = sum(r.measurement.errors for r in runs)
        for run in runs:
            for status, n in run.measurement.statuses.items():
                self.statuses[status] = self.statuses.get(status, 0) + n
            for mark, n in run.measurement.marks.items():
                self.marks[mark] = self.marks.get(mark, 0) + n
            for kind, n in run.measurement.socket_errors.items():
                if n:
                    self.statuses[f"socket:{kind}"] = self.statuses.get(f"socket:{kind}", 0) + n
        return self

    def representative(self) -> dict[str, Any] | None:
        """The repeat (measurement and resources) the median figures' resources come from."""
        if not self.repeats:
            return None
        return self.repeats[representative_index([float(r["rps"]) for r in self.repeats])]

    def service_peaks(self) -> dict[str, float]:
        """Peak RSS (MB) per sampled group during the representative run."""
        return {
            name: float(info["rss_mb_max"])
            for name, info in self.resources.items()
            if isinstance(info, dict) and "rss_mb_max" in info
        }

    def service_cpu(self) -> dict[str, float]:
        return {
            name: float(info["cpu_pct_mean"])
            for name, info in self.resources.items()
            if isinstance(info, dict) and "cpu_pct_mean" in info
        }
