"""compare: deltas per scenario, regressions flagged only beyond the measured noise."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.compare import compare_reports
from loadtests.report import write_json
from services.cli import main as shopstack
from tests.loadtests.conftest import build_report


def verdicts(old: dict[str, object], new: dict[str, object]) -> dict[tuple[str, str], str]:
    return {(d.scenario, d.metric): d.verdict for d in compare_reports(old, new)}  # type: ignore[arg-type]


def test_same_run_twice_has_no_regression() -> None:
    found = verdicts(build_report(), build_report())
    assert found
    assert set(found.values()) == {"within noise"}


def test_spread_of_repeats_is_recorded_and_used_as_noise() -> None:
    noisy = build_report(factors=(0.8, 1.0, 1.2))
    product = noisy["scenarios"][0]
    assert product["spread"]["rps"] == pytest.approx(0.4)
    # 10 % slower: beyond a quiet baseline's 5 % floor, inside a noisy one's 40 %.
    slower = build_report(factors=(0.88, 0.9, 0.92))
    assert verdicts(build_report(factors=(1.0, 1.0, 1.0)), slower)[("product-detail", "rps")] == (
        "regression"
    )
    assert verdicts(noisy, slower)[("product-detail", "rps")] == "within noise"


def test_latency_and_memory_regressions_and_improvements() -> None:
    old = build_report(factors=(1.0, 1.0, 1.0))
    slower = build_report(factors=(0.5, 0.5, 0.5), rss=90.0)
    found = verdicts(old, slower)
    assert found[("product-detail", "p99_ms")] == "regression"
    assert found[("callbacks", "avg_ms")] == "regression"
    assert found[("product-detail", "rss:gateway")] == "regression"
    assert ("product-detail", "rss:postgres") not in found  # shared servers are not gated
    back = verdicts(slower, old)
    assert back[("product-detail", "rps")] == "improvement"
    assert "regression" not in back.values()


def test_error_rate_rise_is_a_regression() -> None:
    old, new = build_report(), build_report()
    new["scenarios"][2]["median"]["error_rate"] = 0.02
    assert verdicts(old, new)[("callbacks", "error_rate")] == "regression"


def test_compare_command_prints_deltas_and_exits_1_on_regression(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = write_json(build_report(factors=(1.0, 1.0, 1.0)), tmp_path / "old.json")
    new = write_json(build_report(factors=(0.7, 0.7, 0.7)), tmp_path / "new.json")
    assert shopstack(["loadtest", "compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "product-detail" in out
    assert "-30.0%" in out
    assert "REGRESSION" in out
    assert "regression(s) beyond noise" in out
    assert shopstack(["loadtest", "compare", str(old), str(old)]) == 0
    assert "0 regression(s) beyond noise" in capsys.readouterr().out


def test_compare_refuses_a_file_that_is_not_a_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bogus = tmp_path / "x.json"
    bogus.write_text('{"hello": 1}')
    assert shopstack(["loadtest", "compare", str(bogus), str(bogus)]) == 2
    assert "not a shopstack load-test report" in capsys.readouterr().err
