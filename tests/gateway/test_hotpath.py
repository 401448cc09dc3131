"""The gateway's flash-sale defences: micro-cache, coalescing, invalidation, sold-out flags,
load shedding and write-route rate limits (real Redis, real upstream HTTP server)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from services.catalog.cache import CHANGED_CHANNEL
from services.gateway.app import create_app
from tests.gateway.conftest import Echo, gateway_settings
from tests.gateway.helpers import login
from tests.support.asgi import client_for
from tests.support.problems import assert_problem


async def test_concurrent_misses_make_one_upstream_call(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    echo.delay_s = 0.2
    replies = await asyncio.gather(
        *(gateway_to_echo.get("/api/v1/products/42") for _ in range(100))
    )
    assert [r.status_code for r in replies] == [200] * 100
    assert len(echo.seen) == 1
    # Served from memory from now on, until the entry expires.
    again = await gateway_to_echo.get("/api/v1/products/42")
    assert again.headers["x-cache"] == "hit"
    assert len(echo.seen) == 1


async def test_entries_expire_within_a_second(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    await gateway_to_echo.get("/api/v1/products/43")
    await asyncio.sleep(1.05)
    await gateway_to_echo.get("/api/v1/products/43")
    assert len(echo.seen) == 2


async def test_not_found_is_cached_too(gateway_to_echo: httpx.AsyncClient, echo: Echo) -> None:
    echo.status = 404
    for _ in range(5):
        assert (await gateway_to_echo.get("/api/v1/products/44")).status_code == 404
    assert len(echo.seen) == 1


async def test_errors_are_not_cached(gateway_to_echo: httpx.AsyncClient, echo: Echo) -> None:
    echo.status = 503
    for _ in range(3):
        assert (await gateway_to_echo.get("/api/v1/products/45")).status_code == 503
    assert len(echo.seen) == 3


async def test_query_strings_bypass_the_cache(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    for _ in range(3):
        await gateway_to_echo.get("/api/v1/products/46?x=1")
    assert len(echo.seen) == 3


async def test_a_change_message_drops_the_entry_at_once(
    gateway_to_echo: httpx.AsyncClient, echo: Echo, rds: aioredis.Redis
) -> None:
    await gateway_to_echo.get("/api/v1/products/47")
    await asyncio.sleep(0.1)  # the subscriber is connected by now
    started = time.monotonic()
    await rds.publish(CHANGED_CHANNEL, "47")
    while len(echo.seen) < 2 and time.monotonic() - started < 1.0:
        await gateway_to_echo.get("/api/v1/products/47")
        await asyncio.sleep(0.02)
    assert len(echo.seen) == 2
    assert time.monotonic() - started < 0.5  # well before the TTL would have expired it


async def test_cached_replies_keep_etag_semantics(seeded: str, stack_gateway: str) -> None:
    async with httpx.AsyncClient(base_url=stack_gateway) as client:
        first = await client.get("/api/v1/products/3")
        cached = await client.get("/api/v1/products/3")
        assert cached.content == first.content
        assert cached.headers["etag"] == first.headers["etag"]
        not_modified = await client.get(
            "/api/v1/products/3", headers={"If-None-Match": first.headers["etag"]}
        )
        assert not_modified.status_code == 304
        assert not_modified.content == b""
        assert not_modified.headers["etag"] == first.headers["etag"]


async def test_sold_out_orders_are_refused_without_an_upstream_call(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    token = await login(gateway_to_echo, "demo1", "demo-password-1")
    auth = {"Authorization": f"Bearer {token}"}
    echo.status = 409  # the echo answers a sold-out problem body below
    echo.body = b'{"type":"/problems/sold-out","title":"Sold Out","status":409,"detail":"x"}'
    first = await gateway_to_echo.post(
        "/api/v1/orders", json={"product_id": 9, "quantity": 1}, headers=auth
    )
    assert first.status_code == 409
    for _ in range(20):
        again = await gateway_to_echo.post(
            "/api/v1/orders", json={"product_id": 9, "quantity": 1}, headers=auth
        )
        assert_problem(again, 409, "sold-out")
    assert len(echo.seen) == 1
    # Other products, and keyed (replayable) requests, still reach the catalog.
    await gateway_to_echo.post(
        "/api/v1/orders", json={"product_id": 8, "quantity": 1}, headers=auth
    )
    await gateway_to_echo.post(
        "/api/v1/orders",
        json={"product_id": 9, "quantity": 1},
        headers={**auth, "Idempotency-Key": "k-1"},
    )
    assert len(echo.seen) == 3


async def test_restock_message_clears_the_sold_out_flag(
    gateway_to_echo: httpx.AsyncClient, echo: Echo, rds: aioredis.Redis
) -> None:
    token = await login(gateway_to_echo, "demo1", "demo-password-1")
    auth = {"Authorization": f"Bearer {token}"}
    echo.status = 409
    echo.body = b'{"type":"/problems/sold-out","title":"Sold Out","status":409,"detail":"x"}'
    await gateway_to_echo.post(
        "/api/v1/orders", json={"product_id": 11, "quantity": 1}, headers=auth
    )
    await asyncio.sleep(0.1)
    await rds.publish(CHANGED_CHANNEL, "11")
    await asyncio.sleep(0.2)
    echo.status, echo.body = 201, None
    resp = await gateway_to_echo.post(
        "/api/v1/orders", json={"product_id": 11, "quantity": 1}, headers=auth
    )
    assert resp.status_code == 201
    assert len(echo.seen) == 2


async def test_overload_is_shed_fast_and_health_is_not(
    seeded: str, settings_kwargs: dict[str, Any], echo: Echo
) -> None:
    settings = gateway_settings(
        settings_kwargs, stats_url=echo.url, gateway_max_in_flight=5, gateway_read_timeout_s=5
    )
    echo.delay_s = 1.0
    async with client_for(create_app(settings)) as client:
        slow = [asyncio.create_task(client.get(f"/api/v1/stats/top?i={i}")) for i in range(5)]
        await asyncio.sleep(0.3)  # five requests now hold every slot
        started = time.perf_counter()
        shed = await client.get("/api/v1/stats/top?i=extra")
        elapsed = time.perf_counter() - started
        health = await client.get("/healthz")
        done = await asyncio.gather(*slow)
    assert_problem(shed, 503, "overloaded")
    assert shed.headers["retry-after"] == "1"
    assert elapsed < 0.1
    assert health.status_code == 200
    assert [r.status_code for r in done] == [200] * 5


async def test_rl1_write_limit_is_shared_across_workers(
    seeded: str, settings_kwargs: dict[str, Any], echo: Echo, rds: aioredis.Redis
) -> None:
    """RL-1: two gateway workers, one Redis; the user's bucket holds across both."""
    await rds.delete("ratelimit:write-user:1")
    settings = gateway_settings(
        settings_kwargs,
        catalog_url=echo.url,
        write_user_rate_per_s=10,
        write_user_burst=10,
    )
    async with (
        client_for(create_app(settings)) as one,
        client_for(create_app(settings)) as two,
    ):
        token = await login(one, "demo1", "demo-password-1")
        auth = {"Authorization": f"Bearer {token}"}
        started = time.monotonic()
        replies = await asyncio.gather(
            *(
                (one if i % 2 else two).post(
                    "/api/v1/orders", json={"product_id": 1, "quantity": 1}, headers=auth
                )
                for i in range(200)
            )
        )
        elapsed = time.monotonic() - started
    accepted = [r for r in replies if r.status_code == 200]
    limited = [r for r in replies if r.status_code == 429]
    assert len(accepted) + len(limited) == 200
    assert 10 <= len(accepted) <= 10 + 10 * elapsed + 1
    assert len(echo.seen) == len(accepted)
    for reply in limited:
        assert_problem(reply, 429, "rate-limited")
        assert int(reply.headers["retry-after"]) >= 1
    await rds.delete("ratelimit:write-user:1")


