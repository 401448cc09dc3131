"""Background tasks owned by a lifespan, stopped reliably.

On Python 3.11 a cancellation can be lost inside a library's own timeout
(redis-py's pub/sub read is one), and the task then runs on. So loops also
watch a `stopping` event, and `stop()` cancels again until every task ends.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("shopstack.tasks")


class BackgroundTasks:
    def __init__(self) -> None:
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run `loop()` as a named task until stop()."""

        async def run() -> None:
            await loop()

        self.tasks.append(asyncio.create_task(run(), name=name))

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Signal, cancel (again if ignored) and wait; log failures and stragglers."""
        self.stopping.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending = {t for t in self.tasks if not t.done()}
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.5)
        for task in self.tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("background task failed", exc_info=task.exception())
        if pending:
            names = [t.get_name() for t in pending]
            log.error("background tasks did not stop", extra={"tasks": names})
        self.tasks = list(pending)
