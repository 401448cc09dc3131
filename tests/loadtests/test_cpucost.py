"""CPU per request: ms of CPU per successful request per process group, its table, compare, SLO.

The report here has round figures, so every expected value is worked out by hand:
mean CPU (% of one core) / 100 / successful requests/s × 1000.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from loadtests import cpucost
from loadtests.compare import compare_reports
from loadtests.html import render_html
from loadtests.measurement import Measurement
from loadtests.report import render_markdown, scenarios_of, write_json
from loadtests.results import ScenarioResult
from loadtests.runners import Run
from loadtests.slo import SloFileError, evaluate, load_slo
from loadtests.tools import CpuPlan
from services.cli import main as shopstack
from tests.loadtests.conftest import build_report

AUTO = CpuPlan(generator=(1,), services=(0,))
INSIDE = CpuPlan(generator=(1,), services=(0,), provider_outside=False)
UNPINNED = CpuPlan(notes=["--pin none"])

# The representative (median) repeat: 1,000 req/s of which 5 % answered 500, so 950
# successful requests/s; each group's CPU is chosen for a round figure per request.
REPRESENTATIVE_CPU = {
    "gateway": 95.0,  # 0.95 cores / 950 per s = 1.0 ms
    "catalog": 47.5,  # 0.5 ms
    "payment": 9.5,  # 0.1 ms
    "psp_sandbox": 19.0,  # 0.2 ms
    "postgres": 38.0,  # 0.4 ms
    "redis": None,  # found but no sample in the window
    "loadgen": 28.5,  # 0.3 ms
}
EXPECTED_MS = {
    "gateway": 1.0,
    "catalog": 0.5,
    "payment": 0.1,
    "psp_sandbox": 0.2,
    "postgres": 0.4,
    "redis": None,
    "loadgen": 0.3,
}


def window(cpu: dict[str, float | None]) -> dict[str, Any]:
    """Sampler.window() for one run: a group with no row has no summary figures."""
    out: dict[str, Any] = {}
    for group, pct in cpu.items():
        if pct is None:
            out[group] = {"series": []}
        else:
            out[group] = {
                "rss_mb_max": 50.0,
                "rss_mb_mean": 50.0,
                "cpu_pct_mean": pct,
                "cpu_pct_max": pct,
                "series": [[0.0, 50.0, pct]],
            }
    return out


def run(rps: float, ok: int, failed: int, cpu: dict[str, float | None]) -> Run:
    """A 10-second run: `ok` 200s and `failed` 500s, at `rps` requests/s."""
    statuses = {"200": ok, "500": failed} if failed else {"200": ok}
    m = Measurement(
        tool="wrk",
        duration_s=10.0,
        requests=ok + failed,
        rps=rps,
        latency_ms={"avg": 5.0, "p50": 4.0, "p90": 8.0, "p99": 12.0, "p99.9": 20.0},
        statuses=statuses,
    ).classify([200])
    return Run(m, "wrk ...", window(cpu))


def cpu_for(ok_rps: float, gateway_busier: float) -> dict[str, float | None]:
    """The representative's ms per request at another rate; the gateway `gateway_busier` x."""
    factor = ok_rps / 950.0
    cpu = {g: None if v is None else v * factor for g, v in REPRESENTATIVE_CPU.items()}
    cpu["gateway"] = 95.0 * factor * gateway_busier
    return cpu


def cost_report(
    plan: CpuPlan = AUTO, gateway_busier: float = 1.0, recorded_plan: bool = True
) -> dict[str, Any]:
    """payment closed (three repeats), payment open (one run), login closed at 0 req/s."""
    closed = ScenarioResult("payment", "Payment", "closed", "wrk", "wrk-close-POST-c16")
    fast = cpu_for(1100.0, gateway_busier)
    fast["gateway"] = 121.0 * gateway_busier  # 1.1 ms there: the gateway's spread is 10 %
    closed.add_runs(
        [
            run(1100.0, 11000, 0, fast),
            run(900.0, 9000, 0, cpu_for(900.0, gateway_busier)),
            run(1000.0, 9500, 500, cpu_for(950.0, gateway_busier)),  # the representative
        ]
    )
    opened = ScenarioResult("payment", "Payment", "open", "openloop", "wrk-close-POST-c16")
    opened.add_runs([run(500.0, 5000, 0, {"gateway": 50.0, "catalog": 25.0})])
    opened.extra["rate"] = 500.0
    idle = ScenarioResult("login", "Login", "closed", "wrk", "wrk-close-POST-c8")
    idle.add_runs([run(0.0, 0, 0, {"gateway": 3.0})])
    report = build_report()
    env = report["environment"]
    env["pinning"] = plan.describe()
    if recorded_plan:
        env["cpu_plan"] = plan.to_dict()
    else:
        env.pop("cpu_plan", None)  # a report written before the plan was recorded
    results = [closed, opened, idle]
    report["scenarios"] = [r.to_dict() for r in cpucost.annotate(results, env)]
    return report


