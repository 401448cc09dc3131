"""Read what wrk and ab print (and ab's per-request gnuplot file) into Measurements.

wrk's text report lacks p99.9, status codes and a time series, so the scenario
scripts print one `LOADTEST_JSON {...}` line from done(); the text report is
parsed too and used alone when that line is absent (a plain wrk run).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from loadtests.measurement import Measurement, latency_summary, timeline_from_stamps

_TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_SIZE_UNITS = {"B": 1.0, "KB": 1024.0, "MB": 1024.0**2, "GB": 1024.0**3, "TB": 1024.0**4}


class ParseError(ValueError):
    """The tool's output is not what the parser expects (the tool failed or changed)."""


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ParseError(f"not a wrk duration: {text!r}")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]


def _bytes(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(B|KB|MB|GB|TB)", text.strip())
    if not match:
        raise ParseError(f"not a wrk size: {text!r}")
    return float(match.group(1)) * _SIZE_UNITS[match.group(2)]


def _search(pattern: str, text: str, what: str) -> re.Match[str]:
    match = re.search(pattern, text, re.MULTILINE)
    if not match:
        raise ParseError(f"wrk/ab output has no {what}")
    return match


def parse_wrk_text(output: str) -> Measurement:
    """wrk's own report: requests, duration, latency (avg, distribution), errors, transfer."""
    total = _search(r"^\s*(\d+) requests in ([\d.]+\w+), ([\d.]+\w+) read", output, "totals")
    requests = int(total.group(1))
    duration_s = _ms(total.group(2)) / 1000.0
    read_bytes = _bytes(total.group(3))
    lat = _search(r"^\s*Latency\s+([\d.]+\w+)\s+([\d.]+\w+)\s+([\d.]+\w+)", output, "latency")
    latency = {"avg": _ms(lat.group(1)), "max": _ms(lat.group(3))}
    for pct, value in re.findall(r"^\s*([\d.]+)%\s+([\d.]+\w+)\s*$", output, re.MULTILINE):
        latency[f"p{float(pct):g}"] = _ms(value)
    socket_errors: dict[str, int] = {}
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        for name, value in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            socket_errors[name] = int(value)
    statuses: dict[str, int] = {}
    non_ok = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_ok:
        statuses["non-2xx/3xx"] = int(non_ok.group(1))
    statuses["2xx/3xx"] = requests - statuses.get("non-2xx/3xx", 0)
    rps = float(_search(r"^Requests/sec:\s+([\d.]+)", output, "Requests/sec").group(1))
    transfer = _bytes(_search(r"^Transfer/sec:\s+([\d.]+\w+)", output, "Transfer/sec").group(1))
    return Measurement(
        tool="wrk",
        duration_s=duration_s,
        requests=requests,
        rps=rps,
        latency_ms=latency,
        statuses=statuses,
        socket_errors=socket_errors,
        kb_per_s=transfer / 1024.0,
        extra={"bytes": read_bytes},
    )


def wrk_json(output: str) -> dict[str, Any] | None:
    """The LOADTEST_JSON line printed by scripts/common.lua, if any."""
    for line in output.splitlines():
        if line.startswith("LOADTEST_JSON "):
            data: dict[str, Any] = json.loads(line[len("LOADTEST_JSON ") :])
            return data
    return None


def parse_wrk(output: str, *, keepalive: bool) -> Measurement:
    """wrk with a scenario script: the JSON summary, completed by the text report."""
    text = parse_wrk_text(output)
    data = wrk_json(output)
    if data is None:
        return text
    lat = data["latency_us"]
    pct = lat["percentiles"]
    duration_s = float(data["duration_us"]) / 1e6
    requests = int(data["requests"])
    latency = {"avg": float(lat["mean"]) / 1000.0, "max": float(lat["max"]) / 1000.0}
    for q in ("50", "90", "99", "99.9"):
        latency[f"p{q}"] = float(pct[q]) / 1000.0
    seconds = {int(k): int(v) for k, v in data.get("seconds", {}).items()}
    timeline: list[list[float]] = []
    if seconds:
        origin = min(seconds)
        timeline = [
            [float(s - origin), float(seconds.get(s, 0))] for s in range(origin, max(seconds) + 1)
        ]
    errors = {k: int(v) for k, v in data.get("errors", {}).items() if k != "status"}
    return Measurement(
        tool="wrk",
        duration_s=duration_s,
        requests=requests,
        rps=requests / duration_s if duration_s else 0.0,
        latency_ms=latency,
        statuses={str(k): int(v) for k, v in data.get("statuses", {}).items()},
        socket_errors=errors,
        kb_per_s=float(data["bytes"]) / 1024.0 / duration_s if duration_s else 0.0,
        conn_reuse_rate=None if keepalive else 0.0,
        timeline=timeline,
        marks={k: int(v) for k, v in data.get("marks", {}).items()},
        extra={"bytes": float(data["bytes"]), "threads": int(data.get("threads", 0))},
    )


def parse_ab(output: str) -> Measurement:
    """ab's report: totals, failures, keep-alive reuse, transfer and the connection times."""

    def num(pattern: str, what: str) -> float:
        return float(_search(pattern, output, what).group(1))

    complete = int(num(r"^Complete requests:\s+(\d+)", "Complete requests"))
    taken = num(r"^Time taken for tests:\s+([\d.]+) seconds", "Time taken")
    failed = re.search(
        r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)", output
    )
    socket_errors: dict[str, int] = {}
    length_mismatches = 0
    if failed:
        socket_errors = {
            "connect": int(failed.group(1)),
            "receive": int(failed.group(2)),
            "exceptions": int(failed.group(4)),
        }
        length_mismatches = int(failed.group(3))
    non_2xx = re.search(r"^Non-2xx responses:\s+(\d+)", output, re.MULTILINE)
    statuses = {"non-2xx": int(non_2xx.group(1))} if non_2xx else {}
    keepalive = re.search(r"^Keep-Alive requests:\s+(\d+)", output, re.MULTILINE)
    reuse = int(keepalive.group(1)) / complete if keepalive and complete else 0.0
    conn = re.search(r"^Connect:\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)", output, re.MULTILINE)
    total = re.search(r"^Total:\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\d+)\s+(\d+)", output, re.MULTILINE)
    latency: dict[str, float] = {
        "avg": num(r"^Time per request:\s+([\d.]+) \[ms\] \(mean\)", "Time per request"),
    }
    if total:
        latency["max"] = float(total.group(5))
    for pct, value in re.findall(r"^\s*(\d+)%\s+(\d+)", output, re.MULTILINE):
        if pct != "100":
            latency[f"p{pct}"] = float(value)
    # ab counts a failed connect or receive as "complete"; only the rest got a reply.
    replied = max(0, complete - socket_errors.get("connect", 0) - socket_errors.get("receive", 0))
    statuses["2xx"] = max(0, replied - statuses.get("non-2xx", 0))
    return Measurement(
        tool="ab",
        duration_s=taken,
        requests=replied,
        rps=num(r"^Requests per second:\s+([\d.]+)", "Requests per second"),
        latency_ms=latency,
        statuses=statuses,
        socket_errors=socket_errors,
        kb_per_s=num(r"^Transfer rate:\s+([\d.]+) \[Kbytes/sec\] received", "Transfer rate"),
        connect_ms=float(conn.group(2)) if conn else None,
        conn_reuse_rate=reuse,
        extra={"length_mismatches": length_mismatches},
    )


