"""One service as a real process (`shopstack serve SERVICE` under granian), for tests that
need real sockets, SIGTERM/SIGKILL, or memory measurements."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER_STARTED = b"Started worker-1"


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

    def rss_bytes(self) -> int:
        """Resident memory of the server and its worker processes."""
        parent = psutil.Process(self.process.pid)
        total = 0
        for proc in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def worker_rss_bytes(self) -> int:
        """Resident memory of the largest worker (where requests are served)."""
        parent = psutil.Process(self.process.pid)
        sizes = [c.memory_info().rss for c in parent.children(recursive=True)]
        return max(sizes, default=parent.memory_info().rss)

    def terminate(self, timeout_s: float = 15.0) -> float:
        """SIGTERM the server (a graceful drain); return the seconds it took to exit."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout_s)
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL the whole process group: server and workers die at once."""
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Terminate if still running; SIGKILL the group after `timeout_s`."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def ensure_stopped(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


def start_service(
    service: str,
    *,
    env: dict[str, str],
    log_path: Path,
    port: int | None = None,
    timeout_s: float = 30.0,
    beside: bool = False,
) -> ServiceProcess:
    """Start `shopstack serve SERVICE` (one worker, its own process group) and wait for /readyz.

    With `beside`, another server already listens on `port` (granian binds with
    SO_REUSEPORT, so both accept there: a restart without a gap). Its /readyz would
    answer for this one, so readiness is this server's worker reporting it started
    (granian logs that once the app's lifespan has started).
    """
    port = port or free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        "SHOPSTACK_ENV": "test",
        "SHOPSTACK_WORKERS": "1",
        # One per log: a server started beside another on its port must not wipe its files.
        "PROMETHEUS_MULTIPROC_DIR": str(log_path.parent / f"prometheus-{log_path.stem}-{port}"),
        **env,
        "PYTHONPATH": str(ROOT),
        "SHOPSTACK_HOST": "127.0.0.1",
        "SHOPSTACK_PORT": str(port),
    }
    started_at = log_path.stat().st_size if log_path.exists() else 0  # a log may be reused
    with log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", service],
            cwd=ROOT,
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = ServiceProcess(service, port, proc, log_path)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{service} exited {proc.returncode}:\n{running.log()}")
        if beside:
            with log_path.open("rb") as log:
                log.seek(started_at)
                if WORKER_STARTED in log.read():
                    return running
        else:
            try:
                if httpx.get(running.url + "/readyz", timeout=1).status_code == 200:
                    return running
            except httpx.HTTPError:
                pass
        time.sleep(0.1)
    running.ensure_stopped()
    raise TimeoutError(f"{service} not ready:\n{running.log()}")
