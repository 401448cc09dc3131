"""Compare two reports: deltas per scenario, regressions only beyond the measured noise.

Noise of a metric = the larger run-to-run spread ((max - min) / median over the
repeats) of the two reports, never below a floor (default 5 %; 10 % for
memory). A change inside the noise is reported but not flagged.

CPU per request (`cpu_ms:<service>`, and `cpu_ms:services` for their sum) is
compared the same way, a rise being the regression: it stays put when a busy
neighbour only lowers requests/s, and moves when the code does more per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests import cpucost
from loadtests.report import load_json, scenarios_of
from loadtests.results import LOWER_IS_BETTER, SERVICES

COMPARED = ("rps", "avg_ms", "p99_ms", "p99.9_ms", "error_rate")
ERROR_RATE_STEP = 0.001  # an absolute rise of 0.1 percentage point is never noise
RSS_FLOOR = 0.10


@dataclass
class Delta:
    scenario: str
    metric: str
    old: float
    new: float
    noise: float
    verdict: str  # "regression" | "improvement" | "within noise"

    @property
    def change(self) -> float:
        if self.old == 0:
            return 0.0 if self.new == 0 else math.inf
        return (self.new - self.old) / abs(self.old)


def _verdict(metric: str, old: float, new: float, noise: float) -> str:
    if metric == "error_rate":
        if new - old > ERROR_RATE_STEP and new > old * (1 + noise):
            return "regression"
        if old - new > ERROR_RATE_STEP:
            return "improvement"
        return "within noise"
    if old == 0:
        return "within noise"
    change = (new - old) / abs(old)
    if metric in LOWER_IS_BETTER or metric.startswith(("rss:", "cpu_ms:")):
        change = -change  # from here on, positive means better
    worse, better = change < -noise, change > noise
    return "regression" if worse else "improvement" if better else "within noise"


def compare_reports(
    old: dict[str, Any], new: dict[str, Any], *, floor: float = 0.05
) -> list[Delta]:
    """Every comparable metric of every scenario measured in both reports."""
    before = {r.key: r for r in scenarios_of(old) if r.status == "ok"}
    deltas: list[Delta] = []
    for r in scenarios_of(new):
        o = before.get(r.key)
        if o is None or r.status != "ok":
            continue
        for metric in COMPARED:
            a, b = o.median.get(metric), r.median.get(metric)
            if a is None or b is None or math.isnan(a) or math.isnan(b):
                continue
            noise = max(floor, o.spread.get(metric, 0.0), r.spread.get(metric, 0.0))
            deltas.append(Delta(r.key, metric, a, b, noise, _verdict(metric, a, b, noise)))
        old_peaks, new_peaks = o.service_peaks(), r.service_peaks()
        for group in sorted(set(old_peaks) & set(new_peaks) - {"loadgen", "postgres", "redis"}):
            metric = f"rss:{group}"
            a, b = old_peaks[group], new_peaks[group]
            noise = max(RSS_FLOOR, floor)
            deltas.append(Delta(r.key, metric, a, b, noise, _verdict(metric, a, b, noise)))
        deltas += _cpu_deltas(
            r.key,
            cpucost.of(o, old.get("environment") or {}),
            cpucost.of(r, new.get("environment") or {}),
            floor,
        )
    return deltas


def _cpu_deltas(key: str, old: dict[str, Any], new: dict[str, Any], floor: float) -> list[Delta]:
    """CPU ms per successful request of each service and of their sum, where both measured it."""
    before = {**(old.get("groups") or {}), "services": old.get(cpucost.SERVICES_TOTAL)}
    after = {**(new.get("groups") or {}), "services": new.get(cpucost.SERVICES_TOTAL)}
    spread_keys = {"services": cpucost.SERVICES_TOTAL}
    deltas: list[Delta] = []
    for name in (*SERVICES, "services"):
        a, b = before.get(name), after.get(name)
        if a is None or b is None:
            continue
        spread = spread_keys.get(name, name)
        noise = max(
            floor,
            (old.get("spread") or {}).get(spread, 0.0),
            (new.get("spread") or {}).get(spread, 0.0),
        )
        metric = f"cpu_ms:{name}"
        deltas.append(Delta(key, metric, a, b, noise, _verdict(metric, a, b, noise)))
    return deltas


def render(deltas: list[Delta], old_name: str, new_name: str) -> str:
    lines = [
        f"compare {old_name} -> {new_name}",
        f"{'scenario':<24} {'metric':<18} {'old':>12} {'new':>12} {'change':>9} "
        f"{'noise':>7}  verdict",
    ]
    for d in deltas:
        change = "inf" if math.isinf(d.change) else f"{d.change:+.1%}"
        flag = "REGRESSION" if d.verdict == "regression" else d.verdict
        lines.append(
            f"{d.scenario:<24} {d.metric:<18} {d.old:>12,.4g} {d.new:>12,.4g} {change:>9} "
            f"{d.noise:>6.1%}  {flag}"
        )
    regressions = [d for d in deltas if d.verdict == "regression"]
    lines.append(
        f"{len(regressions)} regression(s) beyond noise"
        + (": " + ", ".join(f"{d.scenario} {d.metric}" for d in regressions) if regressions else "")
    )
    return "\n".join(lines)


def main(old_path: Path, new_path: Path, *, floor: float = 0.05) -> int:
    """Print the comparison; 1 when anything regressed beyond noise."""
    deltas = compare_reports(load_json(old_path), load_json(new_path), floor=floor)
    print(render(deltas, str(old_path), str(new_path)))
    if not deltas:
        print("nothing comparable: no scenario measured in both reports")
    return 1 if any(d.verdict == "regression" for d in deltas) else 0
