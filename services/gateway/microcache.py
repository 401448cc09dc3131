"""The hot-product micro-cache: whole product-detail replies kept for under a second.

A flash sale's product-detail storm is served from this process's memory.
Concurrent misses for one product make one upstream call (request coalescing);
404s are cached too (negative caching); each entry lives `ttl_s` minus up to
20 % jitter, so entries do not expire in lockstep; and the catalog's
`catalog:product-changed` Redis messages drop an entry at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("shopstack.gateway.microcache")

CHANGED_CHANNEL = "catalog:product-changed"  # published by services.catalog.cache
CACHEABLE_STATUSES = frozenset({200, 404})


@dataclass(slots=True)
class Entry:
    status: int
    headers: list[tuple[str, str]]  # without per-request headers (x-request-id)
    body: bytes
    etag: str | None
    expires: float


Fetch = Callable[[], Awaitable[Entry]]


class MicroCache:
    def __init__(self, *, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._inflight: dict[int, asyncio.Future[Entry]] = {}
        self._generation: dict[int, int] = {}
        self.hits = 0
        self.misses = 0
        self.coalesced = 0

    def lifetime(self) -> float:
        return self.ttl_s * (1.0 - 0.2 * random.random())

    def get(self, key: int) -> Entry | None:
        """A fresh entry, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            del self._entries[key]
            return None
        self.hits += 1
        return entry

    async def fetch(self, key: int, loader: Fetch) -> Entry:
        """Load through `loader`, sharing one call among concurrent misses."""
        pending = self._inflight.get(key)
        if pending is not None:
            self.coalesced += 1
            return await asyncio.shield(pending)
        self.misses += 1
        generation = self._generation.get(key, 0)
        future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            entry = await loader()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # waiters re-raise it; mark it retrieved for the loop
            raise
        else:
            future.set_result(entry)
            # An invalidation that arrived while loading makes this reply unfit to keep.
            if entry.status in CACHEABLE_STATUSES and self._generation.get(key, 0) == generation:
                self._store(key, entry)
            return entry
        finally:
            del self._inflight[key]

    def _store(self, key: int, entry: Entry) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def invalidate(self, key: int) -> None:
        """Drop an entry now (and refuse to store a load already under way)."""
        self._entries.pop(key, None)
        self._generation[key] = self._generation.get(key, 0) + 1
        if len(self._generation) > 4 * self.max_entries:
            self._generation.clear()

    def clear(self) -> None:
        self._entries.clear()


async def listen_for_changes(
    redis: Redis,
    on_change: Callable[[int], None],
    on_reset: Callable[[], None],
    stopping: asyncio.Event,
) -> None:
    """Follow catalog:product-changed until `stopping` is set, resubscribing after errors.

    While the subscription is down nothing is known about changes, so every time
    it (re)connects, `on_reset` drops what might have been missed. The loop also
    checks `stopping` because a cancellation can be lost inside redis-py's own
    read timeout on Python 3.11.
    """
    backoff = 0.1
    while not stopping.is_set():
        pubsub = redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(CHANGED_CHANNEL)
            on_reset()
            backoff = 0.1
            while not stopping.is_set():
                message = await pubsub.get_message(timeout=0.5)
                if message is None:
                    continue
                try:
                    on_change(int(message["data"]))
                except (TypeError, ValueError):
                    log.warning("ignoring malformed change message", extra={"data": message})
        except (RedisError, OSError) as exc:
            log.warning("product-change subscription lost", extra={"error": str(exc)})
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
