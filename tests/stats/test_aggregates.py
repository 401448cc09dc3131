"""Window queries against a brute-force count from Postgres; duplicates; late events; expiry."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from services.stats.buckets import HORIZON_S, Tiers
from tests.stats.conftest import (
    JSON,
    Names,
    backlog,
    body,
    brute_force,
    brute_force_top,
    event,
    span,
    stored,
    wait_for,
)
from tests.support.problems import assert_problem

TYPES = ["view"] * 6 + ["cart"] * 3 + ["purchase"]
METRIC_TYPES = {"views": "view", "carts": "cart", "purchases": "purchase"}


async def post_all(
    client: httpx.AsyncClient, events: list[dict[str, Any]], size: int = 500
) -> None:
    for start in range(0, len(events), size):
        resp = await client.post(
            "/api/v1/events", content=body(events[start : start + size]), headers=JSON
        )
        assert resp.status_code == 202, resp.text


async def settled(
    pg: asyncpg.Connection, rds: aioredis.Redis, names: Names, ids: list[str]
) -> None:
    """Every event stored and every entry acked (so every count applied)."""

    async def done() -> bool:
        return await stored(pg, ids) == len(set(ids)) and await backlog(rds, names) == 0

    await wait_for(done, timeout_s=20)


def unique_close(got: int, exact: int) -> bool:
    """HyperLogLog: Redis's standard error is 0.81%; small sets are near exact."""
    return abs(got - exact) <= max(1, round(exact * 0.03))


async def test_window_queries_match_brute_force(
    stats: httpx.AsyncClient,
    pg: asyncpg.Connection,
    rds: aioredis.Redis,
    names: Names,
    pid_base: int,
) -> None:
    rng = random.Random(5)
    now = datetime.now(UTC)
    products = [pid_base + i for i in range(1, 9)]
    events = []
    for _ in range(4000):
        age = rng.choice([rng.uniform(2, 130), rng.uniform(2, HORIZON_S + 200)])
        events.append(
            event(
                rng.choice(products[: rng.randint(1, 8)]),  # skewed towards the first ids
                type=rng.choice(TYPES),
                user_id=f"u{rng.randrange(60)}",
                ts=now - timedelta(seconds=age),
            )
        )
    events += [event(products[0], ts=now + timedelta(seconds=90)) for _ in range(5)]
    events += [event(products[1], ts=now - timedelta(hours=3)) for _ in range(5)]
    await post_all(stats, events)
    await settled(pg, rds, names, [e["event_id"] for e in events])

    for window in (1, 5, 60, 119, 120, 121, 150, 300, 1799, 3600):
        for product_id in products[:4]:
            resp = await stats.get(f"/api/v1/stats/products/{product_id}?window={window}")
            assert resp.status_code == 200
            doc = resp.json()
            start, end = span(doc)
            exact = await brute_force(pg, product_id, start, end)
            assert doc["product_id"] == product_id
            assert doc["window_s"] == window
            for key in ("views", "carts", "purchases"):
                assert doc[key] == exact[key], (window, product_id, key, doc, exact)
            assert unique_close(doc["unique_visitors"], exact["unique_visitors"]), (doc, exact)
            length = (end - start).total_seconds()
            assert length == window if window <= 120 else abs(length - window) <= 30
    for metric, type_ in METRIC_TYPES.items():
        for window in (60, 300, 3600):
            resp = await stats.get(f"/api/v1/stats/top?metric={metric}&window={window}&limit=5")
            assert resp.status_code == 200
            doc = resp.json()
            start, end = span(doc)
            exact = await brute_force_top(pg, type_, start, end, products[0], products[-1])
            counts = [item["count"] for item in doc["items"]]
            assert counts == sorted(exact.values(), reverse=True)[:5], (metric, window)
            for item in doc["items"]:
                assert item["count"] == exact[item["product_id"]]


