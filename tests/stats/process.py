"""A real `shopstack serve stats` process for crash and shutdown tests."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import psutil

from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class StatsProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_bytes(self) -> int:
        """Resident memory of the server and its worker processes."""
        parent = psutil.Process(self.process.pid)
        procs = [parent, *parent.children(recursive=True)]
        total = 0
        for proc in procs:
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total

    def worker_rss_bytes(self) -> int:
        """Resident memory of the largest worker (where requests and the writer run)."""
        parent = psutil.Process(self.process.pid)
        sizes = [c.memory_info().rss for c in parent.children(recursive=True)]
        return max(sizes, default=parent.memory_info().rss)

    def kill(self) -> None:
        """SIGKILL the whole process group: server and workers die at once."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout_s: float = 15.0) -> float:
        """SIGTERM the server; return the seconds it took to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout_s)
        return time.monotonic() - started

    def ensure_stopped(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def start_stats(env: dict[str, str], log_path: Path, *, timeout_s: float = 30.0) -> StatsProcess:
    """Start `shopstack serve stats` on a free port and wait until /readyz answers 200."""
    port = free_port()
    prom_dir = log_path.parent / f"prometheus-{port}"
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        proc = _spawn(env, port, prom_dir, log)
    running = StatsProcess(proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stats exited {proc.returncode}:\n{running.log()}")
        try:
            if httpx.get(running.url + "/readyz", timeout=1).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    running.ensure_stopped()
    raise TimeoutError(f"stats not ready:\n{running.log()}")


def _spawn(
    env: dict[str, str], port: int, prom_dir: Path, log: IO[bytes]
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "stats"],
        cwd=ROOT,
        env={
            **os.environ,
            "SHOPSTACK_WORKERS": "1",
            **env,
            "PYTHONPATH": str(ROOT),
            "SHOPSTACK_PORT": str(port),
            "PROMETHEUS_MULTIPROC_DIR": str(prom_dir),
        },
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
