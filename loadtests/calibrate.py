"""The machine's HTTP ceiling: the scenarios' load shapes against a bare granian hello app.

The hello app (calibration/hello.py) runs under granian on the services' CPUs
with as many workers as those CPUs, once per interface (RSGI, ASGI); each load
shape the scenarios use (tool, connections, keep-alive or close, GET or POST)
is run against it. A scenario's requests/s divided by its shape's ceiling says
how much of what the machine can do over HTTP the stack achieves.

The same hello also measures the open-model generator's own ceiling: the
highest arrival rate it keeps (no send lag, every request answered).
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtests.runners import LoadToolFailed, lua_script, run_ab, run_openloop, run_wrk
from loadtests.tools import CpuPlan

INTERFACES = {
    "rsgi": "loadtests.calibration.hello:rsgi_app",
    "asgi": "loadtests.calibration.hello:asgi_app",
}
GENERATOR_RATES = (250, 500, 1000, 2000, 4000, 8000, 12000)
GENERATOR_STEP_S = 1.5


@dataclass(frozen=True)
class Shape:
    """How load is applied, independent of what is asked for."""

    tool: str  # wrk | ab
    connections: int
    close: bool
    method: str = "GET"

    @property
    def key(self) -> str:
        reuse = "close" if self.close else "keepalive"
        return f"{self.tool}-{reuse}-{self.method}-c{self.connections}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def hello_server(interface: str, plan: CpuPlan) -> Iterator[str]:
    """Run the hello app under granian on the services' CPUs; yield its base URL."""
    port = free_port()
    workers = len(plan.services) if plan.services else 1
    prefix = ["taskset", "-c", ",".join(map(str, plan.services))] if plan.services else []
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "granian",
        "--interface",
        interface,
        "--http",
        "1",
        "--no-ws",
        "--loop",
        "uvloop",
        "--workers",
        str(workers),
        "--backlog",
        "2048",
        "--log-level",
        "warning",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        INTERFACES[interface],
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise LoadToolFailed(f"hello app exited {proc.returncode}: {err[-500:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline:
                raise LoadToolFailed("hello app did not start within 20 s")
            time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        if proc.stderr:
            proc.stderr.close()


def measure_shape(
    shape: Shape, base_url: str, *, duration_s: float, plan: CpuPlan, workdir: Path
) -> float:
    """Requests/s of one shape against the hello app (errors excluded)."""
    if shape.tool == "ab":
        body = workdir / "hello-body.json"
        body.write_text('{"order_id":"00000000-0000-4000-8000-000000000000"}')
        run = run_ab(
            url=base_url + "/",
            body=body,
            content_type="application/json",
            headers={},
            connections=shape.connections,
            duration_s=duration_s,
            keepalive=not shape.close,
            plan=plan,
            workdir=workdir,
        )
    else:
        run = run_wrk(
            base_url=base_url,
            script=lua_script("hello", workdir),
            script_args=[shape.method],
            connections=shape.connections,
            duration_s=duration_s,
            close=shape.close,
            plan=plan,
        )
    m = run.measurement.classify([200])
    return m.rps * (1.0 - m.error_rate)


def generator_ceiling(
    base_url: str, *, close: bool, plan: CpuPlan, workdir: Path
) -> dict[str, Any]:
    """The highest rate at which the generator sends on time and gets every reply."""
    host, port = base_url.removeprefix("http://").split(":")
    best = 0.0
    tried: list[dict[str, float]] = []
    for rate in GENERATOR_RATES:
        # Two tries: one failure may be a neighbour's burst on a shared machine.
        if not any(_keeps_rate(rate, host, int(port), close, plan, workdir, tried) for _ in "12"):
            break
        best = float(rate)
    return {"sustained_rps": best, "tried": tried}


def _keeps_rate(
    rate: int,
    host: str,
    port: int,
    close: bool,
    plan: CpuPlan,
    workdir: Path,
    tried: list[dict[str, float]],
) -> bool:
    """One short open-model run against the hello app: on schedule, every request answered."""
    spec = {
        "host": host,
        "port": port,
        "rate": rate,
        "duration_s": GENERATOR_STEP_S,
        "close": close,
        "max_connections": 512,
        "source": {"kind": "fixed", "method": "GET", "path": "/", "headers": {}},
    }
    m = run_openloop(spec=spec, plan=plan, workdir=workdir).measurement.classify([200])
    lag = m.extra["send_lag_ms"]
    tried.append(
        {
            "rate": rate,
            "rps": round(m.rps, 1),
            "send_lag_p50_ms": round(float(lag["p50"]), 2),
            "send_lag_p99_ms": round(float(lag["p99"]), 2),
        }
    )
    return not (m.extra["saturated"] or m.requests < 0.97 * rate * GENERATOR_STEP_S or m.errors)


def calibrate(
    shapes: list[Shape],
    *,
    duration_s: float,
    plan: CpuPlan,
    workdir: Path,
    interfaces: tuple[str, ...] = ("rsgi", "asgi"),
    rounds: int = 2,
    measure_generator: bool = True,
) -> dict[str, Any]:
    """Ceilings per interface and shape, plus the open-model generator's own ceiling.

    Both hello apps run side by side (idle when not measured) and every shape is
    measured on each in turn, `rounds` times: on a shared machine a neighbour's
    burst only ever lowers a figure, so the ceiling is the best round, and
    interleaving keeps one interface from getting all the quiet moments.
    """
    out: dict[str, Any] = {
        "app": "loadtests/calibration/hello.py under granian (http1, uvloop)",
        "workers": len(plan.services) if plan.services else 1,
        "duration_s": duration_s,
        "rounds": rounds,
        "ceilings": {i: {} for i in interfaces},
        "rounds_rps": {i: {} for i in interfaces},
        "generator": {},
    }
    with contextlib.ExitStack() as servers:
        urls = {i: servers.enter_context(hello_server(i, plan)) for i in interfaces}
        for shape in shapes:
            for _ in range(rounds):
                for interface, url in urls.items():
                    rps = measure_shape(
                        shape, url, duration_s=duration_s, plan=plan, workdir=workdir
                    )
                    out["rounds_rps"][interface].setdefault(shape.key, []).append(round(rps, 1))
            for interface in interfaces:
                out["ceilings"][interface][shape.key] = max(out["rounds_rps"][interface][shape.key])
        if measure_generator and "rsgi" in urls:
            out["generator"] = {
                "keepalive": generator_ceiling(
                    urls["rsgi"], close=False, plan=plan, workdir=workdir
                ),
                "close": generator_ceiling(urls["rsgi"], close=True, plan=plan, workdir=workdir),
            }
    return out
