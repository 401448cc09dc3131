"""The open-model generator: on schedule, latency from the intended send time."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests import workload
from loadtests.calibrate import Shape, hello_server, measure_shape
from loadtests.runners import lua_script, run_openloop, run_wrk
from loadtests.tools import CpuPlan, plan_cpus
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slow_server() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.loadtests.slow_server", str(port), "0.02"], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture(scope="module")
def hello() -> Iterator[str]:
    with hello_server("rsgi", plan_cpus("auto")) as url:
        yield url


def spec(
    url: str, rate: float, duration_s: float, *, close: bool, **source: object
) -> dict[str, object]:
    host, port = url.removeprefix("http://").split(":")
    return {
        "host": host,
        "port": int(port),
        "rate": rate,
        "duration_s": duration_s,
        "close": close,
        "max_connections": 8,
        "source": source or {"kind": "fixed", "method": "GET", "path": "/", "headers": {}},
    }


def test_open_model_shows_the_queue_a_closed_loop_hides(slow_server: str, tmp_path: Path) -> None:
    """Capacity 50/s (20 ms, one at a time). wrk with one connection sees ~20 ms; arrivals at
    100/s for 1.5 s pile up, and the open model reports the waiting."""
    plan = CpuPlan()
    closed = run_wrk(
        base_url=slow_server,
        script=lua_script("hello", tmp_path),
        script_args=["GET"],
        connections=1,
        duration_s=2,
        close=False,
        plan=plan,
    ).measurement
    assert closed.latency_ms["p99"] < 60
    opened = run_openloop(
        spec=spec(slow_server, 100, 1.5, close=False), plan=plan, workdir=tmp_path
    ).measurement.classify([200])
    assert opened.errors == 0
    assert opened.requests == 150
    assert opened.latency_ms["p50"] > 250  # requests waited for the server, not for the client
    assert opened.latency_ms["p99"] > 600
    assert opened.rps < 75  # the server's capacity, not the offered rate


def test_open_model_keeps_the_rate_against_a_fast_server(hello: str, tmp_path: Path) -> None:
    plan = plan_cpus("auto")
    for close in (False, True):
        m = run_openloop(spec=spec(hello, 300, 1.0, close=close), plan=plan, workdir=tmp_path)
        measured = m.measurement.classify([200])
        assert measured.requests == 300
        assert measured.errors == 0
        assert measured.extra["intended"] == 300
        assert measured.connect_ms is not None
        if close:
            assert measured.conn_reuse_rate == 0.0
            assert measured.extra["connections_opened"] == 300
        else:
            assert measured.conn_reuse_rate is not None
            assert measured.conn_reuse_rate > 0.9


def test_data_file_sources_wrap_and_say_so(hello: str, tmp_path: Path) -> None:
    pairs = [
        workload.PaymentPair(f"tok{n}", f"order-{n}", workload.client_address(n)) for n in range(5)
    ]
    path = workload.write_pairs(tmp_path / "pairs.tsv", pairs)
    assert workload.read_pairs(path) == pairs
    m = run_openloop(
        spec=spec(hello, 100, 0.2, close=True, kind="payment", file=str(path)),
        plan=CpuPlan(),
        workdir=tmp_path,
    ).measurement
    assert m.requests == 20
    assert m.marks["wrapped"] == 15
    assert m.marks["sent"] == 20


@pytest.mark.parametrize("interface", ["rsgi", "asgi"])
def test_calibration_hello_answers_every_shape(interface: str, tmp_path: Path) -> None:
    plan = plan_cpus("auto")
    with hello_server(interface, plan) as url:
        for shape in (
            Shape("wrk", 4, False),
            Shape("wrk", 4, True),
            Shape("wrk", 4, True, "POST"),
            Shape("ab", 4, True, "POST"),
        ):
            assert measure_shape(shape, url, duration_s=1.0, plan=plan, workdir=tmp_path) > 100
