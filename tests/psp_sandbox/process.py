"""Run a service as a real process (`shopstack serve <service>` under granian)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "test-psp-webhook-secret-0123456789abcdef-xyz"


@dataclass
class ServiceProcess:
    service: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_service(
    service: str, *, port: int, env: dict[str, str], run_dir: Path, timeout_s: float = 30.0
) -> ServiceProcess:
    """Start `shopstack serve <service>` on `port` and wait for /readyz."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / f"{service}.log"
    full_env = {
        **os.environ,
        "SHOPSTACK_ENV": "test",
        "SHOPSTACK_LOG_LEVEL": "INFO",
        "SHOPSTACK_PSP_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "PROMETHEUS_MULTIPROC_DIR": str(run_dir / f"prometheus-{service}"),
        "PYTHONPATH": str(ROOT),
        **env,
        "SHOPSTACK_HOST": "127.0.0.1",
        "SHOPSTACK_PORT": str(port),
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", service],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = ServiceProcess(service, port, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{service} exited {proc.returncode}:\n{running.log()}")
        try:
            if httpx.get(running.url + "/readyz", timeout=1).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    running.stop()
    raise TimeoutError(f"{service} not ready:\n{running.log()}")


async def declare_huge_body(port: int, path: str, size: int = 1_048_577) -> tuple[int, bytes]:
    """POST headers declaring a body over 1 MiB, send none of it, return (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        return status, body
    finally:
        writer.close()
