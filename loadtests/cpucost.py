"""CPU per request: the milliseconds of CPU each process group spends per successful request.

On a shared machine requests/s swings with the neighbours' load, while the CPU a
service spends on one request stays much steadier: it is the figure to follow
where a scenario's cost goes, and to size with (at N requests/s a group needs
N × ms / 1000 cores). It comes from the representative (median) run, the one
whose resources the report shows:

    ms per request = mean CPU (% of one core) / 100 / successful requests/s × 1000

None (null in the JSON), never 0, when no request succeeded or the group's CPU
was not sampled. The spread over the closed-loop repeats, (max - min) / median
as for the other figures, is what `compare` takes as the noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from loadtests.results import PROVIDER, SERVICES, ScenarioResult, clean, run_spread

SERVICES_TOTAL = "services_total"  # every service of the stack
PINNED_TOTAL = "pinned_total"  # the services that share the services' CPUs
# What CpuPlan.describe() wrote in reports made before the environment recorded cpu_plan.
LINE_PROVIDER_OUTSIDE = "load generator and the provider sandbox on CPU"
LINE_PROVIDER_INSIDE = "load generator on CPU"


def success_rps(measurement: Mapping[str, Any]) -> float | None:
    """Successful requests/s of one run: its requests/s less the share answered with an error."""
    rps = float(measurement.get("rps") or 0.0)
    requests = int(measurement.get("requests") or 0)
    failed = sum(int(n) for n in (measurement.get("unexpected") or {}).values())
    if math.isnan(rps) or rps <= 0 or requests <= 0 or failed >= requests:
        return None
    return rps * (requests - failed) / requests


def pinned_services(env: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The services the run pinned to the services' CPUs; None when unpinned or not stated."""
    plan = env.get("cpu_plan")
    if isinstance(plan, Mapping):
        if not plan.get("services"):
            return None
        outside = bool(plan.get("provider_outside", True))
    else:
        line = str(env.get("pinning", ""))
        if line.startswith(LINE_PROVIDER_OUTSIDE):
            outside = True
        elif line.startswith(LINE_PROVIDER_INSIDE):
            outside = False
        else:
            return None
    return tuple(s for s in SERVICES if not (outside and s == PROVIDER))


def _cpu(resources: Mapping[str, Any]) -> dict[str, float | None]:
    """Mean CPU (% of one core) per sampled group; None for a group with no sample."""
    out: dict[str, float | None] = {}
    for name, info in resources.items():
        if isinstance(info, Mapping):
            value = info.get("cpu_pct_mean")
            out[name] = None if value is None else float(value)
    return out


def _total(figures: Mapping[str, float | None], groups: Iterable[str]) -> float | None:
    measured = [v for g in groups if (v := figures.get(g)) is not None]
    return sum(measured) if measured else None


def _per_request(
    resources: Mapping[str, Any], ok_rps: float | None, pinned: tuple[str, ...] | None
) -> dict[str, float | None]:
    """ms per successful request of each group, and the two service totals."""
    figures: dict[str, float | None] = {
        group: None if ok_rps is None or cpu is None else cpu / 100.0 / ok_rps * 1000.0
        for group, cpu in _cpu(resources).items()
    }
    figures[SERVICES_TOTAL] = _total(figures, SERVICES)
    figures[PINNED_TOTAL] = None if pinned is None else _total(figures, pinned)
    return figures


def compute(result: ScenarioResult, env: Mapping[str, Any]) -> dict[str, Any]:
    """The CPU-per-request block of one scenario run, as report.json stores it."""
    pinned = pinned_services(env)
    chosen = result.representative()
    ok_rps = success_rps(chosen) if chosen is not None else None
    figures = _per_request(result.resources, ok_rps, pinned)  # the representative run's
    per_repeat = [
        _per_request(run.get("resources") or {}, success_rps(run), pinned) for run in result.repeats
    ]
    spread: dict[str, float] = {}
    for key in figures:
        value = run_spread(clean([f.get(key) for f in per_repeat]))
        if value is not None:
            spread[key] = value
    return {
        "success_rps": ok_rps,
        "groups": {k: v for k, v in figures.items() if k not in (SERVICES_TOTAL, PINNED_TOTAL)},
        SERVICES_TOTAL: figures[SERVICES_TOTAL],
        "pinned_services": None if pinned is None else list(pinned),
        PINNED_TOTAL: figures[PINNED_TOTAL],
        "spread": spread,
    }


def annotate(results: list[ScenarioResult], env: Mapping[str, Any]) -> list[ScenarioResult]:
    """Store each result's CPU-per-request block (before the report is written)."""
    for result in results:
        result.cpu_ms_per_request = compute(result, env)
    return results


def of(result: ScenarioResult, env: Mapping[str, Any]) -> dict[str, Any]:
    """The stored block, or one computed now for a report written before it was stored."""
    return result.cpu_ms_per_request or compute(result, env)
