"""SHD-1 and SHD-2: SIGTERM with requests in flight, under granian and under uvicorn.

The sandbox's latency fault makes every charge slow, so the requests are truly in
flight when the server is told to stop.

- SHD-1: charges of 2 s, well within the shutdown timeout. Every one is answered, new
  connections are refused once the server stops listening, the process exits by itself.
- SHD-2: charges of 60 s, past a 3 s shutdown timeout. They are cut off when the timeout
  runs out (not before, not much after; under uvicorn with a 503 problem, never a 500),
  the process exits right then, and nothing is left half-done: the same idempotency
  keys charge once each on the next server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import BinaryIO

import httpx
import pytest

from tests.psp_sandbox.process import ROOT, WEBHOOK_SECRET, start_service
from tests.support.problems import assert_problem
from tests.support.servers import free_port

IN_FLIGHT = 100
LATENCY_MS = 2000


SHUTDOWN_S = 3


def _env(redis_url: str, prefix: str, latency_ms: int) -> dict[str, str]:
    return {
        "SHOPSTACK_ENV": "test",
        "SHOPSTACK_REDIS_URL": redis_url,
        "SHOPSTACK_PSP_LATENCY_MS": str(latency_ms),
        # Nobody listens there: the dispatcher is busy failing and retrying callbacks
        # while the server stops, and must not hold the shutdown up.
        "SHOPSTACK_PSP_CALLBACK_URL": "http://127.0.0.1:9/unused",
        "SHOPSTACK_PSP_KEY_PREFIX": prefix,
        "SHOPSTACK_SHUTDOWN_TIMEOUT_S": str(SHUTDOWN_S),
    }


def _start(server: str, port: int, env: dict[str, str], run_dir: Path) -> subprocess.Popen[bytes]:
    if server == "granian":
        return start_service("psp_sandbox", port=port, env=env, run_dir=run_dir).process
    with (run_dir / "uvicorn.log").open("ab") as log:
        proc = _spawn_uvicorn(port, env, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    raise TimeoutError((run_dir / "uvicorn.log").read_text())


def _spawn_uvicorn(port: int, env: dict[str, str], log: BinaryIO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "services.psp_sandbox.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--timeout-graceful-shutdown",
            str(SHUTDOWN_S),
        ],
        cwd=ROOT,
        env={
            **os.environ,
            **env,
            "SHOPSTACK_PSP_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "PYTHONPATH": str(ROOT),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


async def _send(client: httpx.AsyncClient, key: str, n: int) -> httpx.Response | Exception:
    try:
        return await client.post(
            "/v1/charges",
            json={"amount_cents": 500 + n, "currency": "EUR", "reference": f"drain-{n}"},
            headers={"Idempotency-Key": key},
        )
    except httpx.HTTPError as exc:
        return exc


@pytest.mark.parametrize("server", ["granian", "uvicorn"])
async def test_shd1_sigterm_drains_every_request_in_flight(
    server: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = _env(redis_url, "shd1-" + uuid.uuid4().hex[:8] + ":", LATENCY_MS)
    proc = _start(server, port, env, tmp_path)
    try:
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=15, limits=limits
        ) as client:
            keys = [uuid.uuid4().hex for _ in range(IN_FLIGHT)]
            charges = [asyncio.create_task(_send(client, key, n)) for n, key in enumerate(keys)]
            await asyncio.sleep(LATENCY_MS / 1000 / 3)  # all sent, none answered yet
            assert not any(task.done() for task in charges)
            proc.send_signal(signal.SIGTERM)
            refused = False
            for _ in range(100):
                refused = _refused(port)
                if refused:
                    break
                await asyncio.sleep(0.02)
            replies = await asyncio.gather(*charges)
        statuses = [getattr(reply, "status_code", reply) for reply in replies]
        assert refused, "the server kept accepting new connections after SIGTERM"
        assert statuses == [201] * IN_FLIGHT
        # granian exits 0; uvicorn, once drained, re-raises the signal it caught.
        assert proc.wait(15) == (0 if server == "granian" else -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("server", ["granian", "uvicorn"])
async def test_shd2_requests_past_the_shutdown_timeout_are_cut_off_then_and_recoverable(
    server: str, redis_url: str, tmp_path: Path
) -> None:
    prefix = "shd2-" + uuid.uuid4().hex[:8] + ":"
    keys = [uuid.uuid4().hex for _ in range(20)]
    port = free_port()
    proc = _start(server, port, _env(redis_url, prefix, 60_000), tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=90) as client:
            sending = [asyncio.create_task(_send(client, key, n)) for n, key in enumerate(keys)]
            await asyncio.sleep(0.5)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            outcomes = await asyncio.gather(*sending)
            cut_off = time.monotonic() - signalled
        exit_code = proc.wait(SHUTDOWN_S + 5)
        exited = time.monotonic() - signalled
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # Cut off once the timeout ran out, never with a 500: granian kills the worker (the
    # connection drops, no reply); under uvicorn, which cancels the request instead, the
    # service answers 503 problem+json with Retry-After.
    for outcome in outcomes:
        if server == "granian":
            assert isinstance(outcome, httpx.HTTPError), outcome
        else:
            assert isinstance(outcome, httpx.Response), outcome
            assert_problem(outcome, 503, "overloaded")
            assert outcome.headers["retry-after"] == "1"
    assert SHUTDOWN_S - 0.5 <= cut_off <= SHUTDOWN_S + 2
    assert exited <= SHUTDOWN_S + 3
    assert exit_code in (0, -signal.SIGTERM)
    # Nothing was charged, and the keys are free: the next server charges each once.
    port = free_port()
    proc = _start(server, port, _env(redis_url, prefix, 0), tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            first = [await _send(client, key, n) for n, key in enumerate(keys)]
            again = [await _send(client, key, n) for n, key in enumerate(keys)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    for one, two in zip(first, again, strict=True):
        assert isinstance(one, httpx.Response)
        assert isinstance(two, httpx.Response)
        assert one.status_code == 201, one.text
        assert two.json()["id"] == one.json()["id"]  # the same charge, not a second one
