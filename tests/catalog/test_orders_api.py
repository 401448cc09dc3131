"""POST/GET/cancel /api/v1/orders through the in-process app (real Postgres and Redis)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY

from tests.catalog.conftest import (
    ADMIN,
    OPEN_SALE,
    OrdersApp,
    assert_consistent,
    create_product,
    new_user,
    product_body,
)
from tests.catalog.test_products import assert_problem


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def buy(app: OrdersApp, user: dict[str, str], pid: int, qty: int = 1, **kw: Any) -> Any:
    return await app.client.post(
        "/api/v1/orders", json={"product_id": pid, "quantity": qty}, headers=user, **kw
    )


async def stock_of(app: OrdersApp, pid: int) -> int:
    async with app.inv.pool.acquire() as conn:
        return int(await conn.fetchval("SELECT stock FROM products WHERE id = $1", pid))


async def test_order_is_reserved_at_flash_sale_price(orders_app: OrdersApp) -> None:
    pid = await create_product(orders_app.inv, stock=5, flash_sale=OPEN_SALE, price=1999)
    user = new_user()
    resp = await buy(orders_app, user, pid, 2)
    assert resp.status_code == 201, resp.text
    doc = resp.json()
    assert set(doc) == {
        "id",
        "status",
        "product_id",
        "quantity",
        "amount_cents",
        "currency",
        "expires_at",
    }
    assert doc["status"] == "reserved"
    assert doc["amount_cents"] == 2 * 500  # the flash-sale price, not 1999
    assert doc["currency"] == "EUR"
    assert doc["expires_at"].endswith("Z")
    uuid.UUID(doc["id"])
    assert await stock_of(orders_app, pid) == 3
    assert (await orders_app.client.get(f"/api/v1/orders/{doc['id']}", headers=user)).json() == doc
    await assert_consistent(orders_app.inv, pid)


async def test_regular_price_outside_the_sale_window(orders_app: OrdersApp) -> None:
    closed = {**OPEN_SALE, "starts_at": "2098-01-01T00:00:00Z", "per_user_limit": 1}
    pid = await create_product(orders_app.inv, stock=5, flash_sale=closed, price=1999)
    user = new_user()
    resp = await buy(orders_app, user, pid, 3)  # no per-user limit outside the window
    assert resp.status_code == 201, resp.text
    assert resp.json()["amount_cents"] == 3 * 1999


async def test_per_user_limit_is_409_limit_exceeded(orders_app: OrdersApp) -> None:
    pid = await create_product(orders_app.inv, stock=50, flash_sale=OPEN_SALE)
    user = new_user()
    assert (await buy(orders_app, user, pid, 2)).status_code == 201
    assert_problem(await buy(orders_app, user, pid, 1), 409, "limit-exceeded")
    assert (await buy(orders_app, new_user(), pid, 2)).status_code == 201  # others may buy
    await assert_consistent(orders_app.inv, pid)


async def test_orders_are_visible_to_their_owner_only(orders_app: OrdersApp) -> None:
    pid = await create_product(orders_app.inv, stock=5)
    owner, other = new_user(), new_user()
    order_id = (await buy(orders_app, owner, pid)).json()["id"]
    url = f"/api/v1/orders/{order_id}"
    assert (await orders_app.client.get(url, headers=owner)).status_code == 200
    assert_problem(await orders_app.client.get(url, headers=other), 404, "not-found")
    assert_problem(await orders_app.client.post(url + "/cancel", headers=other), 404, "not-found")
    unknown = f"/api/v1/orders/{uuid.uuid4()}"
    assert_problem(await orders_app.client.get(unknown, headers=owner), 404, "not-found")
    assert_problem(await orders_app.client.get(url), 401, "unauthorized")
    assert_problem(
        await orders_app.client.get("/api/v1/orders/nope", headers=owner), 422, "validation-error"
    )
    assert (await orders_app.client.get(url, headers=owner)).json()["status"] == "reserved"


async def test_cancel_returns_stock_exactly_once(orders_app: OrdersApp) -> None:
    pid = await create_product(orders_app.inv, stock=5)
    user = new_user()
    order_id = (await buy(orders_app, user, pid, 3)).json()["id"]
    assert await stock_of(orders_app, pid) == 2
    url = f"/api/v1/orders/{order_id}/cancel"
    replies = await asyncio.gather(*(orders_app.client.post(url, headers=user) for _ in range(10)))
    assert {r.status_code for r in replies} == {200}
    assert {r.json()["status"] for r in replies} == {"cancelled"}
    assert await stock_of(orders_app, pid) == 5
    await assert_consistent(orders_app.inv, pid)
    assert (await orders_app.client.post(url, headers=user)).json()["status"] == "cancelled"
    assert await stock_of(orders_app, pid) == 5


async def test_cancel_of_a_paid_order_is_409(orders_app: OrdersApp) -> None:
    pid = await create_product(orders_app.inv, stock=5)
    user = new_user()
    order_id = (await buy(orders_app, user, pid)).json()["id"]
    paid = await orders_app.client.post(
        f"/internal/v1/orders/{order_id}/paid", json={"payment_id": str(uuid.uuid4())}
    )
    assert paid.status_code == 200
    resp = await orders_app.client.post(f"/api/v1/orders/{order_id}/cancel", headers=user)
    assert_problem(resp, 409, "order-not-cancellable")
    assert await stock_of(orders_app, pid) == 4
    await assert_consistent(orders_app.inv, pid)


async def test_sold_out_is_409_and_then_costs_no_postgres_or_redis(orders_app: OrdersApp) -> None:
    """Sold-out answers stay cheap: after sell-out, POST /orders does no Postgres work."""
    pid = await create_product(orders_app.inv, stock=2)
    assert (await buy(orders_app, new_user(), pid, 2)).status_code == 201
    assert_problem(await buy(orders_app, new_user(), pid), 409, "sold-out")  # the gate says 0
    pg_before = sample("shopstack_order_pg_queries_total")
    gate_before = sample("shopstack_gate_calls_total", op="admit")
    local_before = sample("shopstack_order_attempts_total", outcome="sold_out_local")
    for _ in range(50):
        assert_problem(await buy(orders_app, new_user(), pid), 409, "sold-out")
    assert sample("shopstack_order_pg_queries_total") == pg_before
    assert sample("shopstack_gate_calls_total", op="admit") == gate_before
    assert sample("shopstack_order_attempts_total", outcome="sold_out_local") == local_before + 50
    metrics = (await orders_app.client.get("/metrics")).text
    assert "shopstack_order_pg_queries_total" in metrics


async def test_restock_clears_the_sold_out_flag(orders_app: OrdersApp) -> None:
    pid = await create_product(orders_app.inv, stock=1)
    user = new_user()
    order_id = (await buy(orders_app, user, pid)).json()["id"]
    assert_problem(await buy(orders_app, new_user(), pid), 409, "sold-out")
    assert orders_app.inv.flags.is_sold_out(pid)
    await orders_app.client.post(f"/api/v1/orders/{order_id}/cancel", headers=user)
    assert not orders_app.inv.flags.is_sold_out(pid)
    assert (await buy(orders_app, new_user(), pid)).status_code == 201
    assert_problem(await buy(orders_app, new_user(), pid), 409, "sold-out")
    body = product_body(sku=f"SKU-O{pid}", stock=4)
    put = await orders_app.client.put(f"/api/v1/admin/products/{pid}", json=body, headers=ADMIN)
    assert put.status_code == 200
    assert (await buy(orders_app, new_user(), pid, 4)).status_code == 201
    row = await assert_consistent(orders_app.inv, pid)
    assert row == {"stock": 0, "units_on_sale": 5, "held": 5, "counted": 5}


@pytest.mark.parametrize(
    "extra",
    [
        {"price_cents": 1},
        {"amount_cents": 1},
        {"status": "paid"},
        {"user_id": "someone-else"},
        {"is_admin": True},
        {"currency": "USD"},
    ],
)
async def test_in10_mass_assignment_is_422_and_changes_nothing(
    orders_app: OrdersApp, extra: dict[str, Any]
) -> None:
    """IN-10: extra price/status/user_id fields on POST /orders -> 422, DB unchanged."""
    pid = await create_product(orders_app.inv, stock=5)
    user = new_user()
    resp = await orders_app.client.post(
        "/api/v1/orders", json={"product_id": pid, "quantity": 1, **extra}, headers=user
    )
    assert_problem(resp, 422, "validation-error")
    assert await stock_of(orders_app, pid) == 5
    async with orders_app.inv.pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM orders WHERE product_id = $1", pid) == 0
    await assert_consistent(orders_app.inv, pid)


@pytest.mark.parametrize(
    "body",
    [
        {"product_id": 1, "quantity": 0},
        {"product_id": 1, "quantity": 11},
        {"product_id": 1, "quantity": -1},
        {"product_id": 1, "quantity": "1"},
        {"product_id": 1, "quantity": 1.5},
        {"product_id": 1, "quantity": True},
        {"product_id": "1", "quantity": 1},
        {"product_id": 0, "quantity": 1},
        {"product_id": 2**70, "quantity": 1},
        {"product_id": 1},
        {"quantity": 1},
        [],
        None,
    ],
)
async def test_invalid_order_bodies_are_422(orders_app: OrdersApp, body: Any) -> None:
    resp = await orders_app.client.post("/api/v1/orders", json=body, headers=new_user())
    assert_problem(resp, 422, "validation-error")


async def test_integral_floats_are_integers(orders_app: OrdersApp) -> None:
    """JSON (and the schema's `integer`) has 2.0 for 2: IN-1 found it refused with 422."""
    pid = await create_product(orders_app.inv, stock=5)
    resp = await orders_app.client.post(
        "/api/v1/orders", json={"product_id": float(pid), "quantity": 2.0}, headers=new_user()
    )
    assert resp.status_code == 201, resp.text
    assert (resp.json()["product_id"], resp.json()["quantity"]) == (pid, 2)
    assert await stock_of(orders_app, pid) == 3
    await assert_consistent(orders_app.inv, pid)


@pytest.mark.parametrize(
    "raw", [b"{", b'{"product_id": 1,}', b"\xff\xfe", b"NaN", b'{"quantity": 1e400}']
)
async def test_malformed_json_is_a_clean_4xx(orders_app: OrdersApp, raw: bytes) -> None:
    resp = await orders_app.client.post(
        "/api/v1/orders", content=raw, headers={**new_user(), "Content-Type": "application/json"}
    )
    assert resp.status_code in (400, 422), resp.text
    assert resp.headers["content-type"] == "application/problem+json"


async def test_unknown_product_is_404_and_huge_body_413(orders_app: OrdersApp) -> None:
    user = new_user()
    assert_problem(await buy(orders_app, user, 987_654_321), 404, "not-found")
    huge = b'{"product_id": 1, "quantity": 1, "pad": "' + b"x" * 2_000_000 + b'"}'
    resp = await orders_app.client.post(
        "/api/v1/orders", content=huge, headers={**user, "Content-Type": "application/json"}
    )
    assert_problem(resp, 413, "payload-too-large")
    assert_problem(
        await orders_app.client.post("/api/v1/orders", json={"product_id": 1, "quantity": 1}),
        401,
        "unauthorized",
    )


async def test_idempotent_replay_returns_the_first_reply(orders_app: OrdersApp) -> None:
    pid = await create_product(orders_app.inv, stock=5)
    user = new_user()
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    first = await buy(orders_app, {**user, **key}, pid, 2)
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    for _ in range(3):
        again = await buy(orders_app, {**user, **key}, pid, 2)
        assert again.status_code == 201
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
    assert await stock_of(orders_app, pid) == 3  # one order only
    # Keys are scoped per user: another user's same key is a new request.
    other = await buy(orders_app, {**new_user(), **key}, pid, 2)
    assert other.status_code == 201
    assert other.json()["id"] != first.json()["id"]
    # Errors are replayed too (sold out with this key stays sold out for it).
    sold_key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    refused = await buy(orders_app, {**user, **sold_key}, pid, 5)
    assert_problem(refused, 409, "sold-out")
    replay = await buy(orders_app, {**user, **sold_key}, pid, 5)
    assert replay.status_code == 409
    assert replay.content == refused.content
    assert replay.headers["idempotent-replayed"] == "true"


async def test_idempotency_key_with_another_body_is_422(orders_app: OrdersApp) -> None:
    pid = await create_product(orders_app.inv, stock=5)
    user = {**new_user(), "Idempotency-Key": "same-key"}
    assert (await buy(orders_app, user, pid, 1)).status_code == 201
    assert_problem(await buy(orders_app, user, pid, 2), 422, "idempotency-mismatch")
    assert await stock_of(orders_app, pid) == 4


async def test_idempotency_key_in_flight_is_409(orders_app: OrdersApp) -> None:
    pid = await create_product(orders_app.inv, stock=50)
    user = {**new_user(), "Idempotency-Key": f"k-{uuid.uuid4()}"}
    replies = await asyncio.gather(*(buy(orders_app, user, pid) for _ in range(20)))
    codes = sorted(r.status_code for r in replies)
    created = [r for r in replies if r.status_code == 201]
    assert set(codes) <= {201, 409}
    assert len({r.json()["id"] for r in created}) == 1  # one order, replays of it
    assert sum(1 for r in created if "idempotent-replayed" not in r.headers) == 1
    for r in replies:
        if r.status_code == 409:
            assert_problem(r, 409, "idempotency-in-progress")
    assert await stock_of(orders_app, pid) == 49


async def test_abandoned_key_is_taken_over_with_the_same_order_id(orders_app: OrdersApp) -> None:
    """A worker died after claiming the key: a retry reuses its order id, once."""
    from services.catalog.idempotency import SCOPE_CREATE_ORDER, request_hash

    pid = await create_product(orders_app.inv, stock=5)
    user = new_user()
    order_id = uuid.uuid4()
    fingerprint = request_hash({"product_id": pid, "quantity": 1})
    async with orders_app.inv.pool.acquire() as conn:
        await conn.execute(
            """
            INSERT INTO idempotency_keys (user_id, scope, key, request_hash, order_id,
                                          locked_until, expires_at)
            VALUES ($1, $2, 'dead', $3, $4, now() + interval '1 minute', now() + interval '1 day')
            """,
            user["X-User-Id"],
            SCOPE_CREATE_ORDER,
            fingerprint,
            order_id,
        )
    headers = {**user, "Idempotency-Key": "dead"}
    assert_problem(await buy(orders_app, headers, pid), 409, "idempotency-in-progress")
    async with orders_app.inv.pool.acquire() as conn:
        await conn.execute("UPDATE idempotency_keys SET locked_until = now() WHERE key = 'dead'")
    taken = await buy(orders_app, headers, pid)
    assert taken.status_code == 201, taken.text
    assert taken.json()["id"] == str(order_id)
    replay = await buy(orders_app, headers, pid)
    assert replay.content == taken.content
    assert await stock_of(orders_app, pid) == 4


@pytest.mark.parametrize("key", ["", "x" * 256, "has space", "tab\there"])
async def test_bad_idempotency_keys_are_422(orders_app: OrdersApp, key: str) -> None:
    resp = await orders_app.client.post(
        "/api/v1/orders",
        json={"product_id": 1, "quantity": 1},
        headers={**new_user(), "Idempotency-Key": key},
    )
    assert_problem(resp, 422, "validation-error")


async def test_openapi_lists_the_order_routes(orders_app: OrdersApp) -> None:
    schema = (await orders_app.client.get("/openapi.json")).json()
    paths = schema["paths"]
    for path in (
        "/api/v1/orders",
        "/api/v1/orders/{order_id}",
        "/api/v1/orders/{order_id}/cancel",
        "/internal/v1/orders/{order_id}",
        "/internal/v1/orders/{order_id}/hold",
        "/internal/v1/orders/{order_id}/paid",
        "/internal/v1/orders/{order_id}/release",
    ):
        assert path in paths, path
    post = paths["/api/v1/orders"]["post"]
    assert {"201", "401", "404", "409", "413", "422", "429", "503"} <= set(post["responses"])
    assert "application/problem+json" in post["responses"]["409"]["content"]
    assert "Order" in schema["components"]["schemas"]
    # The success body is the model (not FastAPI's `{"type": "string"}` for a plain
    # Response class), errors are the one Problem schema, the user routes need the bearer.
    ok = post["responses"]["201"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/Order"}
    for status, response in post["responses"].items():
        if status[0] in "45":
            (media,) = response["content"]
            assert media == "application/problem+json", status
            assert response["content"][media]["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert post["security"] == [{"bearerAuth": []}]
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "security" not in paths["/internal/v1/orders/{order_id}"]["get"]
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    links = post["responses"]["201"]["links"]
    assert links["GetOrder"]["operationRef"] == "#/paths/~1api~1v1~1orders~1{order_id}/get"


async def test_redis_down_is_503_fast_not_a_postgres_storm(settings_kwargs: dict[str, Any]) -> None:
    """Without the gate the order path fails fast with 503 + Retry-After."""
    from services.catalog.app import create_app
    from tests.catalog.conftest import order_settings
    from tests.support.asgi import client_for
    from tests.support.servers import free_port

    down = {**settings_kwargs, "redis_url": f"redis://127.0.0.1:{free_port()}/0"}
    app = create_app(order_settings(down, redis_timeout_s=0.5))
    async with client_for(app) as client:
        pg_before = sample("shopstack_order_pg_queries_total")
        resp = await client.post(
            "/api/v1/orders", json={"product_id": 1, "quantity": 1}, headers=new_user()
        )
        assert_problem(resp, 503, "upstream-unavailable")
        assert resp.headers["retry-after"] == "1"
        assert sample("shopstack_order_pg_queries_total") == pg_before
        assert (await client.get("/readyz")).status_code == 503