def scenario(report: dict[str, Any], key: str) -> dict[str, Any]:
    return next(s for s in report["scenarios"] if s["key"] == key)


def test_figures_of_the_representative_run_are_exact() -> None:
    cost = scenario(cost_report(), "payment")["cpu_ms_per_request"]
    assert cost["success_rps"] == pytest.approx(950.0, rel=1e-12)  # 1,000/s less 5 % of 500s
    assert set(cost["groups"]) == set(EXPECTED_MS)
    for group, ms in EXPECTED_MS.items():
        assert cost["groups"][group] == (None if ms is None else pytest.approx(ms, rel=1e-12))
    # services = gateway + catalog + payment + psp_sandbox (stats was not found)
    assert cost["services_total"] == pytest.approx(1.8, rel=1e-12)
    # auto pinning: the provider sandbox runs beside the generator, not on the services' CPU
    assert cost["pinned_services"] == ["gateway", "catalog", "payment", "stats"]
    assert cost["pinned_total"] == pytest.approx(1.6, rel=1e-12)


def test_spread_over_the_repeats_is_recorded() -> None:
    spread = scenario(cost_report(), "payment")["cpu_ms_per_request"]["spread"]
    assert spread["gateway"] == pytest.approx(0.1, rel=1e-9)  # 1.0, 1.0, 1.1 ms
    assert spread["catalog"] == pytest.approx(0.0, abs=1e-12)
    assert spread["services_total"] == pytest.approx(0.1 / 1.8, rel=1e-9)  # 1.8, 1.8, 1.9
    assert spread["pinned_total"] == pytest.approx(0.1 / 1.6, rel=1e-9)
    assert "redis" not in spread
    assert scenario(cost_report(), "payment@open")["cpu_ms_per_request"]["spread"] == {}


def test_open_model_run_has_its_own_figures() -> None:
    cost = scenario(cost_report(), "payment@open")["cpu_ms_per_request"]
    assert cost["success_rps"] == pytest.approx(500.0)
    assert cost["groups"] == {"gateway": pytest.approx(1.0), "catalog": pytest.approx(0.5)}
    assert cost["services_total"] == pytest.approx(1.5)


def test_no_successful_request_or_no_sample_gives_null_not_zero() -> None:
    report = cost_report()
    idle = scenario(report, "login")["cpu_ms_per_request"]
    assert idle["success_rps"] is None
    assert idle["groups"] == {"gateway": None}
    assert idle["services_total"] is None
    assert idle["pinned_total"] is None

    every_error = ScenarioResult("login", "Login", "closed", "wrk", "wrk-close-POST-c8")
    every_error.add_runs([run(100.0, 0, 1000, {"gateway": 30.0})])
    cost = cpucost.compute(every_error, report["environment"])
    assert cost["success_rps"] is None
    assert cost["groups"] == {"gateway": None}

    nothing_sampled = ScenarioResult("login", "Login", "closed", "wrk", "wrk-close-POST-c8")
    nothing_sampled.add_runs([run(100.0, 1000, 0, {"gateway": None})])
    cost = cpucost.compute(nothing_sampled, report["environment"])
    assert cost["success_rps"] == pytest.approx(100.0)
    assert cost["groups"] == {"gateway": None}
    assert cost["services_total"] is None

    skipped = ScenarioResult("payment", "Payment", "closed", "wrk", "wrk-close-POST-c16")
    skipped.status = "skipped"
    assert cpucost.compute(skipped, report["environment"])["success_rps"] is None


