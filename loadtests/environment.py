"""What the figures were measured on: CPU, cores, load, versions, worker counts."""

from __future__ import annotations

import asyncio
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import redis.asyncio as aioredis

from loadtests import tools
from loadtests.processes import ProcessGroup

PACKAGES = ("granian", "fastapi", "starlette", "uvloop", "asyncpg", "redis", "aiohttp", "httpx")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "unknown"


async def _server_versions(database_url: str | None, redis_url: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if database_url:
        try:
            conn = await asyncpg.connect(database_url, timeout=5)
            try:
                out["postgres"] = str(await conn.fetchval("SHOW server_version"))
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError) as exc:
            out["postgres"] = f"unreachable ({type(exc).__name__})"
    if redis_url:
        client = aioredis.Redis.from_url(redis_url, socket_timeout=5)
        try:
            info = await client.info("server")
            out["redis"] = str(info.get("redis_version", "unknown"))
        except (OSError, aioredis.RedisError) as exc:
            out["redis"] = f"unreachable ({type(exc).__name__})"
        finally:
            await client.aclose()
    return out


def collect(
    *,
    groups: dict[str, ProcessGroup],
    plan: tools.CpuPlan,
    database_url: str | None,
    redis_url: str | None,
    target: str,
) -> dict[str, Any]:
    """The environment block every report carries."""
    versions = {name: _version(name) for name in PACKAGES}
    versions["python"] = platform.python_version()
    versions["wrk"] = tools.version("wrk")
    versions["ab"] = tools.version("ab")
    versions.update(asyncio.run(_server_versions(database_url, redis_url)))
    load1, load5, _ = os.getloadavg()
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "kernel": platform.release(),
        "loadavg_at_start": [round(load1, 2), round(load5, 2)],
        "pinning": plan.describe(),
        "cpu_plan": plan.to_dict(),
        "target": target,
        "commit": _git_commit(),
        "versions": versions,
        "workers": {
            name: g.worker_count()
            for name, g in groups.items()
            if name not in ("postgres", "redis")
        },
        "process_groups": {
            name: {"processes": len(g.members()), "port": g.port, "notes": g.notes}
            for name, g in groups.items()
        },
    }


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
