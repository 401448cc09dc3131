"""The SLO gate: thresholds from YAML, every miss listed, a miss exits non-zero."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from loadtests.report import write_json
from loadtests.session import SCENARIO_NAMES
from loadtests.slo import SloFileError, evaluate, load_slo
from services.cli import main as shopstack

DEFAULT_SLO = Path(__file__).resolve().parents[2] / "loadtests" / "slo" / "default-2core.yaml"


def slo_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slo.yaml"
    path.write_text(text)
    return path


def test_shipped_default_slo_is_valid() -> None:
    slo = load_slo(DEFAULT_SLO)
    assert "product-detail" in slo.scenarios
    for limits in slo.scenarios.values():
        assert limits


def test_shipped_default_slo_names_every_scenario() -> None:
    assert set(SCENARIO_NAMES) <= set(load_slo(DEFAULT_SLO).scenarios)


def test_met_thresholds_give_no_miss(tmp_path: Path, sample_report: dict[str, Any]) -> None:
    rps = sample_report["scenarios"][0]["median"]["rps"]
    slo = load_slo(
        slo_file(
            tmp_path,
            f"""
scenarios:
  product-detail: {{min_rps: {rps * 0.9}, max_p99_ms: 50, max_error_rate: 0.001, max_rss_mb: 100,
                   min_ceiling_fraction: 0.8}}
  callbacks: {{min_rps: 100, max_rss_mb: {{gateway: 100, catalog: 100}}}}
  product-detail@open: {{max_p99_ms: 50}}
require_checks: [stock-invariant]
""",
        )
    )
    assert evaluate(slo, sample_report) == []


def test_each_miss_is_listed(tmp_path: Path, sample_report: dict[str, Any]) -> None:
    slo = load_slo(
        slo_file(
            tmp_path,
            """
scenarios:
  product-detail: {min_rps: 1000000, max_p99_ms: 0.5, max_rss_mb: {gateway: 10},
                   min_ceiling_fraction: 0.95}
  payment: {min_rps: 1}
  login: {min_rps: 1}
require_checks: [stock-invariant, no-double-charge]
""",
        )
    )
    misses = evaluate(slo, sample_report)
    text = "\n".join(misses)
    assert len(misses) == 7, text
    assert "product-detail: requests/s" in text
    assert "(limit >= 1e+06/s)" in text
    assert "product-detail: p99" in text
    assert "product-detail: × RSGI ceiling 0.911 (limit >= 0.95)" in text  # 27,321 of 30,000/s
    assert "product-detail: gateway RSS 62 MB (limit <= 10 MB)" in text
    assert "payment: not measured (skipped: endpoint not on this stack" in text
    assert "login: not measured (not in this run)" in text
    assert "audit check no-double-charge: not-available (required to pass)" in text


@pytest.mark.parametrize(
    "text",
    [
        "scenarios: [1, 2]",
        "scenarios:\n  product-detail: {min_rsp: 3}",
        "scenarios:\n  product-detail: {min_rps: fast}",
        "scenarios: {a: 1}",
        "require_checks: stock-invariant",
        "scenarios: {: [",
    ],
)
def test_malformed_slo_files_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(SloFileError):
        load_slo(slo_file(tmp_path, text))


def test_ceiling_fraction_needs_calibration(tmp_path: Path, sample_report: dict[str, Any]) -> None:
    sample_report["calibration"] = {}
    slo = load_slo(slo_file(tmp_path, "scenarios:\n  callbacks: {min_ceiling_fraction: 0.1}\n"))
    assert evaluate(slo, sample_report) == [
        "callbacks: × RSGI ceiling not measured (run with calibration)"
    ]


def test_check_command_exits_non_zero_listing_misses(
    tmp_path: Path, sample_report: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    report = write_json(sample_report, tmp_path / "report.json")
    strict = slo_file(tmp_path, "scenarios:\n  callbacks: {min_rps: 1000000, max_p99_ms: 0.1}\n")
    assert shopstack(["loadtest", "check", str(report), "--slo", str(strict)]) == 1
    out = capsys.readouterr().out
    assert "SLO miss: callbacks: requests/s" in out
    assert "SLO miss: callbacks: p99" in out
    assert "2 SLO miss(es)" in out

    lenient = tmp_path / "lenient.yaml"
    lenient.write_text("scenarios:\n  callbacks: {min_rps: 1, max_error_rate: 0.01}\n")
    assert shopstack(["loadtest", "check", str(report), "--slo", str(lenient)]) == 0
    assert "0 SLO miss(es)" in capsys.readouterr().out


def test_check_command_refuses_a_bad_slo_file(
    tmp_path: Path, sample_report: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    report = write_json(sample_report, tmp_path / "report.json")
    bad = slo_file(tmp_path, "scenarios:\n  callbacks: {max_latency: 3}\n")
    assert shopstack(["loadtest", "check", str(report), "--slo", str(bad)]) == 2
    assert "unknown thresholds" in capsys.readouterr().err