@pytest.mark.parametrize(
    ("plan", "pinned"),
    [
        (AUTO, ("gateway", "catalog", "payment", "stats")),
        (INSIDE, ("gateway", "catalog", "payment", "stats", "psp_sandbox")),
        (UNPINNED, None),
    ],
)
def test_pinned_services_from_the_plan_and_from_an_older_reports_pinning_line(
    plan: CpuPlan, pinned: tuple[str, ...] | None
) -> None:
    assert cpucost.pinned_services({"pinning": plan.describe(), "cpu_plan": plan.to_dict()}) == (
        pinned
    )
    assert cpucost.pinned_services({"pinning": plan.describe()}) == pinned


def test_unpinned_run_has_no_pinned_total() -> None:
    cost = scenario(cost_report(UNPINNED), "payment")["cpu_ms_per_request"]
    assert cost["pinned_services"] is None
    assert cost["pinned_total"] is None
    assert cost["services_total"] == pytest.approx(1.8)


def test_report_written_before_the_figure_existed_gets_it_computed() -> None:
    old = cost_report(INSIDE, recorded_plan=False)
    for s in old["scenarios"]:
        del s["cpu_ms_per_request"]
    env = old["environment"]
    [payment, *_] = scenarios_of(old)
    assert payment.cpu_ms_per_request == {}
    cost = cpucost.of(payment, env)
    assert cost["groups"]["gateway"] == pytest.approx(1.0)
    assert cost["pinned_total"] == pytest.approx(1.8)  # provider inside: all five services
    assert cost == scenario(cost_report(INSIDE), "payment")["cpu_ms_per_request"]


def test_markdown_table_next_to_resources() -> None:
    md = render_markdown(cost_report())
    assert md.index("## Resources") < md.index("## CPU per request") < md.index("## Correctness")
    section = md[md.index("## CPU per request") : md.index("## Correctness")]
    assert "at N requests/s a group needs N × ms / 1000 cores" in section
    assert (
        "| Scenario | Model | OK req/s | gateway | catalog | payment | psp_sandbox | postgres "
        "| redis | loadgen | services | pinned services |"
    ) in section
    assert (
        "| payment | closed | 950.0 | 1.00 | 0.500 | 0.100 | 0.200 | 0.400 | – | 0.300 "
        "| 1.80 | 1.60 |"
    ) in section
    assert "| payment | open | 500.0 | 1.00 | 0.500 | – | – | – | – | – | 1.50 | 1.50 |" in section
    assert "| login | closed | – | – | – | – | – | – | – | – | – | – |" in section
    assert "Pinned services = gateway + catalog + payment + stats" in section


def test_markdown_table_without_pinning_has_no_pinned_column() -> None:
    section = render_markdown(cost_report(UNPINNED)).split("## CPU per request")[1]
    assert "| services |\n" in section
    assert "pinned services |" not in section
    assert "Unpinned: no total over the services' CPUs." in section


def test_html_renders_the_table_like_the_resources_table() -> None:
    page = render_html(cost_report())
    assert "<h2>Resources</h2>" in page
    assert "<h2>CPU per request</h2>" in page
    assert "<th>OK req/s</th>" in page
    assert "<tr><td>payment</td><td>closed</td><td>950.0</td><td>1.00</td><td>0.500</td>" in page


