"""A trickle of behaviour events posted while the load runs; the audit checks each accepted one.

Product-detail views are what the stats service counts in production, so while
the product-detail scenario runs this thread posts small batches of "view"
events through the gateway and remembers the ids the stack accepted (202). The
audit then requires every one of them in Postgres exactly once.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime

import httpx

from loadtests import workload
from loadtests.prepare import UNAVAILABLE


class StatsProbe:
    """Post `batch` view events every `period_s` from a thread of its own."""

    def __init__(self, base_url: str, *, batch: int = 20, period_s: float = 0.5) -> None:
        self.base_url = base_url
        self.batch = batch
        self.period_s = period_s
        self.accepted: list[str] = []
        self.replies: Counter[str] = Counter()
        self.unavailable_status: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.unavailable_status is None

    def __enter__(self) -> StatsProbe:
        self._thread = threading.Thread(target=self._run, name="loadtest-stats", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)

    def _run(self) -> None:
        asyncio.run(self._loop())

    def _events(self, ids: workload.ZipfIds) -> list[dict[str, object]]:
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return [
            {
                "event_id": str(uuid.uuid4()),
                "type": "view",
                "product_id": ids.draw(),
                "user_id": f"loadtest-{n}",
                "ts": now,
            }
            for n in range(self.batch)
        ]

    async def _loop(self) -> None:
        ids = workload.ZipfIds(workload.FLASH_SALE_IDS)
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5.0) as http:
            while not self._stop.is_set():
                events = self._events(ids)
                try:
                    resp = await http.post("/api/v1/events", json=events)
                except httpx.HTTPError as exc:
                    self.replies[type(exc).__name__] += 1
                else:
                    self.replies[str(resp.status_code)] += 1
                    if resp.status_code == 202:
                        self.accepted += [str(e["event_id"]) for e in events]
                    elif resp.status_code in UNAVAILABLE and not self.accepted:
                        self.unavailable_status = resp.status_code
                        return
                await asyncio.to_thread(self._stop.wait, self.period_s)