def parse_ab_gnuplot(path: Path) -> tuple[list[float], list[float], list[float]]:
    """ab -g: per request (start second, total ms, connect ms)."""
    starts: list[float] = []
    totals: list[float] = []
    connects: list[float] = []
    with path.open() as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header[:2] != ["starttime", "seconds"]:
            raise ParseError(f"not an ab gnuplot file: {path}")
        col = {name: i for i, name in enumerate(header)}
        for line in fh:
            cells = line.rstrip("\n").split("\t")
            if len(cells) < len(header):
                continue
            starts.append(float(cells[col["seconds"]]))
            totals.append(float(cells[col["ttime"]]))
            connects.append(float(cells[col["ctime"]]))
    return starts, totals, connects


def parse_ab_with_gnuplot(output: str, gnuplot: Path) -> Measurement:
    """ab's report, with p99.9, mean connect time and a time series from its -g file."""
    result = parse_ab(output)
    starts, totals, connects = parse_ab_gnuplot(gnuplot)
    if totals:
        summary = latency_summary(totals)
        for key in ("p50", "p90", "p99", "p99.9", "max"):
            result.latency_ms[key] = summary[key]
        result.connect_ms = sum(connects) / len(connects)
        result.timeline = timeline_from_stamps(starts, min(starts))
    result.extra["resolution_ms"] = 1.0
    return result