@pytest.mark.parametrize("path", ["/api/v1/products/1", "/api/v1/stats/top"])
async def test_reads_are_not_rate_limited(gateway_to_echo: httpx.AsyncClient, path: str) -> None:
    replies = await asyncio.gather(*(gateway_to_echo.get(path) for _ in range(50)))
    assert {r.status_code for r in replies} == {200}


async def test_an_expired_sold_out_flag_sends_one_probe(
    seeded: str, settings_kwargs: dict[str, Any], echo: Echo
) -> None:
    settings = gateway_settings(settings_kwargs, catalog_url=echo.url, gateway_sold_out_ttl_s=0.2)
    echo.status = 409
    echo.body = b'{"type":"/problems/sold-out","title":"Sold Out","status":409,"detail":"x"}'
    order = {"product_id": 13, "quantity": 1}
    async with client_for(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {await login(client, 'demo1', 'demo-password-1')}"}
        await client.post("/api/v1/orders", json=order, headers=auth)
        assert len(echo.seen) == 1
        await asyncio.sleep(0.25)  # the flag has expired
        echo.delay_s = 0.1
        storm = await asyncio.gather(
            *(client.post("/api/v1/orders", json=order, headers=auth) for _ in range(20))
        )
        assert {r.status_code for r in storm} == {409}
        assert len(echo.seen) == 2  # one probe, not twenty
        echo.status, echo.body, echo.delay_s = 201, None, 0.0
        await asyncio.sleep(0.25)
        probe = await client.post("/api/v1/orders", json=order, headers=auth)
        after = await client.post("/api/v1/orders", json=order, headers=auth)
    assert probe.status_code == 201
    assert after.status_code == 201  # the probe's answer cleared the flag
    assert len(echo.seen) == 4
