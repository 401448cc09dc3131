"""The report: one JSON document (the source of truth), rendered as Markdown and HTML."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtests import cpucost
from loadtests.results import GROUPS, SERVICES, ScenarioResult

SCHEMA_VERSION = 1
GENERATOR_FLOOR = 250  # the lowest rate calibrate.generator_ceiling tries


def write_json(report: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    return path


def load_json(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    if data.get("schema") != SCHEMA_VERSION:
        raise ValueError(f"{path}: not a shopstack load-test report (schema {SCHEMA_VERSION})")
    return data


def scenarios_of(report: dict[str, Any]) -> list[ScenarioResult]:
    return [ScenarioResult.from_dict(d) for d in report.get("scenarios", [])]


def _missing(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_ms(value: float | None) -> str:
    if _missing(value):
        return "–"
    assert value is not None
    if value < 1.0:
        return f"{value * 1000:.0f} µs"
    if value < 100.0:
        return f"{value:.2f} ms"
    return f"{value:,.0f} ms"


def fmt_num(value: float | None, digits: int = 1) -> str:
    return "–" if _missing(value) else f"{value:,.{digits}f}"


def fmt_pct(value: float | None, digits: int = 2) -> str:
    return "–" if _missing(value) else f"{100.0 * float(value or 0):.{digits}f} %"


def fmt_cpu_ms(value: float | None) -> str:
    """Three significant digits (0.0283, 0.412, 41.2, 152), at most four decimals."""
    if _missing(value):
        return "–"
    assert value is not None
    if value <= 0:
        return "0"
    shown = float(f"{value:.3g}")  # 0.09999 is 0.100, not 0.1000
    decimals = min(4, max(0, 2 - math.floor(math.log10(shown))))
    return f"{value:,.{decimals}f}"


def fraction_of_ceiling(
    result: ScenarioResult, calibration: dict[str, Any], interface: str
) -> float | None:
    ceiling = calibration.get("ceilings", {}).get(interface, {}).get(result.shape)
    rps = result.median.get("rps")
    if result.model != "closed" or not ceiling or rps is None:
        return None
    return float(rps) / float(ceiling)


def stack_memory_cpu(result: ScenarioResult) -> tuple[float | None, float | None]:
    """Peak RSS (MB) and mean CPU (% of one core) summed over the shopstack services."""
    peaks = result.service_peaks()
    cpu = result.service_cpu()
    services = [s for s in SERVICES if s in peaks]
    if not services:
        return None, None
    return sum(peaks[s] for s in services), sum(cpu.get(s, 0.0) for s in services)


def calibration_line(calibration: dict[str, Any]) -> str:
    if not calibration.get("ceilings"):
        return "Calibration: not run (--no-calibration)."
    parts = []
    for interface, shapes in calibration["ceilings"].items():
        listed = ", ".join(f"{key} {rps:,.0f}/s" for key, rps in shapes.items())
        parts.append(f"{interface.upper()}: {listed}")
    line = (
        f"Calibration (bare granian hello, same machine and CPUs, "
        f"{calibration.get('workers', 1)} worker(s)): " + "; ".join(parts) + "."
    )
    gen = calibration.get("generator") or {}
    if gen:

        def shown(mode: str) -> str:
            rps = float(gen[mode]["sustained_rps"])
            return f"{rps:,.0f}/s" if rps else f"less than {GENERATOR_FLOOR}/s"

        line += (
            f" The open-model generator kept to its schedule up to {shown('keepalive')} "
            f"keep-alive and {shown('close')} with a new connection per request "
            "(median send lag ≤ 2 ms, every reply received)."
        )
    return line


def _summary_table(results: list[ScenarioResult], calibration: dict[str, Any]) -> list[str]:
    lines = [
        "| Scenario | Model | Tool | Req/s | Avg | p50 | p90 | p99 | p99.9 | Errors | KB/s "
        "| Conn set-up | Conn reuse | × RSGI ceiling | × ASGI ceiling |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        if r.status != "ok":
            lines.append(
                f"| {r.name} | {r.model} | {r.tool} | {r.status}: {r.reason} |" + " |" * 11
            )
            continue
        m = r.median
        rsgi = fraction_of_ceiling(r, calibration, "rsgi")
        asgi = fraction_of_ceiling(r, calibration, "asgi")
        model = r.model if r.model == "closed" else f"open @ {r.extra.get('rate', 0):,.0f}/s"
        lines.append(
            f"| {r.name} | {model} | {r.tool} | {fmt_num(m.get('rps'))} "
            f"| {fmt_ms(m.get('avg_ms'))} "
            f"| {fmt_ms(m.get('p50_ms'))} | {fmt_ms(m.get('p90_ms'))} | {fmt_ms(m.get('p99_ms'))} "
            f"| {fmt_ms(m.get('p99.9_ms'))} | {fmt_pct(m.get('error_rate'))} "
            f"| {fmt_num(m.get('kb_per_s'))} | {fmt_ms(m.get('connect_ms'))} "
            f"| {fmt_pct(m.get('conn_reuse_rate'), 0)} "
            f"| {fmt_num(rsgi, 3) if rsgi is not None else '–'} "
            f"| {fmt_num(asgi, 3) if asgi is not None else '–'} |"
        )
    return lines


def _writeup_tables(results: list[ScenarioResult], cores: int) -> list[str]:
    """The write-up's four tables, with its columns, from the closed-loop medians."""
    by_name = {r.name: r for r in results if r.model == "closed"}
    opened = {r.name: r for r in results if r.model == "open" and r.status == "ok"}
    out: list[str] = []

    def mem_cpu(r: ScenarioResult) -> tuple[str, str]:
        mem, cpu = stack_memory_cpu(r)
        cpu_text = "–" if cpu is None else f"{cpu / max(cores, 1):.0f} % ({cpu:.0f} % of a core)"
        return ("–" if mem is None else f"{mem:.0f} MB"), cpu_text

    tables: list[tuple[str, str, list[str], Callable[[ScenarioResult], list[str]]]] = [
        (
            "product-detail",
            "Keep-alive, wrk: product detail",
            ["QPS", "Avg Latency", "P99 Latency", "Memory Usage", "CPU Usage"],
            lambda r: [
                fmt_num(r.median.get("rps"), 2),
                fmt_ms(r.median.get("avg_ms")),
                fmt_ms(r.median.get("p99_ms")),
                *mem_cpu(r),
            ],
        ),
        (
            "payment",
            "Short connections: payment requests (wrk: ab cannot vary the body)",
            ["QPS", "Avg Latency", "Error Rate", "Throughput", "Conn Setup Time"],
            lambda r: [
                fmt_num(r.median.get("rps"), 2),
                fmt_ms(r.median.get("avg_ms")),
                fmt_pct(r.median.get("error_rate"), 1),
                f"{fmt_num(r.median.get('kb_per_s'), 2)} KB/s",
                _connect(r, opened),
            ],
        ),
        (
            "login",
            "Short connections, wrk: login requests",
            ["QPS", "Avg Latency", "Conn Setup Time", "Memory Usage", "Error Rate"],
            lambda r: [
                fmt_num(r.median.get("rps"), 2),
                fmt_ms(r.median.get("avg_ms")),
                _connect(r, opened),
                mem_cpu(r)[0],
                fmt_pct(r.median.get("error_rate"), 1),
            ],
        ),
        (
            "callbacks",
            "Short connections, ab: payment callbacks",
            ["QPS", "Avg Latency", "Error Rate", "Throughput", "Conn Reuse Rate"],
            lambda r: [
                fmt_num(r.median.get("rps"), 2),
                fmt_ms(r.median.get("avg_ms")),
                fmt_pct(r.median.get("error_rate"), 1),
                f"{fmt_num(r.median.get('kb_per_s'), 2)} KB/s",
                fmt_pct(r.median.get("conn_reuse_rate"), 0),
            ],
        ),
    ]
    for n, (name, title, columns, row) in enumerate(tables, 1):
        out += [
            "",
            f"### {n}. {title}",
            "",
            "| " + " | ".join(columns) + " |",
            "|" + "--:|" * len(columns),
        ]
        r = by_name.get(name)
        if r is None or r.status != "ok":
            out.append(
                "| "
                + (f"{r.status}: {r.reason}" if r else "not run")
                + " |"
                + " |" * (len(columns) - 1)
            )
        else:
            out.append("| " + " | ".join(row(r)) + " |")
    return out


