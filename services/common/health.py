"""Readiness checks, shared by the FastAPI services and the (framework-free) gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Check = Callable[[], Awaitable[None]]


async def failing_checks(checks: dict[str, Check], timeout_s: float = 2.0) -> set[str]:
    """Run the checks concurrently; return the names that failed or timed out."""

    async def run(check: Check) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await check()
        except Exception:
            return False
        return True

    names = list(checks)
    results = await asyncio.gather(*(run(checks[name]) for name in names))
    return {name for name, ok in zip(names, results, strict=True) if not ok}
