"""The writer: moves accepted events from the stream into Postgres and the aggregates.

One writer runs in each stats worker process, as a consumer of one consumer group,
so several processes share the stream. A batch is written as:
binary COPY into a temporary staging table -> INSERT .. SELECT .. ON CONFLICT
(event_id) DO NOTHING -> COMMIT -> one Redis script that acks each entry this
writer still owns and counts its event in the aggregates. An entry is acked only
after its event is committed, so a crash at any moment loses nothing: the entry
stays pending, another writer (or this one after a restart) reclaims it with
XAUTOCLAIM once it has been idle long enough, and the insert is a no-op the
second time. An entry that keeps failing on its own is moved to the dead-letter
stream after `stats_max_deliveries` deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.redis import make_client
from services.stats import metrics, storage
from services.stats.buckets import Tiers
from services.stats.events import EPOCH, CorruptEntry, Event, decode
from services.stats.settings import StatsSettings
from services.stats.stream import Entry, EventStream

log = logging.getLogger("shopstack.stats.writer")

_TRANSIENT_TYPES = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.TooManyConnectionsError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.QueryCanceledError,
    asyncpg.OperatorInterventionError,
    asyncpg.InsufficientResourcesError,
    RedisConnectionError,
    RedisTimeoutError,
)
_TRANSIENT_REDIS_REPLIES = ("NOGROUP", "BUSY", "LOADING", "MASTERDOWN", "READONLY", "OOM")
_BLOCK_MS_MAX = 500


class InjectedFault(Exception):
    """The test-only poison hook (stats_fault_poison_user_id) refused a write."""


def is_transient(exc: BaseException) -> bool:
    """True when retrying later may succeed (a dependency is down or busy)."""
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REDIS_REPLIES)


class PermanentFailure(Exception):
    """Writing these entries failed for a reason retrying the same batch cannot fix."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class Writer:
    """One consumer of the event stream; `start` in the lifespan, `stop` on shutdown."""

    def __init__(self, *, settings: StatsSettings, pool: asyncpg.Pool) -> None:
        self.settings = settings
        self.pool = pool
        # Its own client: blocking reads need a socket timeout longer than the block.
        self.redis: Redis = make_client(
            settings.model_copy(
                update={"redis_timeout_s": max(settings.redis_timeout_s, 3.0), "redis_pool_max": 4}
            )
        )
        self.stream = EventStream(self.redis, settings)
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.tiers = Tiers(settings.stats_fine_window_s)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._conn: PoolConnectionProxy | None = None
        self._group_ready = False
        self._next_claim = 0.0

    # --- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Start the write loop and the maintenance loop."""
        self._tasks = [
            asyncio.create_task(self._run(), name="stats-writer"),
            asyncio.create_task(self._maintain_loop(), name="stats-maintenance"),
        ]
        log.info("writer started", extra={"consumer": self.consumer})

    @property
    def is_running(self) -> bool:
        return bool(self._tasks) and not any(task.done() for task in self._tasks)

    async def stop(self) -> None:
        """Flush what is held, drain the stream for up to stats_shutdown_drain_s, leave."""
        self._stopping.set()
        bound = self.settings.stats_shutdown_drain_s + 2 * self.settings.db_command_timeout_s
        done, pending = await asyncio.wait(self._tasks, timeout=bound)
        for task in pending:  # a hung call past the bound: its entries stay pending (safe)
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("writer task failed", exc_info=task.exception())
        try:
            async with asyncio.timeout(2.0):
                await self.stream.leave(self.consumer)
        except Exception as exc:
            log.warning("could not leave the consumer group", extra={"error": str(exc)})
        await self._release_connection()
        await self.redis.aclose()
        await self.redis.connection_pool.aclose()
        log.info("writer stopped", extra={"consumer": self.consumer})

    async def _pause(self, seconds: float) -> None:
        """Sleep, waking early when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0, min(self.settings.stats_retry_backoff_max_s, 0.05 * 2**attempt))

    # --- main loop ---------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping.is_set():
            try:
                await self._cycle()
                attempt = 0
            except Exception as exc:  # the loop outlives every failure; entries stay pending
                self._note_failure(exc)
                await self._release_connection()
                log.warning("writer cycle failed", extra={"error": repr(exc)})
                await self._pause(self._backoff(attempt))
                attempt += 1
        try:
            await self._drain()
        except Exception as exc:
            log.warning("shutdown drain stopped early", extra={"error": repr(exc)})

    def _note_failure(self, exc: BaseException) -> None:
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            self._group_ready = False  # the stream or group was deleted: recreate it

    async def _ensure_group(self) -> None:
        if not self._group_ready:
            await self.stream.ensure_group()
            self._group_ready = True

    async def _cycle(self) -> None:
        await self._ensure_group()
        loop = asyncio.get_running_loop()
        if loop.time() >= self._next_claim:
            self._next_claim = loop.time() + self.settings.stats_claim_min_idle_s / 2
            await self._reclaim()
        batch = await self._collect()
        if batch:
            await self._process(batch)

    async def _collect(self) -> list[Entry]:
        """Read new entries until the batch is full, the flush interval passed, or stop."""
        loop = asyncio.get_running_loop()
        size = self.settings.stats_batch_size
        held: list[Entry] = []
        deadline: float | None = None
        while len(held) < size and not self._stopping.is_set():
            now = loop.time()
            if deadline is None:
                wait_s = min(_BLOCK_MS_MAX / 1000, max(0.0, self._next_claim - now))
            else:
                wait_s = min(_BLOCK_MS_MAX / 1000, deadline - now)
                if wait_s <= 0:
                    break
            entries = await self.stream.read(
                self.consumer, count=size - len(held), block_ms=max(1, int(wait_s * 1000))
            )
            if entries:
                if deadline is None:
                    deadline = loop.time() + self.settings.stats_flush_interval_s
                held.extend(entries)
            elif deadline is None:
                break  # idle: go round the loop (reclaim, stop checks)
        return held

    async def _reclaim(self) -> None:
        """Take over entries idle past the min-idle time (crashed or stuck consumers)."""
        min_idle_ms = int(self.settings.stats_claim_min_idle_s * 1000)
        cursor = "0-0"
        while not self._stopping.is_set():
            cursor, entries = await self.stream.claim(
                self.consumer,
                min_idle_ms=min_idle_ms,
                cursor=cursor,
                count=self.settings.stats_batch_size,
            )
            if entries:
                log.info("reclaimed entries", extra={"count": len(entries)})
                await self._process(entries)
            if cursor == "0-0":
                return

    async def _drain(self) -> None:
        """On shutdown: write what is already in the stream, for a bounded time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.stats_shutdown_drain_s
        while loop.time() < deadline:
            entries = await self.stream.read(
                self.consumer, count=self.settings.stats_batch_size, block_ms=None
            )
            if not entries:
                return
            await self._process(entries, retry_transient=False)

    # --- one batch ---------------------------------------------------------------

    async def _process(self, entries: Sequence[Entry], *, retry_transient: bool = True) -> None:
        decoded: list[tuple[Entry, Event]] = []
        for entry in entries:
            try:
                if entry.payload is None:
                    raise CorruptEntry("entry has no payload")
                decoded.append((entry, decode(entry.payload)))
            except CorruptEntry as exc:
                # Decoding is deterministic: no retry can help, dead-letter it now.
                await self._dead_letter(entry, str(exc), await self._deliveries(entry))
        if decoded:
            await self._settle(decoded, retry_transient=retry_transient)

    async def _settle(self, batch: list[tuple[Entry, Event]], *, retry_transient: bool) -> None:
        """Write a batch; on a permanent error, split it until the failing entries stand alone."""
        try:
            await self._write_retrying(batch, retry_transient=retry_transient)
        except PermanentFailure as failure:
            if len(batch) == 1:
                await self._failed(batch[0][0], failure)
                return
            middle = len(batch) // 2
            await self._settle(batch[:middle], retry_transient=retry_transient)
            await self._settle(batch[middle:], retry_transient=retry_transient)

    async def _write_retrying(
        self, batch: list[tuple[Entry, Event]], *, retry_transient: bool
    ) -> None:
        """Write, retrying in place while a dependency is down; PermanentFailure otherwise."""
        attempt = 0
        while True:
            try:
                await self._ensure_group()
                await self._write(batch)
                return
            except Exception as exc:
                if not is_transient(exc):
                    metrics.WRITE_FAILURES.labels("permanent").inc()
                    raise PermanentFailure(exc) from exc
                metrics.WRITE_FAILURES.labels("transient").inc()
                self._note_failure(exc)
                await self._release_connection()
                log.warning(
                    "batch write failed, will retry",
                    extra={"error": repr(exc), "events": len(batch), "attempt": attempt},
                )
                if not retry_transient or self._stopping.is_set():
                    return  # entries stay pending; a writer reclaims them later
                await self._pause(self._backoff(attempt))
                attempt += 1

    async def _write(self, batch: list[tuple[Entry, Event]]) -> None:
        started = time.perf_counter()
        settings = self.settings
        if settings.stats_fault_write_delay_s:
            await asyncio.sleep(settings.stats_fault_write_delay_s)
        rows: list[storage.StagedEvent] = [
            (
                event.event_id,
                event.type,
                event.product_id,
                event.user_id,
                event.ts,
                EPOCH + timedelta(milliseconds=entry.received_ms),
                entry.id,
            )
            for entry, event in batch
        ]
        redelivered = any(entry.redelivered for entry, _ in batch)
        conn = await self._connection()
        async with conn.transaction():
            await storage.stage(conn, rows)
            poison = settings.stats_fault_poison_user_id
            if poison is not None and any(event.user_id == poison for _, event in batch):
                raise InjectedFault(f"injected fault: events of user {poison!r} always fail")
            inserted = await storage.insert_staged(conn)
            owners = set(await storage.staged_owners(conn)) if redelivered else set(inserted)
        specs, too_old = self._count_specs(batch, owners)
        result = await self.stream.ack_and_count(
            self.consumer,
            prefix=settings.stats_key_prefix,
            fine_keep_s=self.tiers.fine_keep_s,
            coarse_keep_s=self.tiers.coarse_keep_s,
            specs=specs,
        )
        metrics.EVENTS_STORED.labels("inserted").inc(len(inserted))
        metrics.EVENTS_STORED.labels("duplicate").inc(len(batch) - len(inserted))
        metrics.EVENTS_TOO_OLD.inc(too_old)
        metrics.BATCH_SIZE.observe(len(batch))
        metrics.FLUSH_LATENCY.observe(time.perf_counter() - started)
        if result.foreign:
            log.info("entries taken over by another writer", extra={"count": result.foreign})

    def _count_specs(
        self, batch: list[tuple[Entry, Event]], owners: set[str]
    ) -> tuple[list[str | int], int]:
        """Script arguments: each entry, and its event when this entry's insert won."""
        now_s = int(time.time())
        specs: list[str | int] = []
        too_old = 0
        for entry, event in batch:
            if entry.id not in owners:
                specs += [entry.id, "", "", "", "", ""]
                continue
            second = self.tiers.fine_bucket(event.ts_us, now_s)
            minute = self.tiers.coarse_bucket(event.ts_us, now_s)
            if second is None and minute is None:
                too_old += 1
                specs += [entry.id, "", "", "", "", ""]
                continue
            specs += [
                entry.id,
                event.code,
                event.product_id,
                "" if second is None else second,
                "" if minute is None else minute,
                event.user_id,
            ]
        return specs, too_old

    async def _deliveries(self, entry: Entry) -> int:
        _, deliveries = await self.stream.deliveries(entry.id)
        return deliveries

    async def _failed(self, entry: Entry, failure: PermanentFailure) -> None:
        """An entry failed alone: dead-letter it after enough deliveries, else leave it."""
        owner, deliveries = await self.stream.deliveries(entry.id)
        if owner != self.consumer:
            return  # another writer owns it now (or it was acked meanwhile)
        if deliveries >= self.settings.stats_max_deliveries:
            await self._dead_letter(entry, str(failure), deliveries)
            return
        log.warning(
            "entry failed; left pending for redelivery",
            extra={"entry_id": entry.id, "deliveries": deliveries, "error": str(failure)},
        )

    async def _dead_letter(self, entry: Entry, error: str, deliveries: int) -> None:
        await self.stream.dead_letter(
            entry, consumer=self.consumer, error=error, deliveries=deliveries
        )
        metrics.DEAD_LETTERED.inc()
        log.error(
            "entry moved to the dead-letter stream",
            extra={"entry_id": entry.id, "deliveries": deliveries, "error": error},
        )

    # --- Postgres connection -------------------------------------------------------

    async def _connection(self) -> PoolConnectionProxy:
        if self._conn is None:
            conn = await self.pool.acquire(timeout=self.settings.db_command_timeout_s)
            try:
                await storage.create_staging(conn)
            except BaseException:
                await self.pool.release(conn)
                raise
            self._conn = conn
        return self._conn

    async def _release_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await self.pool.release(conn, timeout=2.0)
            except Exception as exc:
                log.warning("connection release failed", extra={"error": repr(exc)})

    # --- maintenance ---------------------------------------------------------------

    async def _maintain_loop(self) -> None:
        interval = self.settings.stats_maintenance_interval_s
        reap_ms = int(self.settings.stats_consumer_reap_idle_s * 1000)
        while not self._stopping.is_set():
            try:
                backlog = await self.stream.maintain(self.consumer, reap_idle_ms=reap_ms)
            except Exception as exc:
                log.warning("stream maintenance failed", extra={"error": repr(exc)})
            else:
                metrics.STREAM_LENGTH.set(backlog.length)
                metrics.PENDING.set(backlog.pending)
                metrics.UNDELIVERED.set(backlog.undelivered)
                metrics.CONSUMER_LAG.set(backlog.lag_s)
                metrics.DEAD_LETTER_LENGTH.set(backlog.dead_letters)
                if backlog.reaped:
                    log.info("forgot idle consumers", extra={"count": backlog.reaped})
            await self._pause(interval)
