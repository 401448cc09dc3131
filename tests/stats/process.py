"""A real `shopstack serve stats` process for crash and shutdown tests."""

from __future__ import annotations

from pathlib import Path

from tests.support.process import ServiceProcess, start_service

StatsProcess = ServiceProcess


def start_stats(env: dict[str, str], log_path: Path, *, timeout_s: float = 30.0) -> StatsProcess:
    """Start `shopstack serve stats` on a free port and wait until /readyz answers 200."""
    return start_service("stats", env=env, log_path=log_path, timeout_s=timeout_s)
