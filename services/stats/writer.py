"""Writing one batch of stream entries: Postgres first, then ack and count in Redis.

A batch is written as: binary COPY into a temporary staging table -> INSERT ..
SELECT .. ON CONFLICT (event_id) DO NOTHING -> COMMIT -> one Redis script that acks
each entry this writer still owns and counts the events it inserted. An entry is
acked only after its events are committed, so a crash at any moment loses
nothing: the entry stays pending, a writer reclaims it, and the insert is a no-op
the second time (the entry then finds the rows it inserted before, by stream_id,
and counts them then).

A batch that fails for a reason retrying cannot fix is split until the failing
entry stands alone, and that entry's events are split until the failing events
stand alone; the others are stored. The failing events wait with their entry
until it has been delivered `stats_max_deliveries` times, then go to the
dead-letter stream with their error, and the entry is acked.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.outage import OutageLog
from services.stats import metrics, storage
from services.stats.buckets import Tiers
from services.stats.events import CorruptEntry, Event, decode_batch
from services.stats.settings import StatsSettings
from services.stats.stream import ALL_EVENTS, DeadLetter, Entry, EventStream

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

T = TypeVar("T")
Parsed = tuple[Entry, list[Event]]


def is_transient(exc: BaseException) -> bool:
    """True when retrying later may succeed (a dependency is down or busy)."""
    if isinstance(exc, _TRANSIENT_TYPES):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REDIS_REPLIES)


class InjectedFault(Exception):
    """The test-only poison hook (stats_fault_poison_user_id) refused a write."""


class PermanentFailure(Exception):
    """Writing these entries failed for a reason retrying the same batch cannot fix."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


class Abandoned(Exception):
    """A write was given up because the writer is stopping; its entries stay pending."""


