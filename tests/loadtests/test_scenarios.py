"""The scenario registry: names, order and load shapes the CLI, calibration and SLOs rely on."""

from __future__ import annotations

from pathlib import Path

from loadtests.scenarios import SCENARIOS
from loadtests.session import SCENARIO_NAMES, Options, Session
from loadtests.tools import CpuPlan


def session(tmp_path: Path) -> Session:
    return Session(Options(), CpuPlan(), tmp_path, {})


def test_registry_and_cli_names_agree() -> None:
    assert tuple(SCENARIOS) == SCENARIO_NAMES
    names = list(SCENARIOS)
    assert names.index("payment-status") == names.index("payment") + 1


def test_payment_status_is_the_payment_shape_but_for_the_method(tmp_path: Path) -> None:
    s = session(tmp_path)
    status, payment = SCENARIOS["payment-status"], SCENARIOS["payment"]
    assert status.shape(s).key == "wrk-close-GET-c16"
    assert payment.shape(s).key == "wrk-close-POST-c16"
    assert status.expected == (200,)  # a 404 is someone else's payment: an error


def test_default_run_calibrates_every_scenario_shape(tmp_path: Path) -> None:
    """The CLI calibrates the shapes of the chosen scenarios; payment-status is in the default
    set, so its close GET shape gets its own hello ceiling."""
    s = session(tmp_path)
    assert "payment-status" in s.options.scenarios
    shapes = {SCENARIOS[n].shape(s).key for n in s.options.scenarios}
    assert "wrk-close-GET-c16" in shapes


def test_connections_option_changes_the_shape(tmp_path: Path) -> None:
    s = Session(Options(connections={"payment-status": 4}), CpuPlan(), tmp_path, {})
    assert SCENARIOS["payment-status"].shape(s).key == "wrk-close-GET-c4"
