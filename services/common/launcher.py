"""`shopstack up`: run the whole stack as local processes and stop it cleanly.

Order: data servers (given by URL, or embedded under .data/), migrations,
demo data when empty, one `shopstack serve` process per service, wait for
every /readyz, then wait for Ctrl-C / SIGTERM (or a service dying) and stop
everything in reverse order.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.common.settings import DEFAULT_PORTS, SERVICES

log = logging.getLogger("shopstack.launcher")

STOP_TIMEOUT_S = 15.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    # If the launcher is killed outright, its services get SIGTERM instead of lingering.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class StackPlan:
    """What to run: ports, workers and the environment shared by every service."""

    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    workers: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    run_dir: Path = Path(".data/run")

    def url(self, service: str) -> str:
        return f"http://{self.host}:{self.ports[service]}"

    def service_env(self, service: str) -> dict[str, str]:
        env = {
            **os.environ,
            **self.env,
            "SHOPSTACK_HOST": self.host,
            "SHOPSTACK_PORT": str(self.ports[service]),
            "SHOPSTACK_WORKERS": str(self.workers.get(service, 1)),
            "SHOPSTACK_CATALOG_URL": self.url("catalog"),
            "SHOPSTACK_PAYMENT_URL": self.url("payment"),
            "SHOPSTACK_STATS_URL": self.url("stats"),
            "SHOPSTACK_PSP_URL": self.url("psp_sandbox"),
            "SHOPSTACK_PSP_CALLBACK_URL": self.url("payment") + "/api/v1/payments/callbacks/psp",
            "PROMETHEUS_MULTIPROC_DIR": str((self.run_dir / "prometheus" / service).resolve()),
        }
        return env


class Stack:
    """The running service processes."""

    def __init__(self, plan: StackPlan) -> None:
        self.plan = plan
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        """Start one `shopstack serve` process per service."""
        self.plan.run_dir.mkdir(parents=True, exist_ok=True)
        for service in SERVICES:
            self.procs[service] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "serve", service],
                env=self.plan.service_env(service),
                preexec_fn=_die_with_parent,
                start_new_session=True,  # Ctrl-C reaches the launcher only; it stops them in order
            )

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        """Poll every /readyz until all answer 200; raise if one exits or time runs out."""
        deadline = time.monotonic() + timeout_s
        pending = set(SERVICES)
        while pending:
            for service in sorted(pending):
                proc = self.procs[service]
                if proc.poll() is not None:
                    raise RuntimeError(f"{service} exited with code {proc.returncode}")
                if probe(self.plan.url(service) + "/readyz"):
                    pending.discard(service)
            if pending and time.monotonic() > deadline:
                raise TimeoutError("not ready in time: " + ", ".join(sorted(pending)))
            if pending:
                time.sleep(0.2)

    def first_exited(self) -> str | None:
        for service, proc in self.procs.items():
            if proc.poll() is not None:
                return service
        return None

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every service (the gateway first, so it stops taking traffic), then SIGKILL."""
        order = ["gateway", *[s for s in SERVICES if s != "gateway"]]
        for service in order:
            proc = self.procs.get(service)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for service in order:
            proc = self.procs.get(service)
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("killing %s after %.0f s", service, timeout_s)
                _kill_group(proc)
                proc.wait(5)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def probe(url: str, timeout_s: float = 1.0) -> bool:
    """True when GET `url` answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (http only)
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_for_stop_signal(stack: Stack, on_signal: Callable[[], None] | None = None) -> str:
    """Block until SIGINT/SIGTERM or a service exits; return why."""
    stop = threading.Event()
    reason = ["signal"]

    def handler(signum: int, _frame: object) -> None:
        reason[0] = signal.Signals(signum).name
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            exited = stack.first_exited()
            if exited:
                reason[0] = f"{exited} exited"
                break
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if on_signal:
        on_signal()
    return reason[0]


STACK_FILE = "stack.json"


def write_stack_file(run_dir: Path, info: dict[str, str]) -> Path:
    """Record where the running stack's servers are (for `shopstack loadtest`), owner-only."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / STACK_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(info, out)
    return path


def read_stack_file(data_dir: Path) -> dict[str, str]:
    """What `shopstack up` recorded under `data_dir`, or {} when no stack runs from there."""
    try:
        info = json.loads((data_dir / "run" / STACK_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in info.items()} if isinstance(info, dict) else {}