class BatchWriter:
    """Writes batches for one consumer; owns that consumer's Postgres connection."""

    def __init__(
        self,
        *,
        settings: StatsSettings,
        stream: EventStream,
        consumer: str,
        stopping: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.stream = stream
        self.consumer = consumer
        self.tiers = Tiers(settings.stats_fine_window_s)
        self.stopping = stopping
        self._conn: asyncpg.Connection | None = None
        self._group_ready = False
        self.errors = OutageLog(log, f"stats-write:{consumer}", expected=is_transient)

    # --- helpers shared with the loops ---------------------------------------------

    async def pause(self, seconds: float) -> None:
        """Sleep, waking early when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)

    def backoff(self, attempt: int) -> float:
        """Full-jitter exponential backoff, capped."""
        return random.uniform(0, min(self.settings.stats_retry_backoff_max_s, 0.05 * 2**attempt))

    def note_failure(self, exc: BaseException) -> None:
        if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
            self._group_ready = False  # the stream or group was deleted: recreate it

    async def ensure_group(self) -> None:
        if not self._group_ready:
            await self.stream.ensure_group()
            self._group_ready = True

    async def close(self) -> None:
        """Close the Postgres connection (it is reopened on the next write)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout=2.0)
            except Exception:
                conn.terminate()

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            settings = self.settings
            conn = await asyncpg.connect(
                settings.require_database_url(),
                timeout=settings.db_command_timeout_s,
                command_timeout=settings.db_command_timeout_s,
            )
            try:
                await storage.create_staging(conn)
            except BaseException:
                conn.terminate()
                raise
            self._conn = conn
        return self._conn

    # --- the batch ------------------------------------------------------------------

    async def process(self, entries: Sequence[Entry]) -> None:
        """Write entries as read or reclaimed; leaves them pending when stopping meanwhile."""
        batch: list[Parsed] = []
        corrupt: list[tuple[Entry, str]] = []
        for entry in entries:
            try:
                events = decode_batch(
                    entry.payload, stream_id=entry.id, received_ms=entry.received_ms
                )
                batch.append((entry, events))
            except CorruptEntry as exc:
                corrupt.append((entry, str(exc)))
        try:
            for entry, error in corrupt:
                # Decoding is deterministic: no retry can help, dead-letter it now.
                await self._retrying(functools.partial(self._reject, entry, error))
            if batch:
                await self._settle(batch)
        except Abandoned:
            log.info("stopping with entries left pending", extra={"entries": len(batch)})

    async def _settle(self, batch: list[Parsed]) -> None:
        """Commit a batch; on a permanent error, split it until the failing entry stands alone."""
        try:
            await self._retrying(lambda: self._commit(batch))
        except PermanentFailure as failure:
            if len(batch) > 1:
                middle = len(batch) // 2
                await self._settle(batch[:middle])
                await self._settle(batch[middle:])
            else:
                await self._settle_entry(*batch[0], failure)

    async def _retrying(self, action: Callable[[], Awaitable[T]]) -> T:
        """Run `action`, retrying in place while a dependency is down.

        PermanentFailure when retrying the same thing cannot help; Abandoned when
        asked to stop meanwhile (the entries stay pending for a later reclaim).
        """
        attempt = 0
        while True:
            try:
                await self.ensure_group()
                result = await action()
            except (PermanentFailure, Abandoned):
                raise
            except Exception as exc:
                if not is_transient(exc):
                    metrics.WRITE_FAILURES.labels("permanent").inc()
                    raise PermanentFailure(exc) from exc
                metrics.WRITE_FAILURES.labels("transient").inc()
                self.note_failure(exc)
                await self.close()
                self.errors.failed("write failed, will retry", exc, {"try": attempt})
                if self.stopping.is_set():
                    raise Abandoned from exc
                await self.pause(self.backoff(attempt))
                attempt += 1
            else:
                self.errors.succeeded()
                return result

    async def _commit(self, batch: list[Parsed]) -> None:
        """Store, then ack and count: the normal path of a batch."""
        started = time.perf_counter()
        if self.settings.stats_fault_write_delay_s:
            await asyncio.sleep(self.settings.stats_fault_write_delay_s)
        rows = [event for _, events in batch for event in events]
        inserted, counted = await self._store(rows)
        await self._ack_and_count(batch, counted)
        metrics.EVENTS_STORED.labels("inserted").inc(inserted)
        metrics.EVENTS_STORED.labels("duplicate").inc(len(rows) - inserted)
        metrics.BATCH_SIZE.observe(len(rows))
        metrics.FLUSH_LATENCY.observe(time.perf_counter() - started)

    async def _store(self, rows: list[Event]) -> tuple[int, set[tuple[str, str]] | None]:
        """One transaction: COPY to staging, insert once per event_id, commit.

        Returns how many rows were new and the (event_id, entry id) pairs whose
        insert their entry won: the events it counts. None stands for every row (the
        common case: all were new, so no pair needs to travel back). Otherwise the
        pairs also hold the rows an interrupted earlier attempt of the same entry
        (or a concurrent writer of it) committed.
        """
        poison = self.settings.stats_fault_poison_user_id
        conn = await self._connection()
        async with conn.transaction():
            await storage.stage(conn, rows)
            if poison is not None and any(row[3] == poison for row in rows):
                raise InjectedFault(f"injected fault: events of user {poison!r} always fail")
            inserted = await storage.insert_staged(conn)
            owned = None if inserted == len(rows) else set(await storage.staged_owners(conn))
        return inserted, owned

    async def _ack_and_count(
        self, batch: list[Parsed], counted: set[tuple[str, str]] | None
    ) -> None:
        """Ack the batch's entries and count `counted` (None: every event of every entry)."""
        now_s = int(time.time())
        tiers = self.tiers
        specs: list[str | int] = []
        too_old = 0
        for entry, events in batch:
            if counted is None:
                specs += [entry.id, entry.size, ALL_EVENTS]  # the script reads the entry itself
                continue
            ops: list[str] = []
            for event in events:
                key = (event.event_id, entry.id)
                if key not in counted:
                    continue
                counted.discard(key)  # an id repeated inside one entry counts once
                second = tiers.fine_bucket(event.ts_us, now_s)
                minute = tiers.coarse_bucket(event.ts_us, now_s)
                if second is None and minute is None:
                    too_old += 1
                    continue
                ops.append(
                    f"{event.code}|{event.product_id}|{'' if second is None else second}|"
                    f"{'' if minute is None else minute}|{event.user_id}"
                )
            specs += [entry.id, entry.size, "\n".join(ops)]
        result = await self.stream.ack_and_count(
            self.consumer,
            prefix=self.settings.stats_key_prefix,
            fine_keep_s=tiers.fine_keep_s,
            coarse_keep_s=tiers.coarse_keep_s,
            now_s=now_s,
            specs=specs,
        )
        metrics.EVENTS_TOO_OLD.inc(too_old + result.too_old)
        if result.foreign:
            log.info("entries taken over by another writer", extra={"count": result.foreign})

    async def _settle_entry(self, entry: Entry, events: list[Event], failure: Exception) -> None:
        """An entry failed alone: store what can be stored, then decide about the rest."""
        failing = await self._isolate(entry, events)
        owner, deliveries = await self._retrying(
            functools.partial(self.stream.deliveries, entry.id)
        )
        if owner != self.consumer:
            return  # another writer took it over (or acked it) meanwhile
        if failing and deliveries < self.settings.stats_max_deliveries:
            log.warning(
                "entry failed; left pending for redelivery",
                extra={"entry_id": entry.id, "deliveries": deliveries, "error": str(failure)},
            )
            return
        if failing:
            letters = [DeadLetter(entry.id, event.line, err, deliveries) for event, err in failing]
            await self._retrying(
                functools.partial(self.stream.dead_letter, letters, consumer=self.consumer)
            )
            metrics.DEAD_LETTERED.inc(len(letters))
            log.error(
                "events moved to the dead-letter stream",
                extra={"entry_id": entry.id, "events": len(letters), "deliveries": deliveries},
            )
        bad = {id(event) for event, _ in failing}
        stored = [event for event in events if id(event) not in bad]
        counted = await self._retrying(lambda: self._owned(entry, stored))
        await self._retrying(lambda: self._ack_and_count([(entry, stored)], counted))

    async def _isolate(self, entry: Entry, events: list[Event]) -> list[tuple[Event, str]]:
        """Store the events that can be stored; return those that fail on their own."""
        try:
            await self._retrying(lambda: self._store(events))
        except PermanentFailure as failure:
            if len(events) == 1:
                return [(events[0], str(failure))]
            middle = len(events) // 2
            head = await self._isolate(entry, events[:middle])
            return head + await self._isolate(entry, events[middle:])
        return []

    async def _owned(self, entry: Entry, events: list[Event]) -> set[tuple[str, str]]:
        conn = await self._connection()
        ids = await storage.owned_by_entry(conn, [event.event_id for event in events], entry.id)
        return {(event_id, entry.id) for event_id in ids}

    async def _reject(self, entry: Entry, error: str) -> None:
        """Dead-letter a corrupt entry whole and ack it."""
        owner, deliveries = await self.stream.deliveries(entry.id)
        if owner != self.consumer:
            return
        letter = DeadLetter(entry.id, entry.payload or b"", error, deliveries)
        await self.stream.dead_letter([letter], consumer=self.consumer)
        await self._ack_and_count([(entry, [])], set())
        metrics.DEAD_LETTERED.inc()
        log.error("corrupt entry moved to the dead-letter stream", extra={"entry_id": entry.id})
