"""Admission: batches arriving together share one append, each judged as if it came alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from services.stats.settings import StatsSettings
from services.stats.stream import DeadLetter, EventStream, Refusal
from tests.stats.conftest import Names, backlog


@pytest.fixture(autouse=True)
async def _forget_keys(rds: aioredis.Redis, names: Names) -> AsyncIterator[None]:
    yield
    await rds.delete(names.stream, names.stream + ":backlog", names.stream + ":lag-ms")


def _payload(tag: int, events: int) -> str:
    return "\n".join(f"1|{tag:08d}-0000-4000-8000-{i:012d}|v|1|1|u" for i in range(events))


async def test_concurrent_batches_are_judged_one_by_one_against_the_budget(
    settings_kwargs: dict[str, Any], rds: aioredis.Redis, names: Names
) -> None:
    settings = StatsSettings(
        **settings_kwargs, **names.settings(), stats_max_backlog=5000, stats_max_lag_s=0
    )
    stream = EventStream(rds, settings)
    results = await asyncio.gather(*(stream.admit(_payload(i, 1000), 1000) for i in range(12)))
    assert results.count(None) == 5
    assert results.count(Refusal.BACKLOG) == 7
    # The first five in arrival order fit; everything after is refused, never half-appended.
    assert results[:5] == [None] * 5
    assert await rds.xlen(names.stream) == 5
    assert await backlog(rds, names) == 5000
    entries = await rds.xrange(names.stream)
    assert [int(fields[b"n"]) for _, fields in entries] == [1000] * 5
    assert [fields[b"e"].decode() for _, fields in entries] == [_payload(i, 1000) for i in range(5)]


async def test_a_small_batch_after_a_refused_big_one_still_fits(
    settings_kwargs: dict[str, Any], rds: aioredis.Redis, names: Names
) -> None:
    settings = StatsSettings(
        **settings_kwargs, **names.settings(), stats_max_backlog=1500, stats_max_lag_s=0
    )
    stream = EventStream(rds, settings)
    results = await asyncio.gather(
        stream.admit(_payload(1, 1000), 1000),
        stream.admit(_payload(2, 1000), 1000),
        stream.admit(_payload(3, 500), 500),
    )
    assert results == [None, Refusal.BACKLOG, None]
    assert await backlog(rds, names) == 1500
    assert await rds.xlen(names.stream) == 2


async def test_lagging_writers_refuse_every_batch_of_a_group(
    settings_kwargs: dict[str, Any], rds: aioredis.Redis, names: Names
) -> None:
    settings = StatsSettings(**settings_kwargs, **names.settings(), stats_max_lag_s=1)
    stream = EventStream(rds, settings)
    await rds.set(names.stream + ":lag-ms", 5000)
    results = await asyncio.gather(*(stream.admit(_payload(i, 10), 10) for i in range(4)))
    assert results == [Refusal.LAG] * 4
    assert await rds.exists(names.stream) == 0
    assert await backlog(rds, names) == 0


async def test_a_cancelled_request_appends_nothing(
    settings_kwargs: dict[str, Any], rds: aioredis.Redis, names: Names
) -> None:
    settings = StatsSettings(**settings_kwargs, **names.settings())
    stream = EventStream(rds, settings)
    first = asyncio.ensure_future(stream.admit(_payload(1, 10), 10))
    second = asyncio.ensure_future(stream.admit(_payload(2, 10), 10))
    third = asyncio.ensure_future(stream.admit(_payload(3, 10), 10))
    await asyncio.sleep(0)  # all three queued; the first is on its way alone
    third.cancel()
    assert await first is None
    assert await second is None
    assert third.cancelled()
    await asyncio.sleep(0.05)
    entries = await rds.xrange(names.stream)
    assert [fields[b"e"].decode() for _, fields in entries] == [_payload(1, 10), _payload(2, 10)]
    assert await backlog(rds, names) == 20


async def test_the_dead_letter_stream_keeps_the_newest_up_to_its_cap(
    settings_kwargs: dict[str, Any], rds: aioredis.Redis, names: Names
) -> None:
    settings = StatsSettings(**settings_kwargs, **names.settings(), stats_dead_letter_max=100)
    stream = EventStream(rds, settings)
    try:
        for start in range(0, 250, 50):
            letters = [
                DeadLetter(f"{i}-0", f"payload-{i}", "boom", 5) for i in range(start, start + 50)
            ]
            await stream.dead_letter(letters, consumer="c1")
        assert await rds.xlen(names.dead) == 100
        kept = [fields[b"payload"].decode() for _, fields in await rds.xrange(names.dead)]
        assert kept == [f"payload-{i}" for i in range(150, 250)]
    finally:
        await rds.delete(names.dead)
