"""The writer: poison events (SHD-5), corrupt entries, shared work, trimming, leaving."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from services.stats.settings import StatsSettings
from services.stats.stream import EventStream
from tests.stats.conftest import (
    JSON,
    Names,
    backlog,
    body,
    brute_force,
    event,
    pending_count,
    span,
    stored,
    wait_for,
)
from tests.support.faultproxy import FaultProxy


@pytest.mark.slow
async def test_shd5_poison_event_goes_to_the_dead_letter_stream_after_5_deliveries(
    stats_app: Any, pg: asyncpg.Connection, rds: aioredis.Redis, names: Names, pid_base: int
) -> None:
    """SHD-5: 1 event always fails among 10,000: dead-lettered after 5 deliveries, 9,999 stored."""
    product_id = pid_base + 1
    events = [event(product_id, user_id=f"u{i % 500}") for i in range(10_000)]
    poison = events[4321]
    poison["user_id"] = "poison"
    async with stats_app(stats_fault_poison_user_id="poison", stats_batch_size=500) as client:
        for start in range(0, 10_000, 100):
            resp = await client.post(
                "/api/v1/events", content=body(events[start : start + 100]), headers=JSON
            )
            assert resp.status_code == 202

        async def dead_lettered() -> bool:
            return await rds.xlen(names.dead) >= 1

        await wait_for(dead_lettered, timeout_s=30)
        good = [e["event_id"] for e in events if e is not poison]

        async def settled() -> bool:
            return await stored(pg, good) == 9_999 and await backlog(rds, names) == 0

        await wait_for(settled, timeout_s=10)
        letters = await rds.xrange(names.dead)
        assert len(letters) == 1
        fields = {k.decode(): v.decode() for k, v in letters[0][1].items()}
        assert fields["deliveries"] == "5"
        assert "injected fault" in fields["error"]
        assert poison["event_id"] in fields["payload"]
        assert await stored(pg, [poison["event_id"]]) == 0
        assert await pending_count(rds, names) == 0
        # The poison's 99 neighbours in its entry are counted once the entry is settled.
        doc = (await client.get(f"/api/v1/stats/products/{product_id}?window=300")).json()
        start, end = span(doc)
        assert doc["views"] == (await brute_force(pg, product_id, start, end))["views"] == 9_999
        metrics = (await client.get("/metrics")).text
        assert "shopstack_stats_dead_lettered_total 1.0" in metrics


async def test_corrupt_entry_is_dead_lettered_at_once(
    stats: httpx.AsyncClient, pg: asyncpg.Connection, rds: aioredis.Redis, names: Names
) -> None:
    await rds.incrby(names.stream + ":backlog", 3)
    await rds.xadd(names.stream, {"n": "3", "e": b"\xff\xfe not an event"})

    async def dead_lettered() -> bool:
        return await rds.exists(names.dead) == 1 and await rds.xlen(names.dead) == 1

    await wait_for(dead_lettered, timeout_s=5)
    fields = (await rds.xrange(names.dead))[0][1]
    assert fields[b"deliveries"] == b"1"
    assert b"UTF-8" in fields[b"error"]
    await wait_for(lambda: _is(backlog(rds, names), 0), timeout_s=5)
    assert await pending_count(rds, names) == 0


async def _is(value: Any, expected: int) -> bool:
    return int(await value) == expected


async def test_several_writers_share_the_stream(
    stats_app: Any, pg: asyncpg.Connection, rds: aioredis.Redis, names: Names, pid_base: int
) -> None:
    """Two processes' worth of writers (2 apps x 2 consumers) split the entries between them."""
    owners: set[str] = set()
    events = [event(pid_base, user_id=f"u{i}") for i in range(6_000)]
    slow = {"stats_fault_write_delay_s": 0.05, "stats_batch_size": 200}
    async with stats_app(**slow) as first, stats_app(**slow) as second:

        async def watch() -> None:
            while True:
                summary = await rds.xpending(names.stream, names.group)
                owners.update(c["name"].decode() for c in summary["consumers"])
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        for i, start in enumerate(range(0, 6_000, 100)):
            client = first if i % 2 else second
            await client.post(
                "/api/v1/events", content=body(events[start : start + 100]), headers=JSON
            )
        ids = [e["event_id"] for e in events]

        async def done() -> bool:
            return await stored(pg, ids) == 6_000 and await backlog(rds, names) == 0

        await wait_for(done, timeout_s=30)
        watcher.cancel()
    assert len(owners) >= 3  # entries were pending with at least three distinct consumers
    # Each consumer left the group on shutdown: nothing owned, nothing left behind.
    assert await rds.xinfo_consumers(names.stream, names.group) == []


