"""Idempotency-Key semantics through the real service (PAY-1, PAY-2)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import httpx
import pytest
from pydantic import ValidationError

from services.payment import storage
from services.payment.idempotency import fingerprint
from services.payment.settings import PaymentSettings
from tests.payment.catalog_standin import CatalogStandIn
from tests.payment.conftest import charges_for_order, pay, user, wait_until
from tests.support.problems import assert_problem


async def test_pay1_same_key_50_concurrent_then_50_sequential(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """PAY-1: 1 provider charge; in-flight duplicates 409; replays byte-identical."""
    me = user()
    order = standin.add_order(me["X-User-Id"])
    key = "pay1-" + uuid.uuid4().hex
    # The provider takes 500 ms, so every twin arrives while the first is in flight.
    await psp.post("/_sandbox/faults", json={"latency_ms": 500})
    replies = await asyncio.gather(*(pay(api, me, order.id, key=key) for _ in range(50)))
    firsts = [r for r in replies if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    in_flight = [r for r in replies if r.status_code == 409]
    replayed = [r for r in replies if r.headers.get("idempotent-replayed") == "true"]
    assert len(firsts) == 1
    assert len(in_flight) + len(replayed) == 49
    assert len(in_flight) >= 40
    for r in in_flight:
        assert_problem(r, 409, "idempotency-in-progress")
        assert r.headers["retry-after"] == "1"
    first = firsts[0]
    assert first.json()["status"] == "succeeded"
    for _ in range(50):
        again = await pay(api, me, order.id, key=key)
        assert again.status_code == 201
        assert again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
    for r in replayed:
        assert r.content == first.content
    assert await charges_for_order(pg, psp, order.id) == (1, 1)
    assert await pg.fetchval("SELECT count(*) FROM payments WHERE order_id = $1", order.id) == 1


async def test_pay2_same_key_other_body_is_422_and_charges_nothing(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """PAY-2: the amount cannot be sent at all, so "another payload" is another order."""
    me = user()
    first_order = standin.add_order(me["X-User-Id"], amount_cents=1000)
    other_order = standin.add_order(me["X-User-Id"], amount_cents=1)
    key = "pay2-" + uuid.uuid4().hex
    assert (await pay(api, me, first_order.id, key=key)).status_code == 201
    assert_problem(await pay(api, me, other_order.id, key=key), 422, "idempotency-mismatch")
    assert await charges_for_order(pg, psp, other_order.id) == (0, 0)
    assert await charges_for_order(pg, psp, first_order.id) == (1, 1)
    # A body with an amount is not even a valid request (and is not stored under the key).
    resp = await api.post(
        "/api/v1/payments",
        json={"order_id": str(first_order.id), "amount_cents": 1},
        headers={**me, "Idempotency-Key": key},
    )
    assert_problem(resp, 422, "validation-error")


async def test_keys_are_scoped_per_user(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn
) -> None:
    alice, bob = user(), user()
    order = standin.add_order(alice["X-User-Id"])
    key = "shared-" + uuid.uuid4().hex
    paid = await pay(api, alice, order.id, key=key)
    assert paid.status_code == 201
    # Bob sends Alice's key with Alice's body: no replay of Alice's payment for him.
    theirs = await pay(api, bob, order.id, key=key)
    assert_problem(theirs, 404, "not-found")
    assert "idempotent-replayed" not in theirs.headers
    assert str(order.id) not in theirs.text


async def test_refusals_are_stored_and_replayed_too(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"], status="expired")
    key = "refused-" + uuid.uuid4().hex
    first = await pay(api, me, order.id, key=key)
    assert_problem(first, 409, "order-not-payable")
    order.status = "reserved"  # replays return the first answer, not a new one
    again = await pay(api, me, order.id, key=key)
    assert again.status_code == 409
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"


async def test_a_5xx_before_any_charge_frees_the_key(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"])
    key = "outage-" + uuid.uuid4().hex
    await standin.stop()
    try:
        down = await pay(api, me, order.id, key=key)
        doc = assert_problem(down, 503, "upstream-unavailable")
        assert "catalog" in doc["detail"]
        assert down.headers["retry-after"] == "1"
    finally:
        await standin.start()
    up = await pay(api, me, order.id, key=key)
    assert up.status_code == 201
    assert "idempotent-replayed" not in up.headers
    assert up.json()["status"] == "succeeded"
    assert await charges_for_order(pg, psp, order.id) == (1, 1)


async def test_a_key_whose_request_died_is_taken_over_and_resumed(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """A worker died holding the key (SHD-2): after the lock timeout the same payment id resumes."""
    me = user()
    order = standin.add_order(me["X-User-Id"])
    key = "orphan-" + uuid.uuid4().hex
    payment_id = uuid.uuid4()
    body = {"order_id": str(order.id)}
    await pg.execute(
        "INSERT INTO payment_idempotency_keys (user_id, key, fingerprint, payment_id, locked_at) "
        "VALUES ($1, $2, $3, $4, now() - interval '1 hour')",
        me["X-User-Id"],
        key,
        fingerprint("POST", "/api/v1/payments", body),
        payment_id,
    )
    resp = await pay(api, me, order.id, key=key)
    assert resp.status_code == 201
    assert resp.json()["id"] == str(payment_id)
    assert resp.json()["status"] == "succeeded"
    # A key locked a moment ago is still in flight.
    fresh = "busy-" + uuid.uuid4().hex
    await pg.execute(
        "INSERT INTO payment_idempotency_keys (user_id, key, fingerprint, payment_id, locked_at) "
        "VALUES ($1, $2, $3, $4, now())",
        me["X-User-Id"],
        fresh,
        fingerprint("POST", "/api/v1/payments", body),
        uuid.uuid4(),
    )
    assert_problem(await pay(api, me, order.id, key=fresh), 409, "idempotency-in-progress")
    await wait_until(lambda: order.status == "paid", timeout_s=2.0)


async def test_keys_live_at_least_24_hours(pg: asyncpg.Connection) -> None:
    owner = "ttl-" + uuid.uuid4().hex[:8]
    for age_h, key in ((23, "young"), (25, "old")):
        await pg.execute(
            "INSERT INTO payment_idempotency_keys (user_id, key, fingerprint, created_at, "
            "completed_at, response_status, response_body) "
            "VALUES ($1, $2, 'f', now() - make_interval(hours => $3), now(), 201, '')",
            owner,
            key,
            age_h,
        )
    await storage.expire_keys(pg, ttl_s=86_400, limit=1000)
    left = await pg.fetch("SELECT key FROM payment_idempotency_keys WHERE user_id = $1", owner)
    assert [r["key"] for r in left] == ["young"]
    with pytest.raises(ValidationError):
        PaymentSettings(payment_idempotency_ttl_s=3600)
