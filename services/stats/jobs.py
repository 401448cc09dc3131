"""The writer job: one consumer of the event stream per stats worker process.

The lifespan starts it and stops it. It runs on a thread of its own with its own
event loop, Redis client and Postgres connection, so a flood of requests on the
serving loop cannot starve it (the requests' callbacks would otherwise queue
ahead of every step of a batch). Its loop: reclaim entries idle past the min-idle
time (XAUTOCLAIM: crashed or stuck consumers, this one included), read new
entries (XREADGROUP COUNT/BLOCK) until the batch holds `stats_batch_size` events
or `stats_flush_interval_s` passed since its first entry, write them (see
services.stats.writer). A second loop trims acknowledged history, publishes the
backlog figures (Prometheus gauges, and the lag admission reads) and forgets idle
consumers that own nothing. On stop it writes what it holds, drains the stream
for up to `stats_shutdown_drain_s`, and leaves the group if it owns nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import socket
import threading

import uvloop
from redis.asyncio import Redis

from services.common.outage import OutageLog
from services.common.redis import make_client
from services.stats import metrics
from services.stats.settings import StatsSettings
from services.stats.stream import Entry, EventStream
from services.stats.writer import BatchWriter, is_transient

log = logging.getLogger("shopstack.stats.writer")

_BLOCK_MS_MAX = 200  # also how long a stop request may wait for a read
_READ_COUNT_MAX = 20  # entries per read (an entry holds <= 1000 events)
_START_TIMEOUT_S = 10.0


class Writer:
    """The writer thread; `start` from the lifespan, `await stop()` on shutdown."""

    def __init__(self, settings: StatsSettings) -> None:
        self.settings = settings
        base = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        # Each consumer has its own name: ownership checks tell them apart.
        self.consumers = [f"{base}-{i}" for i in range(settings.stats_consumers_per_process)]
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._started = threading.Event()

    # --- lifecycle (called from the serving loop) ---------------------------------

    def start(self) -> None:
        """Start the thread and wait until its loop runs."""
        self._thread = threading.Thread(target=self._thread_main, name="stats-writer", daemon=True)
        self._thread.start()
        if not self._started.wait(_START_TIMEOUT_S) or self._stopping is None:
            raise RuntimeError("the stats writer thread did not start")
        log.info("writer started", extra={"consumers": self.consumers})

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def stop(self) -> None:
        """Ask the thread to flush, drain and leave; wait for it (bounded)."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None or loop is None or stopping is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already closed: it is stopping
            loop.call_soon_threadsafe(stopping.set)
        bound = self.settings.stats_shutdown_drain_s + 2 * self.settings.db_command_timeout_s + 3
        await asyncio.to_thread(thread.join, bound)
        if thread.is_alive():
            # Its entries stay pending and are reclaimed by another writer: nothing is lost.
            log.error("writer did not stop in time", extra={"consumers": self.consumers})
        else:
            log.info("writer stopped", extra={"consumers": self.consumers})

    def _thread_main(self) -> None:
        loop = uvloop.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:
            log.exception("writer thread failed")
        finally:
            self._started.set()  # never leave start() waiting on a thread that died early
            loop.close()

    async def _main(self) -> None:
        self._stopping = stopping = asyncio.Event()
        # Its own client: blocking reads need a socket timeout longer than the block.
        redis: Redis = make_client(
            self.settings.model_copy(
                update={
                    "redis_timeout_s": max(self.settings.redis_timeout_s, 3.0),
                    "redis_pool_max": 2 + 2 * len(self.consumers),
                }
            )
        )
        stream = EventStream(redis, self.settings)
        writers = [
            BatchWriter(settings=self.settings, stream=stream, consumer=name, stopping=stopping)
            for name in self.consumers
        ]
        self._started.set()
        log.info("writer thread running", extra={"native_thread_id": threading.get_native_id()})
        try:
            await asyncio.gather(
                self._maintain_loop(writers[0]),
                *(ConsumerLoop(self.settings, batches).run() for batches in writers),
            )
            for name in self.consumers:
                try:
                    async with asyncio.timeout(2.0):
                        await stream.leave(name)
                except Exception as exc:
                    log.warning("could not leave the consumer group", extra={"error": repr(exc)})
        finally:
            for batches in writers:
                await batches.close()
            await redis.aclose()
            await redis.connection_pool.aclose()

    # --- maintenance ------------------------------------------------------------------

    async def _maintain_loop(self, batches: BatchWriter) -> None:
        interval = self.settings.stats_maintenance_interval_s
        reap_ms = int(self.settings.stats_consumer_reap_idle_s * 1000)
        errors = OutageLog(log, "stats-maintenance", expected=is_transient)
        while not batches.stopping.is_set():
            try:
                backlog = await batches.stream.maintain(batches.consumer, reap_idle_ms=reap_ms)
            except Exception as exc:
                errors.failed("stream maintenance failed", exc)
            else:
                errors.succeeded()
                metrics.STREAM_LENGTH.set(backlog.length)
                metrics.BACKLOG_EVENTS.set(backlog.events)
                metrics.PENDING.set(backlog.pending)
                metrics.UNDELIVERED.set(backlog.undelivered)
                metrics.CONSUMER_LAG.set(backlog.lag_s)
                metrics.DEAD_LETTER_LENGTH.set(backlog.dead_letters)
                if backlog.reaped:
                    log.info("forgot idle consumers", extra={"count": backlog.reaped})
            await batches.pause(interval)


