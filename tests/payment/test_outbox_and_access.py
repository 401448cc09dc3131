"""The outbox under a catalog outage, owner-only access (PAY-9), bad input, short connections."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.payment.catalog_standin import CatalogStandIn
from tests.payment.conftest import charges_for_order, pay, user, wait_until
from tests.psp_sandbox.process import ServiceProcess, declare_huge_body
from tests.support.problems import assert_problem


async def test_outbox_survives_a_catalog_outage(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"])
    await psp.post("/_sandbox/faults", json={"latency_ms": 800, "callback_drop_rate": 1.0})
    paying = asyncio.create_task(pay(api, me, order.id))
    await wait_until(lambda: standin.count("hold", order.id) == 1, timeout_s=3.0)
    await standin.stop()  # the catalog goes down while the charge is in flight
    try:
        resp = await paying
        assert resp.json()["status"] == "succeeded"
        payment_id = uuid.UUID(resp.json()["id"])

        async def failed_twice() -> bool:
            row = await pg.fetchrow(
                "SELECT attempts, last_error, delivered_at FROM payment_outbox "
                "WHERE payment_id = $1 AND kind = 'paid'",
                payment_id,
            )
            return bool(row and row["attempts"] >= 2 and row["delivered_at"] is None)

        await wait_until(failed_twice, timeout_s=5.0, interval_s=0.1)
        assert order.status == "reserved"
    finally:
        await standin.start()
    took = await wait_until(lambda: order.status == "paid", timeout_s=5.0)
    assert took < 2.5  # the relay's backoff is capped at 1 s in this run
    assert order.paid_by == payment_id
    assert await charges_for_order(pg, psp, order.id) == (1, 1)


async def test_a_paid_message_the_catalog_refuses_is_dead_and_flags_a_refund(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """The order lapsed while its charge was in flight: the catalog will never take the
    `paid` message. The relay stops retrying it and marks the payment for a refund,
    while the other payments of the same moment are delivered as usual."""
    me = user()
    doomed, fine = standin.add_order(me["X-User-Id"]), standin.add_order(me["X-User-Id"])
    await psp.post("/_sandbox/faults", json={"latency_ms": 500, "callback_drop_rate": 1.0})
    paying = [asyncio.create_task(pay(api, me, o.id)) for o in (doomed, fine)]
    await wait_until(lambda: standin.count("hold", doomed.id) == 1, timeout_s=3.0)
    doomed.status = "expired"  # the catalog's sweeper, say, once the hold had lapsed
    replies = [await task for task in paying]
    assert [r.json()["status"] for r in replies] == ["succeeded", "succeeded"]
    doomed_id = uuid.UUID(replies[0].json()["id"])

    async def dead() -> bool:
        return bool(
            await pg.fetchval(
                "SELECT dead_at IS NOT NULL FROM payment_outbox "
                "WHERE payment_id = $1 AND kind = 'paid'",
                doomed_id,
            )
        )

    await wait_until(dead, timeout_s=3.0, interval_s=0.05)
    await wait_until(lambda: fine.status == "paid", timeout_s=2.0)
    row = await pg.fetchrow(
        "SELECT p.refund_required, o.delivered_at, o.last_error FROM payments p "
        "JOIN payment_outbox o ON o.payment_id = p.id WHERE p.id = $1",
        doomed_id,
    )
    assert row["refund_required"] is True
    assert row["delivered_at"] is None
    assert "order-not-payable" in row["last_error"]
    assert doomed.status == "expired"
    attempts = standin.count("paid", doomed.id)
    await asyncio.sleep(0.5)
    assert standin.count("paid", doomed.id) == attempts == 1  # never retried


async def test_pay9_other_users_payments_and_orders_are_404(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn
) -> None:
    alice, bob = user(), user()
    orders = [standin.add_order(alice["X-User-Id"], amount_cents=7777) for _ in range(5)]
    payments = [(await pay(api, alice, o.id)).json()["id"] for o in orders]
    unknown = await api.get(f"/api/v1/payments/{uuid.uuid4()}", headers=bob)
    assert_problem(unknown, 404, "not-found")
    ids = payments + [str(uuid.uuid4()) for _ in range(195)]
    replies = await asyncio.gather(*(api.get(f"/api/v1/payments/{i}", headers=bob) for i in ids))
    for resp in replies:
        assert resp.status_code == 404
        assert resp.content == unknown.content  # nothing tells a real id from a made-up one
    for payment_id in payments:
        assert (await api.get(f"/api/v1/payments/{payment_id}", headers=alice)).status_code == 200
    not_found_order = await pay(api, bob, uuid.uuid4())
    for order in orders:
        theirs = await pay(api, bob, order.id)
        assert theirs.status_code == 404
        assert theirs.content == not_found_order.content
        assert "7777" not in theirs.text
    assert_problem(await api.get(f"/api/v1/payments/{payments[0]}"), 401, "unauthorized")
    # An order alice has not paid yet: bob's attempt neither holds it nor charges it.
    unpaid = standin.add_order(alice["X-User-Id"], amount_cents=7777)
    theirs = await pay(api, bob, unpaid.id)
    assert theirs.content == not_found_order.content
    assert unpaid.held_by is None
    assert (await pay(api, alice, unpaid.id)).json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("content", "headers", "status", "code"),
    [
        (b'{"order_id": ', {}, 422, "validation-error"),
        (b'{"order_id": 12}', {}, 422, "validation-error"),
        (b'{"order_id": "not-a-uuid"}', {}, 422, "validation-error"),
        (b'{"order_id": null}', {}, 422, "validation-error"),
        (b"{}", {}, 422, "validation-error"),
        (b"[]", {}, 422, "validation-error"),
        (b"\xff\xfe", {}, 422, "validation-error"),
        (b'{"order_id": "%s", "amount_cents": 1}', {}, 422, "validation-error"),
        (b'{"order_id": "%s", "status": "succeeded"}', {}, 422, "validation-error"),
        (b'{"order_id": "%s"}', {"Idempotency-Key": "k" * 256}, 422, "validation-error"),
        (b'{"order_id": "%s"}', {"Idempotency-Key": "tab\there"}, 422, "validation-error"),
        (b'{"order_id": "%s"}', {"X-User-Id": ""}, 401, "unauthorized"),
    ],
)
async def test_bad_payment_requests_are_problems(
    api: httpx.AsyncClient,
    standin: CatalogStandIn,
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"])
    if b"%s" in content:
        content = content.replace(b"%s", str(order.id).encode())
    resp = await api.post(
        "/api/v1/payments",
        content=content,
        headers={**me, "Content-Type": "application/json", **headers},
    )
    assert_problem(resp, status, code)
    assert standin.count("get", order.id) == 0


async def test_other_bad_requests(api: httpx.AsyncClient, payment_process: ServiceProcess) -> None:
    me = user()
    assert_problem(await api.get("/api/v1/payments/nope", headers=me), 422, "validation-error")
    assert_problem(
        await api.delete(f"/api/v1/payments/{uuid.uuid4()}", headers=me), 405, "method-not-allowed"
    )
    status, body = await declare_huge_body(payment_process.port, "/api/v1/payments")
    assert status == 413
    assert b"payload-too-large" in body
    status, body = await declare_huge_body(payment_process.port, "/api/v1/payments/callbacks/psp")
    assert status == 413


async def test_short_connections(
    payment_process: ServiceProcess, api: httpx.AsyncClient, standin: CatalogStandIn
) -> None:
    """Every request on a fresh connection with Connection: close, as a short-lived client."""
    me = user()
    for _ in range(30):
        async with httpx.AsyncClient(base_url=payment_process.url, timeout=5) as fresh:
            order = standin.add_order(me["X-User-Id"])
            resp = await fresh.post(
                "/api/v1/payments",
                json={"order_id": str(order.id)},
                headers={**me, "Connection": "close"},
            )
            assert resp.status_code == 201
            assert resp.headers.get("connection") == "close"
    metrics = (await api.get("/metrics")).text
    for name in (
        "shopstack_payment_breaker_state",
        "shopstack_payment_provider_attempts_total",
        "shopstack_payment_outcomes_total",
        "shopstack_payment_outbox_deliveries_total",
    ):
        assert name in metrics


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
def test_payment_listens_with_the_tuned_backlog(payment_process: ServiceProcess) -> None:
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{payment_process.port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    # For a listening socket ss shows the accept backlog as Send-Q (capped by somaxconn).
    assert int(out[2]) == min(4096, somaxconn)