async def test_acknowledged_history_is_trimmed(
    stats: httpx.AsyncClient, pg: asyncpg.Connection, rds: aioredis.Redis, names: Names
) -> None:
    events = [event(1, user_id=f"u{i}") for i in range(600)]
    for start in range(0, 600, 2):  # 300 small entries: several stream nodes
        await stats.post("/api/v1/events", content=body(events[start : start + 2]), headers=JSON)
    await wait_for(lambda: _is(backlog(rds, names), 0), timeout_s=10)

    async def trimmed() -> bool:
        return await rds.xlen(names.stream) <= 100  # only the last (partial) node remains

    await wait_for(trimmed, timeout_s=5)
    assert await stored(pg, [e["event_id"] for e in events]) == 600


async def test_maintenance_forgets_idle_empty_consumers_only(
    settings_kwargs: dict[str, Any], rds: aioredis.Redis, names: Names
) -> None:
    settings = StatsSettings(**settings_kwargs, **names.settings())
    stream = EventStream(rds, settings)
    await stream.ensure_group()
    await rds.xadd(names.stream, {"n": "1", "e": "x"})
    await rds.xgroup_createconsumer(names.stream, names.group, "ghost")
    await stream.read("busy", count=1, block_ms=None)  # 'busy' now owns one entry
    await asyncio.sleep(0.05)
    backlog_info = await stream.maintain("me", reap_idle_ms=10)
    assert backlog_info.reaped == 1
    left = {c["name"].decode() for c in await rds.xinfo_consumers(names.stream, names.group)}
    assert left == {"busy"}
    assert backlog_info.pending == 1
    assert backlog_info.oldest_unacked_ms is not None
    assert backlog_info.lag_s >= 0
    # Nothing below the oldest pending entry is trimmed, however old.
    assert await rds.xlen(names.stream) == 1
    assert await stream.leave("busy") is False  # owns an entry: stays


async def test_transient_errors_are_told_apart() -> None:
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import ResponseError

    from services.stats.writer import InjectedFault, is_transient

    assert is_transient(OSError("refused"))
    assert is_transient(asyncpg.DeadlockDetectedError("x"))
    assert is_transient(asyncpg.CannotConnectNowError("x"))
    assert is_transient(RedisConnectionError("x"))
    assert is_transient(ResponseError("NOGROUP No such key"))
    assert not is_transient(ResponseError("ERR wrong number of arguments"))
    assert not is_transient(asyncpg.DataError("bad"))
    assert not is_transient(asyncpg.CheckViolationError("bad"))
    assert not is_transient(InjectedFault("poison"))


async def test_too_old_for_windows_but_valid_is_still_stored(
    stats: httpx.AsyncClient, pg: asyncpg.Connection, rds: aioredis.Redis, names: Names
) -> None:
    old = event(7, ts=datetime.now(UTC) - timedelta(days=6, hours=23))
    resp = await stats.post("/api/v1/events", content=body([old]), headers=JSON)
    assert resp.status_code == 202

    async def one() -> bool:
        return await stored(pg, [old["event_id"]]) == 1

    await wait_for(one, timeout_s=5)
    assert "shopstack_stats_events_unaggregated_total" in (await stats.get("/metrics")).text


async def test_a_postgres_outage_is_one_warning_per_writer_then_one_recovery(
    stats_app: Any,
    settings_kwargs: dict[str, Any],
    pg: asyncpg.Connection,
    pid_base: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While Postgres is away the writer retries every ~50 ms and keeps what it accepted;
    its log says so once (no trace), then once when it is back, and then it stores all."""
    caplog.set_level(logging.INFO, logger="shopstack.stats.writer")

    def writer_records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "job", "").startswith("stats-write:")]

    async with FaultProxy.for_url(settings_kwargs["database_url"]) as proxy:
        app = stats_app(database_url=proxy.url, stats_retry_backoff_max_s=0.05)
        async with app as client:
            proxy.reset_peer()  # every connection, live or new, is reset
            events = [event(pid_base + 1, user_id=f"u{i}") for i in range(200)]
            resp = await client.post("/api/v1/events", content=body(events), headers=JSON)
            assert resp.status_code == 202
            accepted = proxy.accepted

            async def many_retries() -> bool:
                return proxy.accepted >= accepted + 15

            await wait_for(many_retries, timeout_s=15)
            during = writer_records()
            assert len(during) == 1
            assert during[0].levelno == logging.WARNING
            assert during[0].exc_info is None
            assert during[0].getMessage() == "write failed, will retry: a store did not answer"

            proxy.clear()
            ids = [e["event_id"] for e in events]

            async def all_stored() -> bool:
                return await stored(pg, ids) == 200

            await wait_for(all_stored, timeout_s=10)

            async def recovery_logged() -> bool:  # once the writer's round, after the commit, ends
                return len(writer_records()) > 1

            await wait_for(recovery_logged, timeout_s=5)
            recovered = writer_records()[1:]
            assert [r.levelno for r in recovered] == [logging.INFO]
            assert recovered[0].getMessage().endswith("recovered")
            assert recovered[0].failures >= 15  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