def _connect(r: ScenarioResult, opened: dict[str, ScenarioResult]) -> str:
    """wrk does not report connection set-up: take it from the open-model run of the scenario."""
    if r.median.get("connect_ms") is not None:
        return fmt_ms(r.median.get("connect_ms"))
    other = opened.get(r.name)
    if other is not None and other.median.get("connect_ms") is not None:
        return f"{fmt_ms(other.median.get('connect_ms'))} (open model)"
    return "–"


def _resources_table(results: list[ScenarioResult]) -> list[str]:
    present = [g for g in GROUPS if any(g in r.resources for r in results)]
    if not present:
        return ["", "No process was found to sample (is the stack on this machine?)."]
    lines = [
        "",
        "Peak RSS (MB) / mean CPU (% of one core) per process group, representative run:",
        "",
        "| Scenario | Model | " + " | ".join(present) + " |",
        "|---|---|" + "--:|" * len(present),
    ]
    for r in results:
        if r.status != "ok":
            continue
        peaks, cpu = r.service_peaks(), r.service_cpu()
        cells = [
            f"{peaks[g]:.0f} / {cpu.get(g, 0.0):.0f} %" if g in peaks else "–" for g in present
        ]
        lines.append(f"| {r.name} | {r.model} | " + " | ".join(cells) + " |")
    return lines


