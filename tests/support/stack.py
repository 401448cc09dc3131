"""The whole stack as real processes (`shopstack up`), for end-to-end tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import asyncpg
import httpx
import psutil

from services.common.settings import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class RunningStack:
    base_port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: BinaryIO

    def url(self, service: str = "gateway") -> str:
        return f"http://127.0.0.1:{self.base_port + DEFAULT_PORTS[service] - 8000}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_stack(
    *, base_port: int, env: dict[str, str], log_path: Path, timeout_s: float = 90.0
) -> RunningStack:
    """Run `shopstack up --no-seed` and wait until the gateway is ready."""
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--no-seed",
            "--base-port",
            str(base_port),
            "--data-dir",
            str(log_path.parent / "data"),
        ],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    stack = RunningStack(base_port, proc, log_path, log)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"shopstack up exited {proc.returncode}:\n{stack.log()}")
        if "shopstack is up" in stack.log():
            return stack
        time.sleep(0.2)
    stop_stack(stack)
    raise TimeoutError(f"stack not ready:\n{stack.log()}")


def stop_stack(stack: RunningStack, timeout_s: float = 30.0) -> list[int]:
    """SIGINT the launcher like Ctrl-C; return pids of any process left behind."""
    try:
        descendants = psutil.Process(stack.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    stack.process.send_signal(signal.SIGINT)
    try:
        stack.process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        stack.process.kill()
        stack.process.wait(5)
    stack.log_file.close()
    _, alive = psutil.wait_procs(descendants, timeout=5)
    for proc in alive:
        proc.kill()
    return [p.pid for p in alive]


def ready(url: str) -> bool:
    try:
        return httpx.get(url + "/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def private_stack(
    admin_dsn: str,
    *,
    redis_url: str,
    log_dir: Path,
    products: int,
    users: int = 0,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[RunningStack, str]]:
    """A whole stack of its own: a fresh migrated database seeded with `products` and
    `users` demo rows, the given Redis, extra `env`. Yields (stack, database DSN)."""
    from services.catalog.seed import seed_products
    from services.gateway.seed import seed_users
    from services.gateway.settings import GatewaySettings
    from tests.support.servers import free_port_block, migrated_database

    with migrated_database(admin_dsn) as dsn:

        async def seed() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await seed_products(conn, products)
                if users:
                    settings = GatewaySettings(database_url=dsn, redis_url=redis_url)
                    await seed_users(conn, settings, users)
            finally:
                await conn.close()

        asyncio.run(seed())
        running = start_stack(
            base_port=free_port_block([0, 1, 2, 3, 9]),
            env={
                "SHOPSTACK_ENV": "test",
                "SHOPSTACK_DATABASE_URL": dsn,
                "SHOPSTACK_REDIS_URL": redis_url,
                "SHOPSTACK_LOG_LEVEL": "WARNING",
                **(env or {}),
            },
            log_path=log_dir / "up.log",
        )
        try:
            yield running, dsn
        finally:
            assert stop_stack(running) == []
