"""SHD-1: SIGTERM with 100 requests in flight, under granian and under uvicorn.

The sandbox's latency fault makes every charge take 2 s, so the requests are truly in
flight when the server is told to stop. Every one of them is answered, new connections
are refused once the server stops listening, and the process exits on its own.
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
from tests.support.servers import free_port

IN_FLIGHT = 100
LATENCY_MS = 2000


def _env(redis_url: str) -> dict[str, str]:
    return {
        "SHOPSTACK_ENV": "test",
        "SHOPSTACK_REDIS_URL": redis_url,
        "SHOPSTACK_PSP_LATENCY_MS": str(LATENCY_MS),
        "SHOPSTACK_PSP_CALLBACK_URL": "http://127.0.0.1:9/unused",  # nobody listens: fine
        "SHOPSTACK_PSP_KEY_PREFIX": "shd1-" + uuid.uuid4().hex[:8] + ":",
    }


def _granian(port: int, redis_url: str, run_dir: Path) -> subprocess.Popen[bytes]:
    return start_service("psp_sandbox", port=port, env=_env(redis_url), run_dir=run_dir).process


def _uvicorn(port: int, redis_url: str, run_dir: Path) -> subprocess.Popen[bytes]:
    with (run_dir / "uvicorn.log").open("wb") as log:
        proc = _spawn_uvicorn(port, redis_url, log)
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


def _spawn_uvicorn(port: int, redis_url: str, log: BinaryIO) -> subprocess.Popen[bytes]:
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
            "10",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            **_env(redis_url),
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


@pytest.mark.parametrize("server", ["granian", "uvicorn"])
async def test_shd1_sigterm_drains_every_request_in_flight(
    server: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    start = _granian if server == "granian" else _uvicorn
    proc = start(port, redis_url, tmp_path)
    try:
        limits = httpx.Limits(max_connections=IN_FLIGHT)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=15, limits=limits
        ) as client:

            async def charge(n: int) -> int:
                resp = await client.post(
                    "/v1/charges",
                    json={"amount_cents": 100 + n, "currency": "EUR", "reference": f"shd1-{n}"},
                    headers={"Idempotency-Key": uuid.uuid4().hex},
                )
                return resp.status_code

            charges = [asyncio.create_task(charge(n)) for n in range(IN_FLIGHT)]
            await asyncio.sleep(LATENCY_MS / 1000 / 3)  # all sent, none answered yet
            assert not any(task.done() for task in charges)
            proc.send_signal(signal.SIGTERM)
            refused = False
            for _ in range(100):
                refused = _refused(port)
                if refused:
                    break
                await asyncio.sleep(0.02)
            statuses = await asyncio.gather(*charges)
        assert refused, "the server kept accepting new connections after SIGTERM"
        assert statuses == [201] * IN_FLIGHT
        # granian exits 0; uvicorn, once drained, re-raises the signal it caught.
        assert proc.wait(15) == (0 if server == "granian" else -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