def _cpu_table(results: list[ScenarioResult], env: dict[str, Any]) -> list[str]:
    """ms of CPU per successful request per process group, and the service totals."""
    present = [g for g in GROUPS if any(g in r.resources for r in results)]
    if not present:
        return ["", "No process was found to sample (is the stack on this machine?)."]
    pinned = cpucost.pinned_services(env)
    totals = [("services", cpucost.SERVICES_TOTAL)]
    if pinned is not None:
        totals.append(("pinned services", cpucost.PINNED_TOTAL))
    lines = [
        "",
        "Milliseconds of CPU per successful request, representative run (its mean CPU ÷ "
        "its successful requests/s): steadier than requests/s on a shared machine; "
        "at N requests/s a group needs N × ms / 1000 cores.",
        "",
        "| Scenario | Model | OK req/s | "
        + " | ".join(present + [title for title, _ in totals])
        + " |",
        "|---|---|--:|" + "--:|" * (len(present) + len(totals)),
    ]
    for r in results:
        if r.status != "ok":
            continue
        cost = cpucost.of(r, env)
        groups = cost.get("groups") or {}
        cells = [fmt_num(cost.get("success_rps"))]
        cells += [fmt_cpu_ms(groups.get(g)) for g in present]
        cells += [fmt_cpu_ms(cost.get(key)) for _, key in totals]
        lines.append(f"| {r.name} | {r.model} | " + " | ".join(cells) + " |")
    lines += ["", f"services = {' + '.join(SERVICES)} (those sampled)."]
    if pinned is not None:
        lines[-1] += f" Pinned services = {' + '.join(pinned)}, which share the services' CPUs."
    else:
        lines[-1] += " Unpinned: no total over the services' CPUs."
    return lines


def _group_notes(env: dict[str, Any]) -> list[str]:
    groups = env.get("process_groups", {})
    lines = [
        f"- {name} (port {info.get('port')}, {info.get('processes')} processes): "
        + "; ".join(info.get("notes") or ["the listening process and its children"])
        for name, info in groups.items()
    ]
    lines.append("- loadgen: the wrk/ab/generator process of the run")
    return ["", *lines]


def render_markdown(report: dict[str, Any]) -> str:
    """The whole report as Markdown."""
    env = report["environment"]
    results = scenarios_of(report)
    calibration = report.get("calibration", {})
    audit = report.get("audit", {})
    slo = report.get("slo")
    opts = report["options"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    workers = ", ".join(f"{k} {v}" for k, v in env.get("workers", {}).items()) or "–"
    lines = [
        f"# shopstack load test — {report['started_at']}",
        "",
        f"**Verdict: {report['verdict'].upper()}**"
        + (f" — {report['verdict_reason']}" if report.get("verdict_reason") else ""),
        "",
        f"- Target: {env['target']} (commit {env.get('commit', '?')})",
        f"- Machine: {env['cpu_model']}, {env['cores']} cores ({env['cores_usable']} usable), "
        f"{env['memory_gb']} GB RAM, Linux {env['kernel']}; load average at start "
        f"{env['loadavg_at_start'][0]} (other work on the machine shows up as contention)",
        f"- Pinning: {env['pinning']}",
        f"- Workers per service: {workers}",
        f"- Versions: {versions}",
        f"- Run: warm-up {opts['warmup_s']:g} s, {opts['repeats']} × {opts['duration_s']:g} s "
        f"closed-loop repeats (median shown; spread = (max − min) / median in the JSON), "
        f"open model {opts['open_duration_s']:g} s; {report.get('elapsed_s', 0):.0f} s in all",
        "",
        calibration_line(calibration),
        "",
        "## Summary",
        "",
        *_summary_table(results, calibration),
        "",
        "Closed = wrk/ab (a client sends again only after a reply: latency hides queueing). "
        "Open = fixed arrival rate, latency from the intended send time.",
        "",
        "## The write-up's tables, measured here",
        *_writeup_tables(results, int(env.get("cores_usable") or 1)),
        "",
        "## Resources",
        *_resources_table(results),
        *_group_notes(env),
        "",
        "## CPU per request",
        *_cpu_table(results, env),
        "",
        "## Correctness audit: " + str(audit.get("status", "not run")).upper(),
        "",
        "| Check | Result | Detail |",
        "|---|---|---|",
        *[f"| {c['name']} | {c['status']} | {c['detail']} |" for c in audit.get("checks", [])],
    ]
    if slo is not None:
        lines += [
            "",
            f"## SLO gate ({slo['file']}): {'PASSED' if not slo['misses'] else 'MISSED'}",
            "",
        ]
        lines += [f"- {miss}" for miss in slo["misses"]] or ["- every threshold met"]
    notes = [(r.key, n) for r in results for n in r.notes]
    if notes or report.get("notes"):
        lines += ["", "## Notes", ""]
        lines += [f"- {n}" for n in report.get("notes", [])]
        lines += [f"- {key}: {n}" for key, n in notes]
    lines += ["", "## Commands", ""]
    for r in results:
        lines += [f"- {r.key}: `{c}`" for c in r.commands]
    return "\n".join(lines) + "\n"
