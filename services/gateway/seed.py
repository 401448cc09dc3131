"""Demo users demo1..demoN (password demo-password-<n>) and an admin."""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ProcessPoolExecutor

import asyncpg
from argon2 import PasswordHasher

from services.gateway import storage
from services.gateway.settings import GatewaySettings


def demo_password(n: int) -> str:
    return f"demo-password-{n}"


def _hasher(settings: GatewaySettings) -> PasswordHasher:
    return PasswordHasher(
        time_cost=settings.argon2_time_cost,
        memory_cost=settings.argon2_memory_kib,
        parallelism=settings.argon2_parallelism,
    )


def _hash_many(params: tuple[int, int, int], passwords: list[str]) -> list[str]:
    hasher = PasswordHasher(time_cost=params[0], memory_cost=params[1], parallelism=params[2])
    return [hasher.hash(p) for p in passwords]


def hash_all(settings: GatewaySettings, passwords: list[str]) -> list[str]:
    """Hash many passwords on every core (argon2 is deliberately slow)."""
    if len(passwords) < 16:
        hasher = _hasher(settings)
        return [hasher.hash(p) for p in passwords]
    workers = max(1, os.cpu_count() or 1)
    params = (settings.argon2_time_cost, settings.argon2_memory_kib, settings.argon2_parallelism)
    chunks = [passwords[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        hashed = list(pool.map(_hash_many, [params] * workers, chunks))
    out: list[str] = [""] * len(passwords)
    for i, chunk in enumerate(hashed):
        out[i::workers] = chunk
    return out


async def seed_users(conn: asyncpg.Connection, settings: GatewaySettings, count: int = 1000) -> int:
    """Create the demo users and the admin that are missing; return how many were added."""
    wanted: list[tuple[str, str, str]] = [
        (f"demo{n}", demo_password(n), "user") for n in range(1, count + 1)
    ]
    wanted.append(("admin", settings.secret("admin_password"), "admin"))
    existing = await storage.existing_usernames(conn, [w[0] for w in wanted])
    missing = [w for w in wanted if w[0] not in existing]
    if not missing:
        return 0
    hashes = await asyncio.to_thread(hash_all, settings, [w[1] for w in missing])
    rows = [(w[0], h, w[2]) for w, h in zip(missing, hashes, strict=True)]
    return await storage.insert_users(conn, rows)