async def test_duplicates_across_batches_are_stored_and_counted_once(
    stats: httpx.AsyncClient,
    pg: asyncpg.Connection,
    rds: aioredis.Redis,
    names: Names,
    pid_base: int,
) -> None:
    product_id = pid_base + 1
    events = [
        event(product_id, type=TYPES[i % len(TYPES)], user_id=f"u{i % 37}") for i in range(600)
    ]
    batches = [events[0:400], events[200:600], events[100:500], [*events[:3], events[0]]]
    # Concurrent posts: the two consumers may hold the same ids in flight at once.
    results = await asyncio.gather(
        *(stats.post("/api/v1/events", content=body(b), headers=JSON) for b in batches * 2)
    )
    assert all(r.status_code == 202 for r in results)
    ids = [e["event_id"] for e in events]
    await settled(pg, rds, names, ids)
    assert await stored(pg, ids) == 600
    doc = (await stats.get(f"/api/v1/stats/products/{product_id}?window=300")).json()
    start, end = span(doc)
    exact = await brute_force(pg, product_id, start, end)
    assert sum(exact[k] for k in ("views", "carts", "purchases")) == 600
    assert {k: doc[k] for k in ("views", "carts", "purchases")} == {
        k: exact[k] for k in ("views", "carts", "purchases")
    }
    assert doc["unique_visitors"] == 37


async def test_late_events_count_in_their_bucket_and_too_old_ones_in_postgres_only(
    stats: httpx.AsyncClient,
    pg: asyncpg.Connection,
    rds: aioredis.Redis,
    names: Names,
    pid_base: int,
) -> None:
    now = datetime.now(UTC)
    late = event(pid_base + 1, ts=now - timedelta(minutes=50))
    too_old = event(pid_base + 2, ts=now - timedelta(hours=2))
    ahead = event(pid_base + 3, ts=now + timedelta(seconds=200))
    await post_all(stats, [late, too_old, ahead])
    await settled(pg, rds, names, [late["event_id"], too_old["event_id"], ahead["event_id"]])

    late_doc = (await stats.get(f"/api/v1/stats/products/{pid_base + 1}?window=3600")).json()
    assert late_doc["views"] == 1
    assert late_doc["unique_visitors"] == 1
    old_doc = (await stats.get(f"/api/v1/stats/products/{pid_base + 2}?window=3600")).json()
    assert old_doc["views"] == 0
    ahead_doc = (await stats.get(f"/api/v1/stats/products/{pid_base + 3}?window=3600")).json()
    assert ahead_doc["views"] == 0  # counted when its time comes, not before
    assert await rds.keys(f"{names.prefix}:mu:*:{pid_base + 2}") == []
    ahead_minute = int(datetime.fromisoformat(ahead["ts"]).timestamp()) // 60
    assert await rds.zscore(f"{names.prefix}:m:{ahead_minute}:v", str(pid_base + 3)) == 1.0


async def test_every_aggregate_key_expires(
    stats: httpx.AsyncClient,
    pg: asyncpg.Connection,
    rds: aioredis.Redis,
    names: Names,
    pid_base: int,
) -> None:
    now = datetime.now(UTC)
    events = [
        event(pid_base + i % 5, user_id=f"u{i}", ts=now - timedelta(seconds=i * 7 % 3000))
        for i in range(500)
    ]
    events.append(event(pid_base, ts=now + timedelta(seconds=280)))
    await post_all(stats, events)
    await settled(pg, rds, names, [e["event_id"] for e in events])
    await stats.get("/api/v1/stats/top?window=3600")  # leaves a cached union behind
    tiers = Tiers(120)
    now_s = int(time.time())
    keys = [key.decode() async for key in rds.scan_iter(match=f"{names.prefix}:*", count=1000)]
    assert keys
    for key in keys:
        ttl = await rds.ttl(key)
        assert ttl > 0, key  # no key lives forever
        tier, bucket = key.removeprefix(names.prefix + ":").split(":")[:2]
        if tier in ("f", "fu"):
            assert ttl <= int(bucket) + tiers.fine_keep_s + 1 - now_s + 1
        elif tier in ("m", "mu"):
            assert ttl <= (int(bucket) + 1) * 60 + tiers.coarse_keep_s - now_s + 1
        else:
            assert tier == "top"
            assert ttl <= 1
    # The bound: future skew + tier retention (< 5 min + 1 h + 2 min).
    assert max([await rds.ttl(k) for k in keys]) <= 300 + tiers.coarse_keep_s + 60


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/v1/stats/products/1?window=0", 422),
        ("/api/v1/stats/products/1?window=3601", 422),
        ("/api/v1/stats/products/1?window=abc", 422),
        ("/api/v1/stats/products/0", 422),
        ("/api/v1/stats/products/abc", 422),
        ("/api/v1/stats/products/99999999999999999999", 422),
        ("/api/v1/stats/top?metric=likes", 422),
        ("/api/v1/stats/top?limit=0", 422),
        ("/api/v1/stats/top?limit=101", 422),
        ("/api/v1/stats/top?window=-5", 422),
        ("/api/v1/stats/nope", 404),
    ],
)
async def test_query_parameters_are_validated(
    ingest_only: httpx.AsyncClient, path: str, status: int
) -> None:
    code = "validation-error" if status == 422 else "not-found"
    assert_problem(await ingest_only.get(path), status, code)


