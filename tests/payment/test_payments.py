"""Paying orders through the real service: outcomes, holds, the order becoming paid."""

from __future__ import annotations

import time
import uuid

import asyncpg
import httpx

from tests.payment.catalog_standin import CatalogStandIn
from tests.payment.conftest import (
    charges_for_order,
    pay,
    user,
    wait_until,
)
from tests.support.problems import assert_problem


async def test_a_payment_succeeds_and_the_order_is_paid_within_2s(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"], amount_cents=4321, currency="USD")
    resp = await pay(api, me, order.id)
    answered = time.monotonic()
    assert resp.status_code == 201, resp.text
    doc = resp.json()
    assert set(doc) == {"id", "order_id", "status", "amount_cents", "currency"}
    assert doc["status"] == "succeeded"
    assert (doc["order_id"], doc["amount_cents"], doc["currency"]) == (str(order.id), 4321, "USD")
    await wait_until(lambda: order.status == "paid", timeout_s=2.0)
    assert time.monotonic() - answered < 2.0
    assert order.paid_by == uuid.UUID(doc["id"])
    again = await api.get(f"/api/v1/payments/{doc['id']}", headers=me)
    assert again.status_code == 200
    assert again.json() == doc
    assert await charges_for_order(pg, psp, order.id) == (1, 1)
    # Payment row and outbox row were committed together.
    outbox = await pg.fetch(
        "SELECT kind, delivered_at FROM payment_outbox WHERE payment_id = $1", uuid.UUID(doc["id"])
    )
    assert [r["kind"] for r in outbox] == ["paid"]


async def test_a_declined_charge_fails_and_releases_the_hold(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"])
    await psp.post("/_sandbox/faults", json={"next_faults": ["decline"]})
    first = await pay(api, me, order.id)
    assert first.status_code == 201
    assert first.json()["status"] == "failed"
    await wait_until(lambda: standin.count("release", order.id) >= 1, timeout_s=2.0)
    assert order.held_by is None
    assert order.status == "reserved"
    second = await pay(api, me, order.id)
    assert second.json()["status"] == "succeeded"
    await wait_until(lambda: order.status == "paid", timeout_s=2.0)
    assert await charges_for_order(pg, psp, order.id) == (2, 2)  # one declined, one paid


async def test_orders_that_cannot_be_paid_are_refused(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    me = user()
    for status in ("expired", "cancelled", "paid"):
        order = standin.add_order(me["X-User-Id"], status=status)
        assert_problem(await pay(api, me, order.id), 409, "order-not-payable")
        assert await pg.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", order.id) == 0
    # Held by another payment (another service instance, say): the hold refuses us.
    held = standin.add_order(me["X-User-Id"])
    held.held_by, held.held_until = uuid.uuid4(), time.monotonic() + 600
    assert_problem(await pay(api, me, held.id), 409, "order-not-payable")
    assert await charges_for_order(pg, psp, held.id) == (0, 0)
    # Paid once: a second payment is refused without touching the provider.
    order = standin.add_order(me["X-User-Id"])
    assert (await pay(api, me, order.id)).json()["status"] == "succeeded"
    assert_problem(await pay(api, me, order.id), 409, "order-not-payable")
    assert await charges_for_order(pg, psp, order.id) == (1, 1)


async def test_an_order_with_a_payment_in_flight_is_refused_and_the_hold_given_back(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """Another payment of the order is still pending (its catalog hold has lapsed): the
    new attempt gets 409, charges nothing and releases the hold it took."""
    me = user()
    order = standin.add_order(me["X-User-Id"], amount_cents=2500)
    await pg.execute(
        """
        INSERT INTO payments (id, order_id, user_id, amount_cents, currency, provider, status,
                              next_settle_at)
        VALUES ($1, $2, $3, 2500, 'EUR', 'psp_sandbox', 'pending', now() + interval '1 hour')
        """,
        uuid.uuid4(),
        order.id,
        me["X-User-Id"],
    )
    assert_problem(await pay(api, me, order.id), 409, "order-not-payable")
    assert standin.count("hold", order.id) == 1
    assert standin.count("release", order.id) == 1
    assert order.held_by is None
    assert await charges_for_order(pg, psp, order.id) == (0, 0)


async def test_unknown_order_is_404(api: httpx.AsyncClient, psp: httpx.AsyncClient) -> None:
    assert_problem(await pay(api, user(), uuid.uuid4()), 404, "not-found")


async def test_pay3_lost_reply_is_retried_with_the_same_key_and_charged_once(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """PAY-3: the provider charges, then the connection drops before the reply."""
    me = user()
    order = standin.add_order(me["X-User-Id"])
    await psp.post("/_sandbox/faults", json={"next_faults": ["reset"]})
    started = time.monotonic()
    resp = await pay(api, me, order.id, key="pay3-" + uuid.uuid4().hex)
    assert resp.status_code == 201
    assert resp.json()["status"] == "succeeded"  # the retry got the existing charge back
    await wait_until(lambda: order.status == "paid", timeout_s=5.0)
    assert time.monotonic() - started < 5.0
    created, requests = await charges_for_order(pg, psp, order.id)
    assert (created, requests) == (1, 2)


async def test_pay3_every_reply_lost_then_client_retries_5x(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """PAY-3: every attempt's reply is lost: pending, settled by the callback; 5 client retries."""
    me = user()
    order = standin.add_order(me["X-User-Id"])
    # The callback comes late, so the reply the client gets is the unknown outcome.
    await psp.post("/_sandbox/faults", json={"reset_rate": 1.0, "callback_delay_ms": 1500})
    key = "pay3-all-" + uuid.uuid4().hex
    started = time.monotonic()
    first = await pay(api, me, order.id, key=key)
    assert first.status_code == 201
    assert first.json()["status"] == "pending"
    for _ in range(5):
        again = await pay(api, me, order.id, key=key)
        assert again.status_code == 201
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
    await wait_until(lambda: order.status == "paid", timeout_s=5.0)
    assert time.monotonic() - started < 5.0
    status = (await api.get(f"/api/v1/payments/{first.json()['id']}", headers=me)).json()["status"]
    assert status == "succeeded"
    created, _ = await charges_for_order(pg, psp, order.id)
    assert created == 1
