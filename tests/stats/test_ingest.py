"""POST /api/v1/events: whole batches or nothing, durable before 202, budgets, bad input."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from tests.stats.conftest import (
    JSON,
    Names,
    backlog,
    body,
    event,
    pending_count,
    stored,
    wait_for,
)
from tests.support.problems import assert_problem


async def test_batch_is_accepted_and_stored_within_seconds(
    stats: httpx.AsyncClient,
    pg: asyncpg.Connection,
    rds: aioredis.Redis,
    names: Names,
    pid_base: int,
) -> None:
    events = [event(pid_base + i % 7, user_id=f"u{i}") for i in range(1000)]
    resp = await stats.post("/api/v1/events", content=body(events), headers=JSON)
    assert resp.status_code == 202
    assert resp.json() == {"accepted": 1000}
    ids = [e["event_id"] for e in events]

    async def all_stored() -> bool:
        return await stored(pg, ids) == 1000

    assert await wait_for(all_stored, timeout_s=5) < 5
    await wait_for(lambda: _zero(pending_count(rds, names)), timeout_s=5)
    assert await backlog(rds, names) == 0
    row = await pg.fetchrow(
        "SELECT min(received_at) AS r, min(stored_at) AS s FROM stats_events "
        "WHERE event_id = ANY($1::uuid[])",
        ids,
    )
    assert row["r"] <= row["s"]


async def _zero(value: Any) -> bool:
    return int(await value) == 0


def _mutate(index: int, **changes: Any) -> list[dict[str, Any]]:
    events = [event(1, user_id=f"u{i}") for i in range(5)]
    events[index].update(changes)
    return events


NOW = datetime.now(UTC)
BAD_BATCHES: dict[str, tuple[bytes, list[int]]] = {
    "wrong type product_id": (body(_mutate(2, product_id="7")), [2]),
    "fractional product_id": (body(_mutate(1, product_id=7.5)), [1]),
    "bool product_id": (body(_mutate(0, product_id=True)), [0]),
    "zero product_id": (body(_mutate(3, product_id=0)), [3]),
    "unknown type": (body(_mutate(4, type="like")), [4]),
    "bad uuid": (body(_mutate(1, event_id="not-a-uuid")), [1]),
    "uuid without hyphens": (body(_mutate(1, event_id=uuid.uuid4().hex)), [1]),
    "naive ts": (body(_mutate(2, ts="2026-01-01T00:00:00")), [2]),
    "date only ts": (body(_mutate(2, ts="2026-01-01")), [2]),
    "numeric ts": (body(_mutate(2, ts=1_700_000_000)), [2]),
    "garbage ts": (body(_mutate(0, ts="yesterday")), [0]),
    "ts too far ahead": (body(_mutate(3, ts=(NOW + timedelta(hours=1)).isoformat())), [3]),
    "ts too old": (body(_mutate(4, ts=(NOW - timedelta(days=8)).isoformat())), [4]),
    "empty user": (body(_mutate(0, user_id="")), [0]),
    "long user": (body(_mutate(0, user_id="x" * 129)), [0]),
    "control char user": (body(_mutate(1, user_id="a\u0000b")), [1]),
    "user not a string": (body(_mutate(1, user_id=5)), [1]),
    "unknown field": (body(_mutate(2, price_cents=1)), [2]),
    "missing field": (body([{k: v for k, v in event(1).items() if k != "ts"}]), [0]),
    "not an object": (b"[1, 2]", [0, 1]),
    "several bad": (
        body([event(1), {**event(1), "product_id": -1}, event(1), {**event(1), "type": 1}]),
        [1, 3],
    ),
}
BAD_BODIES: dict[str, bytes] = {
    "empty array": b"[]",
    "1001 events": body([event(1, user_id=f"u{i}") for i in range(1001)]),
    "object": body({"events": [event(1)]}),
    "truncated": body([event(1)])[:-5],
    "trailing comma": b'[{"a": 1},]',
    "NaN": b"[NaN]",
    "huge number": b"[1e400]",
    "bad utf-8": b'[{"user_id": "\xff"}]',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "empty body": b"",
    "null": b"null",
}


@pytest.mark.parametrize("case", list(BAD_BATCHES))
async def test_invalid_events_reject_the_whole_batch(
    ingest_only: httpx.AsyncClient, rds: aioredis.Redis, names: Names, case: str
) -> None:
    """IN-10 style: wrong types, unknown fields, bad ids and times refuse the whole batch."""
    raw, failing = BAD_BATCHES[case]
    before = await rds.xlen(names.stream) if await rds.exists(names.stream) else 0
    resp = await ingest_only.post("/api/v1/events", content=raw, headers=JSON)
    doc = assert_problem(resp, 422, "validation-error")
    assert doc["failing_indexes"] == failing
    assert {e["index"] for e in doc["errors"]} == set(failing)
    assert all({"index", "loc", "msg"} <= set(e) for e in doc["errors"])
    after = await rds.xlen(names.stream) if await rds.exists(names.stream) else 0
    assert after == before  # nothing of the batch reached the stream
    assert await backlog(rds, names) == 0


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_malformed_bodies_are_clean_4xx(
    ingest_only: httpx.AsyncClient, rds: aioredis.Redis, names: Names, case: str
) -> None:
    """IN-3: malformed JSON, NaN, 1e400, deep nesting, bad UTF-8: only 4xx, never a 500."""
    resp = await ingest_only.post("/api/v1/events", content=BAD_BODIES[case], headers=JSON)
    assert resp.status_code in (400, 413, 422), resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert "Traceback" not in resp.text
    assert await backlog(rds, names) == 0


async def test_duplicate_member_names_are_refused(ingest_only: httpx.AsyncClient) -> None:
    good = orjson.dumps(event(1)).decode()
    twice = good[:-1] + ',"product_id":2}'
    raw = f"[{good},{twice}]".encode()
    doc = assert_problem(
        await ingest_only.post("/api/v1/events", content=raw, headers=JSON), 422, "validation-error"
    )
    assert doc["failing_indexes"] == [1]
    assert doc["errors"][0]["type"] == "duplicate_key"


async def test_escaped_strings_still_pass(ingest_only: httpx.AsyncClient, pid_base: int) -> None:
    """The fast duplicate-key proof falls back to the exact check on escapes."""
    events = [event(pid_base, user_id='quote " and back\\slash'), event(pid_base, user_id="é")]
    resp = await ingest_only.post("/api/v1/events", content=body(events), headers=JSON)
    assert resp.status_code == 202, resp.text


async def test_upper_case_uuids_are_one_event(
    stats: httpx.AsyncClient, pg: asyncpg.Connection, pid_base: int
) -> None:
    event_id = str(uuid.uuid4())
    first = event(pid_base, event_id=event_id.upper())
    second = event(pid_base, event_id=event_id)
    for one in (first, second):
        resp = await stats.post("/api/v1/events", content=body([one]), headers=JSON)
        assert resp.status_code == 202

    async def one_row() -> bool:
        return await stored(pg, [event_id]) == 1

    await wait_for(one_row, timeout_s=5)


async def test_oversized_body_is_413_and_stores_nothing(
    ingest_only: httpx.AsyncClient, rds: aioredis.Redis, names: Names
) -> None:
    """IN-2: 1 MiB + 1 B with Content-Length, and the same chunked: 413, nothing stored."""
    padding = "x" * 128
    events = [event(1, user_id=padding[:120]) for _ in range(1000)]
    raw = body(events)
    raw = raw[:-1] + b"," + b" " * (1_048_577 - len(raw)) + b"]"
    assert len(raw) > 1_048_576
    doc = assert_problem(
        await ingest_only.post("/api/v1/events", content=raw, headers=JSON),
        413,
        "payload-too-large",
    )
    assert "1048576" in doc["detail"]

    async def chunks():  # type: ignore[no-untyped-def]
        for start in range(0, len(raw), 65_536):
            yield raw[start : start + 65_536]

    chunked = await ingest_only.post("/api/v1/events", content=chunks(), headers=JSON)
    assert_problem(chunked, 413, "payload-too-large")
    assert await backlog(rds, names) == 0
    assert not await rds.exists(names.stream) or await rds.xlen(names.stream) == 0


async def test_backlog_over_budget_is_503_and_accepts_nothing(
    stats_app: Any, rds: aioredis.Redis, names: Names, pg: asyncpg.Connection, pid_base: int
) -> None:
    first = [event(pid_base, user_id=f"u{i}") for i in range(1000)]
    extra = [event(pid_base, user_id="late")]
    async with stats_app(stats_writer_enabled=False, stats_max_backlog=1000) as client:
        assert (
            await client.post("/api/v1/events", content=body(first), headers=JSON)
        ).status_code == 202
        resp = await client.post("/api/v1/events", content=body(extra), headers=JSON)
        doc = assert_problem(resp, 503, "overloaded")
        assert resp.headers["retry-after"] == "2"
        assert "backlog" in doc["detail"]
        assert await rds.xlen(names.stream) == 1
        assert await backlog(rds, names) == 1000
    # A writer drains the backlog; then the same batch is welcome.
    async with stats_app(stats_max_backlog=1000) as client:

        async def drained() -> bool:
            return await backlog(rds, names) == 0

        await wait_for(drained, timeout_s=10)
        assert (
            await client.post("/api/v1/events", content=body(extra), headers=JSON)
        ).status_code == 202
    assert await stored(pg, [e["event_id"] for e in first + extra]) == 1001


async def test_lag_over_budget_is_503(stats_app: Any, rds: aioredis.Redis, names: Names) -> None:
    async with stats_app(stats_writer_enabled=False, stats_max_lag_s=5) as client:
        # What the writers' maintenance publishes when the oldest entry waits 20 s.
        await rds.set(names.stream + ":lag-ms", 20_000, px=5000)
        resp = await client.post("/api/v1/events", content=body([event(1)]), headers=JSON)
        doc = assert_problem(resp, 503, "overloaded")
        assert "behind" in doc["detail"]
        assert resp.headers["retry-after"]
        await rds.set(names.stream + ":lag-ms", 1_000, px=5000)
        ok = await client.post("/api/v1/events", content=body([event(1)]), headers=JSON)
        assert ok.status_code == 202


async def test_redis_down_is_503_not_500(settings_kwargs: dict[str, Any], names: Names) -> None:
    from services.stats.app import create_app
    from tests.stats.conftest import fast_settings
    from tests.support.asgi import client_for
    from tests.support.servers import free_port

    dead = {**settings_kwargs, "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    app = create_app(fast_settings(dead, names, stats_writer_enabled=False))
    async with client_for(app) as client:
        resp = await client.post("/api/v1/events", content=body([event(1)]), headers=JSON)
        assert_problem(resp, 503, "upstream-unavailable")
        stats_resp = await client.get("/api/v1/stats/products/1")
        assert_problem(stats_resp, 503, "upstream-unavailable")
        assert (await client.get("/readyz")).status_code == 503
