"""The SLO gate: per-scenario thresholds from YAML; every miss is listed and fails the run.

    scenarios:
      product-detail:            # closed loop (wrk/ab); "product-detail@open" = open model
        min_rps: 400
        max_p99_ms: 150
        max_error_rate: 0.001
        max_rss_mb: 160          # every service process group; or {gateway: 120, ...}
        max_cpu_ms_per_request: {gateway: 0.05}  # CPU ms per successful request; or one number
        min_ceiling_fraction: 0.5  # requests/s over the same shape's RSGI hello, same run
    require_checks: [stock-invariant, no-double-charge]   # audit checks that must have passed

A scenario named in the file that was skipped or failed is a miss: the gate
cannot vouch for what it did not measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loadtests import cpucost
from loadtests.report import fraction_of_ceiling, scenarios_of
from loadtests.results import SERVICES

# threshold -> (what it is called, median metric, comparison, unit)
THRESHOLDS: dict[str, tuple[str, str, str, str]] = {
    "min_rps": ("requests/s", "rps", ">=", "/s"),
    "max_p99_ms": ("p99", "p99_ms", "<=", " ms"),
    "max_p999_ms": ("p99.9", "p99.9_ms", "<=", " ms"),
    "max_avg_ms": ("avg latency", "avg_ms", "<=", " ms"),
    "max_error_rate": ("error rate", "error_rate", "<=", ""),
}
PER_GROUP = {"max_rss_mb", "max_cpu_ms_per_request"}  # a number for every service, or a mapping
KNOWN_KEYS = {*THRESHOLDS, *PER_GROUP, "min_ceiling_fraction"}


class SloFileError(ValueError):
    """The SLO file is malformed (unknown keys, wrong types)."""


@dataclass
class Slo:
    path: str
    scenarios: dict[str, dict[str, Any]] = field(default_factory=dict)
    require_checks: list[str] = field(default_factory=list)


def load_slo(path: Path) -> Slo:
    """Read and validate an SLO file."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SloFileError(f"{path}: not YAML: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("scenarios", {}), dict):
        raise SloFileError(f"{path}: expected a mapping with a 'scenarios' mapping")
    scenarios: dict[str, dict[str, Any]] = {}
    for name, limits in (data.get("scenarios") or {}).items():
        if not isinstance(limits, dict):
            raise SloFileError(f"{path}: scenario {name!r} must map thresholds to values")
        unknown = set(limits) - KNOWN_KEYS
        if unknown:
            raise SloFileError(f"{path}: {name}: unknown thresholds {sorted(unknown)}")
        for key, value in limits.items():
            ok = isinstance(value, int | float) or (
                key in PER_GROUP
                and isinstance(value, dict)
                and all(isinstance(v, int | float) for v in value.values())
            )
            if not ok:
                raise SloFileError(f"{path}: {name}.{key} must be a number")
        scenarios[str(name)] = limits
    checks = data.get("require_checks") or []
    if not isinstance(checks, list):
        raise SloFileError(f"{path}: require_checks must be a list")
    return Slo(str(path), scenarios, [str(c) for c in checks])


def evaluate(slo: Slo, report: dict[str, Any]) -> list[str]:
    """Each threshold the report misses, as a sentence; empty when all are met."""
    misses: list[str] = []
    results = {r.key: r for r in scenarios_of(report)}
    for key, limits in slo.scenarios.items():
        r = results.get(key)
        if r is None:
            misses.append(f"{key}: not measured (not in this run)")
            continue
        if r.status != "ok":
            misses.append(f"{key}: not measured ({r.status}: {r.reason})")
            continue
        for threshold, (what, metric, op, unit) in THRESHOLDS.items():
            if threshold not in limits:
                continue
            raw = r.median.get(metric)
            got = float("nan") if raw is None else float(raw)
            limit = float(limits[threshold])
            met = got >= limit if op == ">=" else got <= limit
            if not met:  # NaN never meets a threshold
                misses.append(f"{key}: {what} {got:,.4g}{unit} (limit {op} {limit:,.4g}{unit})")
        if "max_rss_mb" in limits:
            misses += _rss_misses(key, limits["max_rss_mb"], r.service_peaks())
        if "max_cpu_ms_per_request" in limits:
            cost = cpucost.of(r, report.get("environment") or {})
            misses += _cpu_misses(key, limits["max_cpu_ms_per_request"], cost)
        if "min_ceiling_fraction" in limits:
            limit = float(limits["min_ceiling_fraction"])
            fraction = fraction_of_ceiling(r, report.get("calibration") or {}, "rsgi")
            if fraction is None:
                misses.append(f"{key}: × RSGI ceiling not measured (run with calibration)")
            elif fraction < limit:
                misses.append(f"{key}: × RSGI ceiling {fraction:.3f} (limit >= {limit:g})")
    audit = {c["name"]: c for c in report.get("audit", {}).get("checks", [])}
    for name in slo.require_checks:
        check = audit.get(name)
        if check is None or check["status"] != "passed":
            status = "absent" if check is None else check["status"]
            misses.append(f"audit check {name}: {status} (required to pass)")
    return misses


def _rss_misses(key: str, limit: Any, peaks: dict[str, float]) -> list[str]:
    limits = {s: float(limit) for s in SERVICES} if not isinstance(limit, dict) else limit
    out = []
    for service, cap in limits.items():
        peak = peaks.get(service)
        if peak is not None and peak > float(cap):
            out.append(f"{key}: {service} RSS {peak:,.0f} MB (limit <= {float(cap):,.0f} MB)")
    return out


def _cpu_misses(key: str, limit: Any, cost: dict[str, Any]) -> list[str]:
    """A group named in the mapping must have been measured; a bare number covers the services."""
    groups: dict[str, float | None] = cost.get("groups") or {}
    named = isinstance(limit, dict)
    limits = (
        {str(g): float(v) for g, v in limit.items()}
        if named
        else {s: float(limit) for s in SERVICES if s in groups}
    )
    if cost.get("success_rps") is None:
        return [f"{key}: CPU per request not measured (no successful request)"]
    if not named and all(groups.get(s) is None for s in limits):
        return [f"{key}: CPU per request not measured (no service's CPU was sampled)"]
    out = []
    for group, cap in limits.items():
        ms = groups.get(group)
        if ms is None:
            if named:
                out.append(f"{key}: {group} CPU per request not measured (CPU not sampled)")
        elif ms > cap:
            out.append(f"{key}: {group} CPU per request {ms:,.3g} ms (limit <= {cap:,.3g} ms)")
    return out
