"""The internal API the payment service calls: hold, paid, release (and expiry around it)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from services.catalog import orders
from tests.catalog.conftest import OrdersApp, assert_consistent, create_product, new_user
from tests.catalog.test_products import assert_problem


async def _reserve(app: OrdersApp, qty: int = 1) -> tuple[int, str, dict[str, str]]:
    pid = await create_product(app.inv, stock=10)
    user = new_user()
    resp = await app.client.post(
        "/api/v1/orders", json={"product_id": pid, "quantity": qty}, headers=user
    )
    assert resp.status_code == 201
    return pid, resp.json()["id"], user


async def call(app: OrdersApp, order_id: str, action: str, payment_id: str) -> Any:
    return await app.client.post(
        f"/internal/v1/orders/{order_id}/{action}", json={"payment_id": payment_id}
    )


async def _set(app: OrdersApp, order_id: str, **columns: str) -> None:
    sets = ", ".join(f"{name} = {expr}" for name, expr in columns.items())
    async with app.inv.pool.acquire() as conn:
        await conn.execute(f"UPDATE orders SET {sets} WHERE id = $1", uuid.UUID(order_id))  # noqa: S608


async def test_internal_get_shows_owner_and_hold(orders_app: OrdersApp) -> None:
    _, order_id, user = await _reserve(orders_app, 2)
    resp = await orders_app.client.get(f"/internal/v1/orders/{order_id}")
    assert resp.status_code == 200
    doc = resp.json()
    assert set(doc) == {
        "id",
        "user_id",
        "status",
        "product_id",
        "quantity",
        "amount_cents",
        "currency",
        "expires_at",
        "held_by",
    }
    assert doc["user_id"] == user["X-User-Id"]
    assert doc["held_by"] is None
    assert doc["quantity"] == 2
    assert doc["amount_cents"] == 2 * 1999
    missing = await orders_app.client.get(f"/internal/v1/orders/{uuid.uuid4()}")
    assert_problem(missing, 404, "not-found")


async def test_hold_then_paid_is_idempotent(orders_app: OrdersApp) -> None:
    pid, order_id, user = await _reserve(orders_app)
    payment = str(uuid.uuid4())
    held = await call(orders_app, order_id, "hold", payment)
    assert held.status_code == 200
    assert held.json()["held_by"] == payment
    assert (await call(orders_app, order_id, "hold", payment)).status_code == 200  # same payment
    other = str(uuid.uuid4())
    assert_problem(await call(orders_app, order_id, "hold", other), 409, "order-not-payable")
    assert_problem(await call(orders_app, order_id, "paid", other), 409, "order-not-payable")
    # The user cannot cancel while the payment is in flight.
    cancel = await orders_app.client.post(f"/api/v1/orders/{order_id}/cancel", headers=user)
    assert_problem(cancel, 409, "order-not-cancellable")
    paid = await call(orders_app, order_id, "paid", payment)
    assert paid.status_code == 200
    assert paid.json()["status"] == "paid"
    assert paid.json()["held_by"] == payment
    again = await call(orders_app, order_id, "paid", payment)
    assert again.status_code == 200
    assert again.json() == paid.json()
    assert (await call(orders_app, order_id, "hold", payment)).json()["status"] == "paid"
    assert_problem(await call(orders_app, order_id, "paid", other), 409, "order-not-payable")
    assert_problem(await call(orders_app, order_id, "hold", other), 409, "order-not-payable")
    owner_view = await orders_app.client.get(f"/api/v1/orders/{order_id}", headers=user)
    assert owner_view.json()["status"] == "paid"
    await assert_consistent(orders_app.inv, pid)


async def test_paid_without_a_hold_is_accepted_while_reserved(orders_app: OrdersApp) -> None:
    pid, order_id, _ = await _reserve(orders_app)
    paid = await call(orders_app, order_id, "paid", str(uuid.uuid4()))
    assert paid.status_code == 200
    assert paid.json()["status"] == "paid"
    await assert_consistent(orders_app.inv, pid)


async def test_release_drops_only_its_own_hold(orders_app: OrdersApp) -> None:
    pid, order_id, user = await _reserve(orders_app)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    await call(orders_app, order_id, "hold", first)
    noop = await call(orders_app, order_id, "release", second)
    assert noop.status_code == 200
    assert noop.json()["held_by"] == first
    released = await call(orders_app, order_id, "release", first)
    assert released.status_code == 200
    assert released.json()["held_by"] is None
    assert (await call(orders_app, order_id, "release", first)).status_code == 200
    assert (await call(orders_app, order_id, "hold", second)).json()["held_by"] == second
    await call(orders_app, order_id, "release", second)
    cancel = await orders_app.client.post(f"/api/v1/orders/{order_id}/cancel", headers=user)
    assert cancel.json()["status"] == "cancelled"
    assert_problem(await call(orders_app, order_id, "hold", first), 409, "order-not-payable")
    assert_problem(await call(orders_app, order_id, "paid", first), 409, "order-not-payable")
    await assert_consistent(orders_app.inv, pid)


async def test_a_held_order_is_not_expired_until_the_hold_lapses(orders_app: OrdersApp) -> None:
    pid, order_id, _ = await _reserve(orders_app)
    payment = str(uuid.uuid4())
    await call(orders_app, order_id, "hold", payment)
    await _set(orders_app, order_id, expires_at="now() - interval '1 minute'")
    await orders.expire_due_orders(inv=orders_app.inv)
    doc = (await orders_app.client.get(f"/internal/v1/orders/{order_id}")).json()
    assert doc["status"] == "reserved"
    # The charge settles late: still accepted, because the hold kept the units.
    await _set(orders_app, order_id, held_until="now() - interval '1 second'")
    paid = await call(orders_app, order_id, "paid", payment)
    assert paid.json()["status"] == "paid"
    await assert_consistent(orders_app.inv, pid)


async def test_lapsed_hold_lets_the_sweeper_expire_and_returns_stock(
    orders_app: OrdersApp,
) -> None:
    pid, order_id, user = await _reserve(orders_app, 3)
    payment = str(uuid.uuid4())
    await call(orders_app, order_id, "hold", payment)
    await _set(
        orders_app,
        order_id,
        expires_at="now() - interval '1 minute'",
        held_until="now() - interval '1 second'",
    )
    expired = await orders.expire_due_orders(inv=orders_app.inv)
    assert str(expired[0]["id"]) == order_id
    doc = (await orders_app.client.get(f"/internal/v1/orders/{order_id}")).json()
    assert doc["status"] == "expired"
    assert doc["held_by"] is None
    row = await assert_consistent(orders_app.inv, pid)
    assert row["stock"] == 10
    assert_problem(await call(orders_app, order_id, "paid", payment), 409, "order-not-payable")
    # The owner's cancel of an expired order is a no-op: stock is not returned twice.
    cancel = await orders_app.client.post(f"/api/v1/orders/{order_id}/cancel", headers=user)
    assert cancel.json()["status"] == "expired"
    assert (await assert_consistent(orders_app.inv, pid))["stock"] == 10


async def test_unheld_reservation_past_its_expiry_is_not_payable(orders_app: OrdersApp) -> None:
    _, order_id, _ = await _reserve(orders_app)
    await _set(orders_app, order_id, expires_at="now() - interval '1 second'")
    assert_problem(
        await call(orders_app, order_id, "hold", str(uuid.uuid4())), 409, "order-not-payable"
    )


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"payment_id": "nope"},
        {"payment_id": 5},
        {"payment_id": str(uuid.uuid4()), "x": 1},
        # IN-1 found a NUL here a 500 (Postgres text): user ids are the gateway's own shape.
        {"payment_id": str(uuid.uuid4()), "user_id": "u\u0000"},
    ],
)
async def test_internal_bad_bodies_are_422(orders_app: OrdersApp, body: dict[str, Any]) -> None:
    _, order_id, _ = await _reserve(orders_app)
    resp = await orders_app.client.post(f"/internal/v1/orders/{order_id}/hold", json=body)
    assert_problem(resp, 422, "validation-error")
    unknown = await call(orders_app, str(uuid.uuid4()), "hold", str(uuid.uuid4()))
    assert_problem(unknown, 404, "not-found")


@pytest.mark.parametrize("action", ["hold", "paid", "release", None])
async def test_internal_bad_order_ids_are_422_naming_the_path(
    orders_app: OrdersApp, action: str | None
) -> None:
    path = "/internal/v1/orders/not-a-uuid" + (f"/{action}" if action else "")
    if action is None:
        resp = await orders_app.client.get(path)
    else:
        resp = await orders_app.client.post(path, json={"payment_id": str(uuid.uuid4())})
    doc = assert_problem(resp, 422, "validation-error")
    assert doc["errors"][0]["loc"] == ["path", "order_id"]


async def test_internal_body_errors_name_the_field(orders_app: OrdersApp) -> None:
    _, order_id, _ = await _reserve(orders_app)
    resp = await orders_app.client.post(
        f"/internal/v1/orders/{order_id}/paid", content=b'{"payment_id": "x"}'
    )
    doc = assert_problem(resp, 422, "validation-error")
    assert doc["errors"][0]["loc"] == ["body", "payment_id"]


async def test_hold_with_user_id_refuses_anyone_but_the_owner(orders_app: OrdersApp) -> None:
    _, order_id, user = await _reserve(orders_app)
    path = f"/internal/v1/orders/{order_id}/hold"
    payment = str(uuid.uuid4())
    other = await orders_app.client.post(path, json={"payment_id": payment, "user_id": "someone"})
    assert_problem(other, 404, "not-found")
    assert other.json()["detail"] == f"order {order_id} does not exist"  # as for a missing one
    doc = (await orders_app.client.get(f"/internal/v1/orders/{order_id}")).json()
    assert doc["held_by"] is None  # a refused hold leaves no trace
    mine = await orders_app.client.post(
        path, json={"payment_id": payment, "user_id": user["X-User-Id"]}
    )
    assert mine.status_code == 200
    assert mine.json()["held_by"] == payment
    assert mine.json()["amount_cents"] == 1999
    # user_id belongs to hold only; paid and release refuse unknown fields.
    for action in ("paid", "release"):
        resp = await orders_app.client.post(
            f"/internal/v1/orders/{order_id}/{action}",
            json={"payment_id": payment, "user_id": user["X-User-Id"]},
        )
        assert_problem(resp, 422, "validation-error")
    for bad in ("", 5, "u" * 201):
        resp = await orders_app.client.post(path, json={"payment_id": payment, "user_id": bad})
        assert_problem(resp, 422, "validation-error")


async def test_order_outcomes_answer_each_item_as_its_own_call(orders_app: OrdersApp) -> None:
    """One batch: paid for a held order, paid for an order another payment holds (409),
    an unknown order (404), a release, and on one order a release of one payment then
    a paid by another, applied in the order given."""
    pid, held, _ = await _reserve(orders_app)
    _, contested, _ = await _reserve(orders_app)
    _, handed_over, _ = await _reserve(orders_app)
    p1, p2, p3, p4 = (str(uuid.uuid4()) for _ in range(4))
    await call(orders_app, held, "hold", p1)
    await call(orders_app, contested, "hold", p2)
    await call(orders_app, handed_over, "hold", p3)
    unknown = str(uuid.uuid4())
    items = [
        {"kind": "paid", "order_id": held, "payment_id": p1},
        {"kind": "paid", "order_id": contested, "payment_id": p4},
        {"kind": "paid", "order_id": unknown, "payment_id": p4},
        {"kind": "release", "order_id": handed_over, "payment_id": p3},
        {"kind": "paid", "order_id": handed_over, "payment_id": p4},
    ]
    resp = await orders_app.client.post("/internal/v1/order-outcomes", json={"items": items})
    assert resp.status_code == 200
    results = resp.json()["results"]
    assert [(r["order_id"], r["kind"], r["status"]) for r in results] == [
        (held, "paid", 200),
        (contested, "paid", 409),
        (unknown, "paid", 404),
        (handed_over, "release", 200),
        (handed_over, "paid", 200),
    ]
    assert results[0]["order"]["status"] == "paid"
    assert results[0]["problem"] is None
    assert results[1]["order"] is None
    assert results[1]["problem"]["type"].endswith("/order-not-payable")
    assert results[2]["problem"]["type"].endswith("/not-found")
    assert results[3]["order"]["held_by"] is None
    assert results[4]["order"]["held_by"] == p4  # the payment that paid it
    # The same answers as the single calls, and the batch is idempotent.
    assert (await call(orders_app, held, "paid", p1)).json() == results[0]["order"]
    again = await orders_app.client.post("/internal/v1/order-outcomes", json={"items": items})
    assert [r["status"] for r in again.json()["results"]] == [200, 409, 404, 200, 200]
    contested_doc = (await orders_app.client.get(f"/internal/v1/orders/{contested}")).json()
    assert (contested_doc["status"], contested_doc["held_by"]) == ("reserved", p2)
    await assert_consistent(orders_app.inv, pid)


@pytest.mark.parametrize(
    "body",
    [
        {"items": []},
        {
            "items": [
                {"kind": "refund", "order_id": str(uuid.uuid4()), "payment_id": str(uuid.uuid4())}
            ]
        },
        {"items": [{"kind": "paid", "order_id": "nope", "payment_id": str(uuid.uuid4())}]},
        {"items": [{"kind": "paid", "order_id": str(uuid.uuid4())}]},
        {
            "items": [
                {
                    "kind": "paid",
                    "order_id": str(uuid.uuid4()),
                    "payment_id": str(uuid.uuid4()),
                    "x": 1,
                }
            ]
        },
        {
            "items": [
                {"kind": "release", "order_id": str(uuid.uuid4()), "payment_id": str(uuid.uuid4())}
            ]
            * 501
        },
        {"things": []},
        [],
    ],
)
async def test_order_outcomes_refuse_a_bad_batch_whole(orders_app: OrdersApp, body: Any) -> None:
    resp = await orders_app.client.post("/internal/v1/order-outcomes", json=body)
    assert_problem(resp, 422, "validation-error")


async def test_hold_takes_over_a_lapsed_hold_and_renews_its_own(orders_app: OrdersApp) -> None:
    """The one-statement hold agrees with the locked path on the edges of a hold."""
    _, order_id, user = await _reserve(orders_app)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    owner = user["X-User-Id"]
    body = {"user_id": owner}
    path = f"/internal/v1/orders/{order_id}/hold"
    assert (
        await orders_app.client.post(path, json={**body, "payment_id": first})
    ).status_code == 200
    # Past its expiry, the order stays holdable by the payment that holds it...
    await _set(orders_app, order_id, expires_at="now() - interval '1 minute'")
    renewed = await orders_app.client.post(path, json={**body, "payment_id": first})
    assert renewed.status_code == 200
    assert renewed.json()["held_by"] == first
    # ...and by no one else, even once that hold lapses.
    await _set(orders_app, order_id, held_until="now() - interval '1 second'")
    late = await orders_app.client.post(path, json={**body, "payment_id": second})
    assert_problem(late, 409, "order-not-payable")
    # Before its expiry, a lapsed hold of another payment is taken over.
    await _set(orders_app, order_id, expires_at="now() + interval '10 minutes'")
    taken = await orders_app.client.post(path, json={**body, "payment_id": second})
    assert taken.status_code == 200
    assert taken.json()["held_by"] == second
    assert_problem(
        await orders_app.client.post(path, json={**body, "payment_id": first}),
        409,
        "order-not-payable",
    )
