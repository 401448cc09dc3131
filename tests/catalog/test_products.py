"""Catalog read path and admin writes, against real Postgres and Redis (in-process app)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from services.catalog.cache import ProductCache, body_key
from tests.catalog.conftest import ADMIN, USER, product_body
from tests.support.problems import assert_problem as support_assert_problem

_ids = itertools.count(100_000)


def new_id() -> int:
    return next(_ids)


async def put(client: httpx.AsyncClient, pid: int, **overrides: object) -> httpx.Response:
    body = product_body(sku=f"SKU-T{pid}", **overrides)
    return await client.put(f"/api/v1/admin/products/{pid}", json=body, headers=ADMIN)


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    doc = support_assert_problem(resp, status, code)
    assert isinstance(doc["title"], str)
    assert isinstance(doc["detail"], str)
    return doc


async def test_put_creates_then_replaces(catalog: httpx.AsyncClient) -> None:
    pid = new_id()
    created = await put(catalog, pid)
    assert created.status_code == 201
    doc = created.json()
    assert doc["id"] == pid
    assert doc["stock"] == 10
    assert doc["updated_at"].endswith("Z")
    replaced = await put(catalog, pid, name="Renamed", stock=3)
    assert replaced.status_code == 200
    assert replaced.json()["name"] == "Renamed"
    assert replaced.json()["stock"] == 3


async def test_get_product_matches_contract(catalog: httpx.AsyncClient) -> None:
    pid = new_id()
    sale = {
        "price_cents": 999,
        "starts_at": "2026-01-01T00:00:00Z",
        "ends_at": "2030-01-01T00:00:00Z",
        "per_user_limit": 2,
    }
    await put(catalog, pid, flash_sale=sale)
    resp = await catalog.get(f"/api/v1/products/{pid}")
    assert resp.status_code == 200
    doc = resp.json()
    assert set(doc) == {
        "id",
        "sku",
        "name",
        "description",
        "price_cents",
        "currency",
        "stock",
        "flash_sale",
        "updated_at",
    }
    assert doc["flash_sale"] == {
        "price_cents": 999,
        "starts_at": "2026-01-01T00:00:00Z",
        "ends_at": "2030-01-01T00:00:00Z",
        "per_user_limit": 2,
    }


async def test_etag_and_304(catalog: httpx.AsyncClient) -> None:
    pid = new_id()
    await put(catalog, pid)
    first = await catalog.get(f"/api/v1/products/{pid}")
    etag = first.headers["etag"]
    assert etag.startswith('"')
    again = await catalog.get(f"/api/v1/products/{pid}", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    weak = await catalog.get(f"/api/v1/products/{pid}", headers={"If-None-Match": f"W/{etag}"})
    assert weak.status_code == 304
    other = await catalog.get(f"/api/v1/products/{pid}", headers={"If-None-Match": '"nope"'})
    assert other.status_code == 200
    await put(catalog, pid, name="Changed")
    changed = await catalog.get(f"/api/v1/products/{pid}", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag


async def test_admin_put_invalidates_cache_within_one_second(
    catalog: httpx.AsyncClient, rds: aioredis.Redis
) -> None:
    pid = new_id()
    await put(catalog, pid, name="Before")
    assert (await catalog.get(f"/api/v1/products/{pid}")).json()["name"] == "Before"
    assert await rds.exists(body_key(pid)) == 1  # served from the cache from now on
    await put(catalog, pid, name="After")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 1.0
    name = None
    while loop.time() < deadline:
        name = (await catalog.get(f"/api/v1/products/{pid}")).json()["name"]
        if name == "After":
            break
        await asyncio.sleep(0.05)
    assert name == "After"


async def test_stale_refill_is_refused(rds: aioredis.Redis) -> None:
    """A reader that looked before a write cannot put the old body back afterwards."""
    cache = ProductCache(rds, ttl_s=30, negative_ttl_s=5)
    pid = new_id()
    _, generation = await cache.lookup(pid)
    await cache.invalidate(pid)  # a write lands while the reader queries Postgres
    await cache.fill(pid, generation, b'{"stale":true}')
    assert await rds.get(body_key(pid)) is None
    _, fresh = await cache.lookup(pid)
    await cache.fill(pid, fresh, b'{"fresh":true}')
    assert await rds.get(body_key(pid)) == b'{"fresh":true}'


async def test_unknown_product_is_404_and_negatively_cached(
    catalog: httpx.AsyncClient, rds: aioredis.Redis
) -> None:
    pid = new_id()
    assert_problem(await catalog.get(f"/api/v1/products/{pid}"), 404, "not-found")
    assert await rds.get(body_key(pid)) == b"-"
    created = await put(catalog, pid)  # creating it drops the negative entry
    assert created.status_code == 201
    assert (await catalog.get(f"/api/v1/products/{pid}")).status_code == 200


@pytest.mark.parametrize("bad_id", ["abc", "1.5", "0", "-3", "99999999999999999999999"])
async def test_bad_product_ids_are_422(catalog: httpx.AsyncClient, bad_id: str) -> None:
    assert_problem(await catalog.get(f"/api/v1/products/{bad_id}"), 422, "validation-error")


async def test_list_products_keyset_pagination(catalog: httpx.AsyncClient) -> None:
    ids = [new_id() for _ in range(5)]
    for pid in ids:
        await put(catalog, pid)
    seen: list[int] = []
    after = ids[0] - 1
    while True:
        resp = await catalog.get("/api/v1/products", params={"limit": 2, "after": after})
        assert resp.status_code == 200
        page = resp.json()
        seen.extend(item["id"] for item in page["items"] if item["id"] in ids)
        if page["next"] is None:
            break
        assert page["next"] == page["items"][-1]["id"]
        after = page["next"]
    assert seen == ids


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 201}, {"after": -1}, {"limit": "x"}])
async def test_list_rejects_bad_parameters(
    catalog: httpx.AsyncClient, params: dict[str, object]
) -> None:
    resp = await catalog.get("/api/v1/products", params=params)
    assert_problem(resp, 422, "validation-error")


async def test_put_requires_admin(catalog: httpx.AsyncClient) -> None:
    pid = new_id()
    url = f"/api/v1/admin/products/{pid}"
    body = product_body(sku=f"SKU-T{pid}")
    assert_problem(await catalog.put(url, json=body), 401, "unauthorized")
    assert_problem(await catalog.put(url, json=body, headers=USER), 403, "forbidden")
    assert_problem(await catalog.get(f"/api/v1/products/{pid}"), 404, "not-found")


@pytest.mark.parametrize(
    "overrides",
    [
        {"is_admin": True},  # mass assignment: unknown fields are refused
        {"id": 5},
        {"updated_at": "2026-01-01T00:00:00Z"},
        {"price_cents": "100"},  # wrong types are not coerced
        {"price_cents": 10.5},
        {"stock": True},
        {"stock": -1},
        {"currency": "eur"},
        {"name": ""},
        {
            "flash_sale": {
                "price_cents": 1,
                "starts_at": "2026-01-02T00:00:00Z",
                "ends_at": "2026-01-01T00:00:00Z",
                "per_user_limit": 1,
            }
        },
        {
            "flash_sale": {
                "price_cents": 1,
                "starts_at": "2026-01-01T00:00:00",
                "ends_at": "2026-01-02T00:00:00Z",
                "per_user_limit": 1,
            }
        },
        # Found by IN-1 (schemathesis): each of these was a 500 or was accepted.
        {"name": "a\u0000b"},  # Postgres text cannot hold NUL
        {"description": "a\u0000b"},
        {
            "flash_sale": {
                "price_cents": 1,
                "starts_at": "0001-01-01T00:00:00.637+05:39",  # before year 1 in UTC
                "ends_at": "2026-01-02T00:00:00Z",
                "per_user_limit": 1,
            }
        },
        {
            "flash_sale": {
                "price_cents": 1,
                "starts_at": 0,  # a number of seconds, not an RFC 3339 string
                "ends_at": "2026-01-02T00:00:00Z",
                "per_user_limit": 1,
            }
        },
    ],
)
async def test_put_rejects_invalid_bodies_and_changes_nothing(
    catalog: httpx.AsyncClient, overrides: dict[str, object]
) -> None:
    pid = new_id()
    await put(catalog, pid, name="Original")
    body = product_body(sku=f"SKU-T{pid}", **overrides)
    resp = await catalog.put(f"/api/v1/admin/products/{pid}", json=body, headers=ADMIN)
    doc = assert_problem(resp, 422, "validation-error")
    assert isinstance(doc["errors"], list)
    assert doc["errors"]
    assert (await catalog.get(f"/api/v1/products/{pid}")).json()["name"] == "Original"


@pytest.mark.parametrize(
    "raw", [b"{", b'{"sku": "x",}', b"[1, 2", b"\xff\xfe", b"NaN", b'{"a": 1e400}', b"null"]
)
async def test_malformed_json_is_a_clean_4xx(catalog: httpx.AsyncClient, raw: bytes) -> None:
    resp = await catalog.put(
        f"/api/v1/admin/products/{new_id()}",
        content=raw,
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert resp.status_code in (400, 422), resp.text
    assert resp.headers["content-type"] == "application/problem+json"


async def test_duplicate_sku_is_409(catalog: httpx.AsyncClient) -> None:
    first, second = new_id(), new_id()
    await put(catalog, first)
    resp = await catalog.put(
        f"/api/v1/admin/products/{second}",
        json=product_body(sku=f"SKU-T{first}"),
        headers=ADMIN,
    )
    assert_problem(resp, 409, "conflict")


async def test_body_over_limit_is_413(catalog: httpx.AsyncClient) -> None:
    big = product_body(description="x" * 2_000_000)
    resp = await catalog.put(f"/api/v1/admin/products/{new_id()}", json=big, headers=ADMIN)
    assert_problem(resp, 413, "payload-too-large")


async def test_chunked_body_over_limit_is_413(catalog: httpx.AsyncClient) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(40):
            yield b"x" * 65_536

    resp = await catalog.put(
        f"/api/v1/admin/products/{new_id()}",
        content=chunks(),
        headers={**ADMIN, "Content-Type": "application/json"},
    )
    assert_problem(resp, 413, "payload-too-large")


async def test_unknown_route_and_method_are_problems(catalog: httpx.AsyncClient) -> None:
    assert_problem(await catalog.get("/api/v1/nope"), 404, "not-found")
    assert_problem(await catalog.delete("/api/v1/products/1"), 405, "method-not-allowed")


async def test_health_ready_metrics_and_request_id(catalog: httpx.AsyncClient) -> None:
    assert (await catalog.get("/healthz")).json() == {"status": "ok"}
    ready = await catalog.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}
    echoed = await catalog.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    replaced = await catalog.get("/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
    assert replaced.headers["x-request-id"] != "bad id\twith spaces"
    assert len(replaced.headers["x-request-id"]) == 32
    metrics = (await catalog.get("/metrics")).text
    series = 'shopstack_http_requests_total{method="GET",route="/healthz",service="catalog"'
    assert series in metrics
    assert "shopstack_http_request_duration_seconds_bucket" in metrics


async def test_openapi_schema_is_served(catalog: httpx.AsyncClient) -> None:
    schema = (await catalog.get("/openapi.json")).json()
    assert "/api/v1/products/{product_id}" in schema["paths"]
    assert "/api/v1/admin/products/{product_id}" in schema["paths"]