class ConsumerLoop:
    """One consumer: reclaim, read a batch, write it; again until asked to stop."""

    def __init__(self, settings: StatsSettings, batches: BatchWriter) -> None:
        self.settings = settings
        self.batches = batches
        self._next_claim = 0.0
        self._entry_size = 100.0  # running mean of events per entry

    async def run(self) -> None:
        """The loop; after a stop request, drain the stream for a bounded time."""
        attempt = 0
        errors = OutageLog(log, "stats-consumer", expected=is_transient)
        while not self.batches.stopping.is_set():
            try:
                await self._cycle()
                attempt = 0
            except Exception as exc:  # the loop outlives every failure; entries stay pending
                self.batches.note_failure(exc)
                await self.batches.close()
                errors.failed("writer cycle failed", exc, {"consumer": self.batches.consumer})
                await self.batches.pause(self.batches.backoff(attempt))
                attempt += 1
            else:
                errors.succeeded()
        try:
            await self._drain()
        except Exception as exc:
            log.warning("shutdown drain stopped early", extra={"error": repr(exc)})

    async def _cycle(self) -> None:
        await self.batches.ensure_group()
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_claim:
            self._next_claim = loop.time() + self.settings.stats_claim_min_idle_s / 2
            await self._reclaim()
        held = await self._collect()
        if held:
            await self.batches.process(held)

    async def _collect(self) -> list[Entry]:
        """Read new entries until the batch is full, the flush interval passed, or stop."""
        loop = asyncio.get_running_loop()
        target = self.settings.stats_batch_size
        held: list[Entry] = []
        events = 0
        deadline: float | None = None
        while events < target and not self.batches.stopping.is_set():
            now = loop.time()
            if deadline is None:
                wait_s = min(_BLOCK_MS_MAX / 1000, max(0.0, self._next_claim - now))
            else:
                wait_s = min(_BLOCK_MS_MAX / 1000, deadline - now)
                if wait_s <= 0:
                    break
            # Entries hold 1..1000 events: ask for about what fills the batch, never many.
            count = max(1, min(_READ_COUNT_MAX, math.ceil((target - events) / self._entry_size)))
            entries = await self.batches.stream.read(
                self.batches.consumer, count=count, block_ms=max(1, int(wait_s * 1000))
            )
            if entries:
                if deadline is None:
                    deadline = loop.time() + self.settings.stats_flush_interval_s
                held.extend(entries)
                for entry in entries:
                    events += entry.size
                    self._entry_size = 0.9 * self._entry_size + 0.1 * max(1, entry.size)
            elif deadline is None:
                break  # idle: go round the loop (reclaim, stop checks)
        return held

    async def _reclaim(self) -> None:
        """Take over entries idle past the min-idle time (crashed or stuck consumers)."""
        min_idle_ms = int(self.settings.stats_claim_min_idle_s * 1000)
        cursor = "0-0"
        while not self.batches.stopping.is_set():
            cursor, entries = await self.batches.stream.claim(
                self.batches.consumer, min_idle_ms=min_idle_ms, cursor=cursor, count=_READ_COUNT_MAX
            )
            if entries:
                log.info("reclaimed entries", extra={"count": len(entries)})
                await self.batches.process(entries)
            if cursor == "0-0":
                return

    async def _drain(self) -> None:
        """On shutdown: write what is already in the stream, for a bounded time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.stats_shutdown_drain_s
        while loop.time() < deadline:
            entries = await self.batches.stream.read(
                self.batches.consumer, count=_READ_COUNT_MAX, block_ms=None
            )
            if not entries:
                return
            await self.batches.process(entries)