def cpu_verdicts(old: dict[str, Any], new: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {
        (d.scenario, d.metric): d.verdict
        for d in compare_reports(old, new)
        if d.metric.startswith("cpu_ms:")
    }


def test_compare_flags_a_cpu_per_request_rise_beyond_noise() -> None:
    # gateway noise = its 10 % spread over the repeats; 20 % more CPU per request is beyond it
    found = cpu_verdicts(cost_report(), cost_report(gateway_busier=1.2))
    assert found[("payment", "cpu_ms:gateway")] == "regression"
    assert found[("payment", "cpu_ms:catalog")] == "within noise"
    assert found[("payment", "cpu_ms:services")] == "regression"  # 1.8 -> 2.0 ms, spread 6 %
    assert found[("payment@open", "cpu_ms:gateway")] == "within noise"  # unchanged
    assert ("payment", "cpu_ms:postgres") not in found  # shared servers are not gated
    assert ("payment", "cpu_ms:loadgen") not in found
    assert ("login", "cpu_ms:gateway") not in found  # null: nothing to compare
    back = cpu_verdicts(cost_report(gateway_busier=1.2), cost_report())
    assert back[("payment", "cpu_ms:gateway")] == "improvement"
    assert "regression" not in back.values()


def test_compare_keeps_a_cpu_per_request_change_within_noise() -> None:
    # 8 % more: beyond the 5 % floor, inside the gateway's 10 % spread over the repeats
    found = cpu_verdicts(cost_report(), cost_report(gateway_busier=1.08))
    assert found[("payment", "cpu_ms:gateway")] == "within noise"
    assert found[("payment", "cpu_ms:services")] == "within noise"  # 1.8 -> 1.88 ms
    # the open model has one run, so the floor is the noise: 8 % there is a regression
    busier = cost_report()
    scenario(busier, "payment@open")["cpu_ms_per_request"]["groups"]["gateway"] *= 1.08
    found = cpu_verdicts(cost_report(), busier)
    assert found[("payment@open", "cpu_ms:gateway")] == "regression"


def test_compare_sees_a_regression_the_machines_load_hid_in_rps() -> None:
    # The new run had the machine to itself: 50 % more requests/s, but more CPU per request.
    old = cost_report()
    new = copy.deepcopy(old)
    payment = scenario(new, "payment")
    payment["median"]["rps"] *= 1.5
    payment["cpu_ms_per_request"]["groups"]["gateway"] = 1.25
    found = {(d.scenario, d.metric): d for d in compare_reports(old, new)}
    assert found[("payment", "rps")].verdict == "improvement"
    gateway = found[("payment", "cpu_ms:gateway")]
    assert (gateway.old, gateway.new) == (pytest.approx(1.0), 1.25)
    assert gateway.noise == pytest.approx(0.1)
    assert gateway.verdict == "regression"


def test_compare_command_lists_cpu_per_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = write_json(cost_report(), tmp_path / "old.json")
    new = write_json(cost_report(gateway_busier=1.5), tmp_path / "new.json")
    assert shopstack(["loadtest", "compare", str(old), str(new)]) == 1
    out = capsys.readouterr().out
    assert "cpu_ms:gateway" in out
    assert "+50.0%" in out
    assert "payment cpu_ms:gateway" in out.splitlines()[-1]


def slo_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "slo.yaml"
    path.write_text(text)
    return path


def test_slo_max_cpu_ms_per_request(tmp_path: Path) -> None:
    report = cost_report()
    met = slo_file(
        tmp_path,
        "scenarios:\n"
        "  payment: {max_cpu_ms_per_request: 1.05}\n"
        "  payment@open: {max_cpu_ms_per_request: {gateway: 1.1, catalog: 0.5}}\n",
    )
    assert evaluate(load_slo(met), report) == []
    missed = slo_file(
        tmp_path,
        "scenarios:\n"
        "  payment: {max_cpu_ms_per_request: 0.45}\n"
        "  payment@open: {max_cpu_ms_per_request: {gateway: 0.9, stats: 1, catalog: 0.6}}\n"
        "  login: {max_cpu_ms_per_request: 5}\n",
    )
    assert evaluate(load_slo(missed), report) == [
        "payment: gateway CPU per request 1 ms (limit <= 0.45 ms)",
        "payment: catalog CPU per request 0.5 ms (limit <= 0.45 ms)",
        "payment@open: gateway CPU per request 1 ms (limit <= 0.9 ms)",
        "payment@open: stats CPU per request not measured (CPU not sampled)",
        "login: CPU per request not measured (no successful request)",
    ]


def test_slo_cpu_threshold_must_be_numbers(tmp_path: Path) -> None:
    with pytest.raises(SloFileError, match="max_cpu_ms_per_request must be a number"):
        load_slo(slo_file(tmp_path, "scenarios:\n  payment: {max_cpu_ms_per_request: low}\n"))
    with pytest.raises(SloFileError):
        load_slo(
            slo_file(tmp_path, "scenarios:\n  payment: {max_cpu_ms_per_request: {gateway: x}}\n")
        )
