"""`shopstack loadtest` refuses clearly when it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests import tools
from services.cli import main as shopstack
from tests.support.servers import free_port


def test_unreachable_stack_says_how_to_start_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"http://127.0.0.1:{free_port()}"
    assert shopstack(["loadtest", "--target", target, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not reachable" in err
    assert "make run" in err
    assert not any(tmp_path.iterdir())


def test_missing_tools_name_the_apt_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing is found on this PATH
    with pytest.raises(tools.ToolMissing) as caught:
        tools.require("wrk", "ab")
    assert "apt-get install -y wrk" in str(caught.value)
    assert "apt-get install -y apache2-utils" in str(caught.value)
    assert shopstack(["loadtest", "--target", "http://127.0.0.1:1"]) == 2
    assert "apt-get install -y wrk" in capsys.readouterr().err


def test_bad_slo_file_fails_before_any_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slo = tmp_path / "slo.yaml"
    slo.write_text("scenarios:\n  login: {min_qps: 3}\n")
    assert shopstack(["loadtest", "--slo", str(slo), "--target", "http://127.0.0.1:1"]) == 2
    assert "unknown thresholds" in capsys.readouterr().err


def test_unknown_scenario_is_refused() -> None:
    with pytest.raises(SystemExit):
        shopstack(["loadtest", "--scenarios", "checkout"])
