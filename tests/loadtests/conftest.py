"""Reports built from measurements parsed out of real captured wrk/ab output."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from loadtests.measurement import Measurement
from loadtests.parsers import parse_ab_with_gnuplot, parse_wrk
from loadtests.report import SCHEMA_VERSION
from loadtests.results import ScenarioResult
from loadtests.runners import Run

DATA = Path(__file__).parent / "data"


def resources(base_rss: float) -> dict[str, Any]:
    """A sampled window: three rows per group ([t, RSS MB, CPU %])."""
    out: dict[str, Any] = {}
    for n, group in enumerate(("gateway", "catalog", "postgres", "redis", "loadgen")):
        rows = [[t * 0.5, base_rss + n * 10 + t, 20.0 + 10 * t] for t in range(3)]
        out[group] = {
            "rss_mb_max": max(r[1] for r in rows),
            "rss_mb_mean": sum(r[1] for r in rows) / 3,
            "cpu_pct_mean": sum(r[2] for r in rows) / 3,
            "cpu_pct_max": max(r[2] for r in rows),
            "series": rows,
        }
    return out


def scaled(m: Measurement, factor: float) -> Measurement:
    """A repeat of `m` with throughput scaled by `factor` (latency inversely)."""
    out = Measurement.from_dict(copy.deepcopy(m.to_dict()))
    out.rps *= factor
    out.latency_ms = {k: v / factor for k, v in out.latency_ms.items()}
    return out


def build_report(
    factors: tuple[float, ...] = (0.98, 1.0, 1.02), rss: float = 60.0
) -> dict[str, Any]:
    """product-detail (wrk, closed + open) and callbacks (ab) from the captured outputs."""
    wrk = parse_wrk((DATA / "wrk_script_json.txt").read_text(), keepalive=True).classify([200])
    ab = parse_ab_with_gnuplot(
        (DATA / "ab_close.txt").read_text(), DATA / "ab_close.gnuplot.tsv"
    ).classify([200])
    product = ScenarioResult(
        "product-detail", "Product detail", "closed", "wrk", "wrk-keepalive-GET-c16"
    )
    product.add_runs([Run(scaled(wrk, f), "wrk ...", resources(rss)) for f in factors])
    opened = ScenarioResult(
        "product-detail", "Product detail", "open", "openloop", "wrk-keepalive-GET-c16"
    )
    opened.add_runs([Run(scaled(wrk, 0.6), "openloop ...", resources(rss))])
    opened.extra["rate"] = 0.6 * wrk.rps
    callbacks = ScenarioResult("callbacks", "Callbacks", "closed", "ab", "ab-close-POST-c8")
    callbacks.add_runs([Run(scaled(ab, f), "ab ...", resources(rss)) for f in factors])
    skipped = ScenarioResult("payment", "Payment", "closed", "wrk", "wrk-close-POST-c16")
    skipped.status, skipped.reason = (
        "skipped",
        "endpoint not on this stack: /api/v1/orders answered 404",
    )
    return {
        "schema": SCHEMA_VERSION,
        "started_at": "2026-11-26 10:00:00 UTC",
        "elapsed_s": 42.0,
        "options": {"duration_s": 2, "warmup_s": 0, "repeats": len(factors), "open_duration_s": 2},
        "environment": {
            "target": "http://127.0.0.1:8000",
            "cpu_model": "AMD EPYC",
            "cores": 2,
            "cores_usable": 2,
            "memory_gb": 23.5,
            "kernel": "6",
            "loadavg_at_start": [1.0, 1.0],
            "pinning": "load generator on CPU 1, services on CPU 0 (taskset)",
            "versions": {"granian": "2.8.7"},
            "workers": {"gateway": 1, "catalog": 1},
            "process_groups": {"gateway": {"processes": 2, "port": 8000, "notes": []}},
        },
        "calibration": {
            "workers": 1,
            "ceilings": {
                "rsgi": {"wrk-keepalive-GET-c16": 30000.0, "ab-close-POST-c8": 9000.0},
                "asgi": {"wrk-keepalive-GET-c16": 15000.0, "ab-close-POST-c8": 5000.0},
            },
            "generator": {
                "keepalive": {"sustained_rps": 8000.0, "tried": []},
                "close": {"sustained_rps": 4000.0, "tried": []},
            },
        },
        "scenarios": [r.to_dict() for r in (product, opened, callbacks, skipped)],
        "audit": {
            "status": "passed",
            "checks": [
                {"name": "stock-invariant", "status": "passed", "detail": "ok", "data": {}},
                {
                    "name": "no-double-charge",
                    "status": "not-available",
                    "detail": "no table",
                    "data": {},
                },
            ],
        },
        "notes": [],
        "slo": None,
        "verdict": "passed",
        "verdict_reason": "",
    }


@pytest.fixture
def sample_report() -> dict[str, Any]:
    return build_report()