async def test_empty_windows_answer_zeros(ingest_only: httpx.AsyncClient, pid_base: int) -> None:
    doc = (await ingest_only.get(f"/api/v1/stats/products/{pid_base}?window=60")).json()
    assert {k: doc[k] for k in ("views", "unique_visitors", "carts", "purchases")} == dict.fromkeys(
        ("views", "unique_visitors", "carts", "purchases"), 0
    )
    top = (await ingest_only.get("/api/v1/stats/top?metric=carts&window=300&limit=10")).json()
    assert top["items"] == []
    assert top["metric"] == "carts"
    assert top["window_s"] == 300


@pytest.mark.parametrize("now_s", [1_795_686_000, 1_795_686_059, 1_795_686_030])
def test_bucket_cover_spans(now_s: int) -> None:
    tiers = Tiers(120)
    for window in range(1, HORIZON_S + 1):
        cover = tiers.cover(window, now_s)
        length = cover.end_s - cover.start_s
        assert cover.end_s == now_s + 1
        if window <= 120:
            assert length == window
            assert cover.coarse_from > cover.coarse_to
        else:
            assert abs(length - window) <= 30
            assert now_s - cover.fine_from < 60  # the 1 s tier only covers the current minute
            assert cover.fine_from % 60 == 0
        buckets = (cover.fine_to - cover.fine_from + 1) + max(
            0, cover.coarse_to - cover.coarse_from + 1
        )
        assert buckets <= 121


def test_buckets_are_kept_as_long_as_a_window_can_reach_them() -> None:
    tiers = Tiers(120)
    now_s = 1_795_686_045
    for window in (1, 120, 121, 3600):
        cover = tiers.cover(window, now_s)
        oldest_fine_us = cover.fine_from * 1_000_000
        assert tiers.fine_bucket(oldest_fine_us, now_s) == cover.fine_from
        if cover.coarse_from <= cover.coarse_to:
            oldest_minute_us = cover.coarse_from * 60_000_000
            assert tiers.coarse_bucket(oldest_minute_us, now_s) == cover.coarse_from
    assert tiers.fine_bucket((now_s - 200) * 1_000_000, now_s) is None
    assert tiers.coarse_bucket((now_s - 2 * HORIZON_S) * 1_000_000, now_s) is None


async def test_metrics_and_openapi(stats: httpx.AsyncClient, pid_base: int) -> None:
    await stats.post("/api/v1/events", content=body([event(pid_base)]), headers=JSON)
    await asyncio.sleep(0.6)  # a flush and a maintenance round
    text = (await stats.get("/metrics")).text
    for name in (
        "shopstack_stats_stream_length",
        "shopstack_stats_backlog_events",
        "shopstack_stats_pending_entries",
        "shopstack_stats_consumer_lag_seconds",
        "shopstack_stats_dead_letter_length",
        "shopstack_stats_dead_lettered_total",
        "shopstack_stats_write_batch_events_bucket",
        "shopstack_stats_flush_duration_seconds_bucket",
        "shopstack_stats_events_accepted_total",
    ):
        assert name in text, name
    ready = (await stats.get("/readyz")).json()
    assert ready["checks"] == {"postgres": "ok", "redis": "ok", "writer": "ok"}
    schema = (await stats.get("/openapi.json")).json()
    post = schema["paths"]["/api/v1/events"]["post"]
    batch = post["requestBody"]["content"]["application/json"]["schema"]
    assert batch["maxItems"] == 1000
    assert set(batch["items"]["required"]) == {"event_id", "type", "product_id", "user_id", "ts"}
    assert "/api/v1/stats/products/{product_id}" in schema["paths"]
    assert "/api/v1/stats/top" in schema["paths"]
