"""One measured run of one load shape, whatever tool produced it."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

PERCENTILES: tuple[str, ...] = ("p50", "p90", "p99", "p99.9")


@dataclass
class Measurement:
    """Requests, latency, errors and throughput of one run (latencies in ms)."""

    tool: str
    duration_s: float
    requests: int
    rps: float
    latency_ms: dict[str, float]
    statuses: dict[str, int] = field(default_factory=dict)
    socket_errors: dict[str, int] = field(default_factory=dict)
    kb_per_s: float = 0.0
    connect_ms: float | None = None
    conn_reuse_rate: float | None = None
    timeline: list[list[float]] = field(default_factory=list)  # [second offset, completions]
    marks: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    errors: int = 0
    error_rate: float = 0.0
    unexpected: dict[str, int] = field(default_factory=dict)

    def classify(self, expected: Iterable[int]) -> Measurement:
        """Count as errors every socket error and every status not in `expected`."""
        ok = {str(s) for s in expected}
        if any(200 <= s < 300 for s in expected):
            ok |= {"2xx", "2xx/3xx"}  # ab and plain wrk only tell 2xx from the rest
        self.unexpected = {s: n for s, n in self.statuses.items() if s not in ok and n}
        sock = sum(self.socket_errors.values())
        self.errors = sock + sum(self.unexpected.values())
        attempts = max(self.requests + sock, 1)
        self.error_rate = self.errors / attempts
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        return cls(**data)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, nearest-rank."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def latency_summary(values_ms: Sequence[float]) -> dict[str, float]:
    """avg, p50, p90, p99, p99.9 and max of raw latencies."""
    ordered = sorted(values_ms)
    if not ordered:
        return {k: math.nan for k in ("avg", *PERCENTILES, "max")}
    out = {"avg": sum(ordered) / len(ordered)}
    for name in PERCENTILES:
        out[name] = percentile(ordered, float(name[1:]))
    out["max"] = ordered[-1]
    return out


def timeline_from_stamps(stamps: Iterable[float], origin: float) -> list[list[float]]:
    """Completions per whole second since `origin`, as [offset, count] rows, gaps as 0."""
    counts: dict[int, int] = {}
    for stamp in stamps:
        second = int(stamp - origin)
        counts[second] = counts.get(second, 0) + 1
    if not counts:
        return []
    return [[float(s), float(counts.get(s, 0))] for s in range(min(counts), max(counts) + 1)]
