"""Run one load shape with wrk, ab or the open-model generator, pinned, while sampling."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from loadtests.measurement import Measurement
from loadtests.parsers import ParseError, parse_ab_with_gnuplot, parse_wrk
from loadtests.processes import ProcessGroup
from loadtests.sampler import Sampler
from loadtests.tools import CpuPlan

AB_MAX_REQUESTS = 500_000  # ab sizes its per-request table from -n (48 B each)
REQUEST_TIMEOUT_S = 10


class LoadToolFailed(RuntimeError):
    """wrk/ab/the generator exited badly or printed no report."""


@dataclass
class Run:
    """A finished run: what was measured, the command, and the resource samples of its window."""

    measurement: Measurement
    command: str
    resources: dict[str, Any] = field(default_factory=dict)


def lua_script(name: str, workdir: Path) -> Path:
    """scripts/common.lua + scripts/<name>.lua as one file (wrk loads a single script)."""
    scripts = resources.files("loadtests") / "scripts"
    text = (scripts / "common.lua").read_text() + "\n" + (scripts / f"{name}.lua").read_text()
    path = workdir / f"{name}.lua"
    path.write_text(text)
    return path


def _execute(
    cmd: list[str], *, timeout_s: float, sampler: Sampler | None
) -> tuple[str, str, dict[str, Any]]:
    start = sampler.now() if sampler else 0.0
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if sampler is not None:
        sampler.add(ProcessGroup("loadgen", [proc.pid], notes=[cmd[0]]))
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise LoadToolFailed(f"timed out after {timeout_s:.0f} s: {shlex.join(cmd)}") from None
    finally:
        if sampler is not None:
            sampler.remove("loadgen")
    window = sampler.window(start, sampler.now()) if sampler else {}
    if proc.returncode != 0:
        raise LoadToolFailed(f"exit {proc.returncode}: {shlex.join(cmd)}\n{err or out}")
    return out, err, window


def run_wrk(
    *,
    base_url: str,
    script: Path,
    script_args: list[str],
    connections: int,
    duration_s: float,
    close: bool,
    plan: CpuPlan,
    sampler: Sampler | None = None,
) -> Run:
    """wrk with a scenario script; `close` adds `Connection: close` (a new connection each)."""
    threads = min(plan.generator_threads, connections)
    cmd = [
        *plan.prefix(),
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",  # wrk takes whole seconds
        f"--timeout={REQUEST_TIMEOUT_S}s",
        "--latency",
        "-s",
        str(script),
    ]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd += [base_url.rstrip("/") + "/", "--", *script_args, str(threads)]
    out, err, window = _execute(cmd, timeout_s=duration_s + 30, sampler=sampler)
    try:
        measurement = parse_wrk(out, keepalive=not close)
    except ParseError as exc:
        raise LoadToolFailed(f"{exc}: {shlex.join(cmd)}\n{out}\n{err}") from None
    return Run(measurement, shlex.join(cmd), window)


def run_ab(
    *,
    url: str,
    body: Path,
    content_type: str,
    headers: dict[str, str],
    connections: int,
    duration_s: float,
    keepalive: bool,
    plan: CpuPlan,
    workdir: Path,
    sampler: Sampler | None = None,
) -> Run:
    """ab POSTing one body for `duration_s` (-l: replies may differ in length)."""
    gnuplot = workdir / "ab.gnuplot.tsv"
    cmd = [
        *plan.prefix(),
        "ab",
        "-t",
        f"{max(1, round(duration_s))}",
        "-n",
        str(AB_MAX_REQUESTS),
        "-c",
        str(connections),
        "-s",
        str(REQUEST_TIMEOUT_S),
        "-l",
        "-r",
        "-q",
        "-g",
        str(gnuplot),
        "-p",
        str(body),
        "-T",
        content_type,
    ]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    if keepalive:
        cmd.append("-k")
    cmd.append(url)
    out, err, window = _execute(cmd, timeout_s=duration_s + REQUEST_TIMEOUT_S + 30, sampler=sampler)
    try:
        measurement = parse_ab_with_gnuplot(out, gnuplot)
    except ParseError as exc:
        raise LoadToolFailed(f"{exc}: {shlex.join(cmd)}\n{out}\n{err}") from None
    gnuplot.unlink(missing_ok=True)
    return Run(measurement, shlex.join(cmd), window)


def run_openloop(
    *, spec: dict[str, Any], plan: CpuPlan, workdir: Path, sampler: Sampler | None = None
) -> Run:
    """The open-model generator (loadtests/openloop.py) at spec["rate"] requests/s."""
    spec_path = workdir / "openloop-spec.json"
    out_path = workdir / "openloop-result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    cmd = [
        *plan.prefix(),
        sys.executable,
        "-m",
        "loadtests.openloop",
        str(spec_path),
        str(out_path),
    ]
    _, _, window = _execute(
        cmd, timeout_s=float(spec["duration_s"]) + REQUEST_TIMEOUT_S + 30, sampler=sampler
    )
    if not out_path.exists():
        raise LoadToolFailed(f"the open-model generator wrote no result: {shlex.join(cmd)}")
    measurement = Measurement.from_dict(
        {**json.loads(out_path.read_text()), "errors": 0, "error_rate": 0.0}
    )
    shown = (
        f"{shlex.join(cmd)}  # rate {spec['rate']:g}/s for {spec['duration_s']:g} s, "
        f"{'Connection: close' if spec.get('close') else 'keep-alive'}"
    )
    return Run(measurement, shown, window)
