"""PAY-5 signed callbacks and PAY-6 duplicate / out-of-order events, over real HTTP."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import httpx
import orjson

from services.payment.state import RecentSet
from services.psp_sandbox.webhooks import signature, signature_header
from tests.payment.catalog_standin import CatalogStandIn, StandInOrder
from tests.payment.conftest import pay, user, wait_until
from tests.psp_sandbox.process import WEBHOOK_SECRET
from tests.support.problems import assert_problem

CALLBACK = "/api/v1/payments/callbacks/psp"


def event(
    payment_id: uuid.UUID,
    kind: str,
    *,
    created: int | None = None,
    event_id: str | None = None,
    amount_cents: int = 1999,
    currency: str = "EUR",
    charge_id: str = "ch_test",
) -> bytes:
    return orjson.dumps(
        {
            "id": event_id or "evt_" + uuid.uuid4().hex,
            "type": f"charge.{kind}",
            "created": created if created is not None else int(time.time()),
            "data": {
                "charge_id": charge_id,
                "payment_id": str(payment_id),
                "amount_cents": amount_cents,
                "currency": currency,
            },
        }
    )


async def send(api: httpx.AsyncClient, body: bytes, header: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    headers["PSP-Signature"] = (
        header if header is not None else signature_header(WEBHOOK_SECRET, body)
    )
    return await api.post(CALLBACK, content=body, headers=headers)


async def pending_payment(
    pg: asyncpg.Connection, standin: CatalogStandIn, owner: str
) -> tuple[uuid.UUID, StandInOrder]:
    """A payment whose charge outcome is unknown, held at the catalog, not due for settling."""
    order = standin.add_order(owner)
    payment_id = uuid.uuid4()
    await pg.execute(
        "INSERT INTO payments (id, order_id, user_id, amount_cents, currency, status, provider, "
        "next_settle_at) "
        "VALUES ($1, $2, $3, $4, $5, 'pending', 'sandbox', now() + interval '1 hour')",
        payment_id,
        order.id,
        owner,
        order.amount_cents,
        order.currency,
    )
    order.held_by, order.held_until = payment_id, time.monotonic() + 600
    return payment_id, order


async def status_of(pg: asyncpg.Connection, payment_id: uuid.UUID) -> str:
    return str(await pg.fetchval("SELECT status FROM payments WHERE id = $1", payment_id))


async def outbox_kinds(pg: asyncpg.Connection, payment_id: uuid.UUID) -> list[str]:
    """The payment's outbox messages, oldest first."""
    rows = await pg.fetch(
        "SELECT kind FROM payment_outbox WHERE payment_id = $1 ORDER BY id", payment_id
    )
    return [r["kind"] for r in rows]


async def stored_events(pg: asyncpg.Connection, payment_id: uuid.UUID) -> list[tuple[str, bool]]:
    """(type, applied) of the payment's stored provider events, in arrival order."""
    rows = await pg.fetch(
        "SELECT type, applied FROM payment_psp_events WHERE payment_id = $1 ORDER BY received_at",
        payment_id,
    )
    return [(r["type"], r["applied"]) for r in rows]


async def fresh_second() -> int:
    """The current unix second, taken early in it: t is an integer, so t+301 sent late in a
    second could reach the server less than 301 s ahead of its clock."""
    while time.time() % 1 > 0.3:
        await asyncio.sleep(0.05)
    return int(time.time())


async def test_pay5_signature_matrix(api: httpx.AsyncClient) -> None:
    """valid; 1 byte changed; wrong secret; t-301 s; t+301 s; two signatures, one valid."""
    now = int(time.time())
    payment_id = uuid.uuid4()
    results = []

    valid = event(payment_id, "succeeded")
    results.append(await send(api, valid))

    body = event(payment_id, "succeeded")
    header = signature_header(WEBHOOK_SECRET, body)
    tampered = body.replace(b'"amount_cents":1999', b'"amount_cents":1998')
    assert len(tampered) == len(body)
    results.append(await send(api, tampered, header))

    body = event(payment_id, "succeeded")
    results.append(await send(api, body, signature_header("another-secret-" + "x" * 32, body)))

    body = event(payment_id, "succeeded")
    t = await fresh_second()
    results.append(await send(api, body, signature_header(WEBHOOK_SECRET, body, timestamp=t - 301)))

    body = event(payment_id, "succeeded")
    t = await fresh_second()
    results.append(await send(api, body, signature_header(WEBHOOK_SECRET, body, timestamp=t + 301)))

    body = event(payment_id, "succeeded")
    wrong = signature("old-rotated-secret-" + "y" * 32, now, body)
    right = signature(WEBHOOK_SECRET, now, body)
    results.append(await send(api, body, f"t={now},v1={wrong},v1={right}"))

    assert [r.status_code for r in results] == [200, 400, 400, 400, 400, 200]
    for resp in results[1:5]:
        assert_problem(resp, 400, "bad-signature")
    assert results[0].json() == {"status": "processed"}
    assert results[5].json() == {"status": "processed"}


async def test_malformed_signature_headers_are_400(api: httpx.AsyncClient) -> None:
    body = event(uuid.uuid4(), "succeeded")
    now = int(time.time())
    good = signature(WEBHOOK_SECRET, now, body)
    for header in (
        "",
        "garbage",
        f"v1={good}",
        f"t=abc,v1={good}",
        f"t={now}",
        f"t={now},t={now},v1={good}",
        f"t={now}," + ",".join(["v1=00"] * 9) + f",v1={good}",
        f"t=-{now},v1={good}",
    ):
        assert_problem(await send(api, body, header), 400, "bad-signature")
    no_header = await api.post(CALLBACK, content=body, headers={"Content-Type": "application/json"})
    assert_problem(no_header, 400, "bad-signature")


async def test_signed_but_invalid_events_are_422(api: httpx.AsyncClient) -> None:
    for body in (
        b"{",
        b"[]",
        b'{"id": "e", "type": "charge.succeeded"}',
        b'{"id": 1, "type": "charge.succeeded", "created": 1, "data": {}}',
    ):
        assert_problem(await send(api, body), 422, "validation-error")
    # IN-1 found these a 500: Postgres text cannot hold NUL (now no control characters).
    for field in ("id", "charge_id"):
        doc = orjson.loads(event(uuid.uuid4(), "succeeded"))
        (doc["data"] if field == "charge_id" else doc)[field] = "ch_\u0000"
        assert_problem(await send(api, orjson.dumps(doc)), 422, "validation-error")
    # ... and 7.0 is the integer 7, as JSON has it: signed and valid, about no payment.
    doc = orjson.loads(event(uuid.uuid4(), "succeeded"))
    doc["data"]["amount_cents"] = 1999.0
    resp = await send(api, orjson.dumps(doc))
    assert resp.status_code == 200, resp.text


async def test_pay6_same_event_ten_times_has_one_effect(
    api: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    payment_id, order = await pending_payment(pg, standin, "u-pay6-" + uuid.uuid4().hex[:6])
    body = event(payment_id, "succeeded", amount_cents=order.amount_cents)
    concurrent = await asyncio.gather(*(send(api, body) for _ in range(5)))
    sequential = [await send(api, body) for _ in range(5)]
    outcomes = [r.json()["status"] for r in (*concurrent, *sequential)]
    assert sorted(outcomes) == ["duplicate"] * 9 + ["processed"]
    assert await status_of(pg, payment_id) == "succeeded"
    await wait_until(lambda: order.status == "paid", timeout_s=2.0)
    assert await outbox_kinds(pg, payment_id) == ["paid"]
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM payment_psp_events WHERE payment_id = $1", payment_id
        )
        == 1
    )
    assert standin.count("paid", order.id) == 1


async def test_pay6_twins_of_an_event_about_a_settled_payment_record_it_once(
    api: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """The usual callback: the charge's reply already settled the payment, so the event
    is only recorded (one statement). Concurrent twins still record it once."""
    payment_id, order = await pending_payment(pg, standin, "u-pay6t-" + uuid.uuid4().hex[:6])
    first = event(payment_id, "succeeded", amount_cents=order.amount_cents)
    assert (await send(api, first)).json() == {"status": "processed"}
    for kind in ("succeeded", "failed"):  # a confirmation, then a late decline
        body = event(payment_id, kind, amount_cents=order.amount_cents)
        replies = await asyncio.gather(*(send(api, body) for _ in range(10)))
        outcomes = sorted(r.json()["status"] for r in replies)
        assert outcomes == ["duplicate"] * 9 + ["processed"]
    assert await stored_events(pg, payment_id) == [
        ("charge.succeeded", True),
        ("charge.succeeded", False),
        ("charge.failed", False),
    ]
    assert await status_of(pg, payment_id) == "succeeded"
    assert await outbox_kinds(pg, payment_id) == ["paid"]


async def test_pay6_failed_then_succeeded_ends_succeeded(
    api: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    payment_id, order = await pending_payment(pg, standin, "u-pay6b-" + uuid.uuid4().hex[:6])
    t0 = int(time.time())
    assert (await send(api, event(payment_id, "failed", created=t0))).json()[
        "status"
    ] == "processed"
    assert await status_of(pg, payment_id) == "failed"
    assert (await send(api, event(payment_id, "succeeded", created=t0 + 1))).json() == {
        "status": "processed"
    }
    assert await status_of(pg, payment_id) == "succeeded"  # money moved: that wins
    await wait_until(lambda: order.status == "paid", timeout_s=3.0)
    assert await outbox_kinds(pg, payment_id) == ["release", "paid"]


async def test_pay6_late_failed_event_cannot_undo_success(
    api: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    payment_id, order = await pending_payment(pg, standin, "u-pay6c-" + uuid.uuid4().hex[:6])
    t0 = int(time.time())
    late = event(payment_id, "failed", created=t0 - 5)
    assert (await send(api, event(payment_id, "succeeded", created=t0))).status_code == 200
    assert (await send(api, late)).json() == {"status": "processed"}
    assert (await send(api, late)).json() == {"status": "duplicate"}
    assert await status_of(pg, payment_id) == "succeeded"
    assert await stored_events(pg, payment_id) == [
        ("charge.succeeded", True),
        ("charge.failed", False),
    ]
    await wait_until(lambda: order.status == "paid", timeout_s=2.0)
    assert await outbox_kinds(pg, payment_id) == ["paid"]


async def test_pay6_sandbox_duplicates_and_reorders_a_real_payment(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"])
    await psp.post("/_sandbox/faults", json={"duplicate_rate": 1.0, "out_of_order_rate": 1.0})
    resp = await pay(api, me, order.id)
    assert resp.json()["status"] == "succeeded"
    payment_id = uuid.UUID(resp.json()["id"])

    async def both_events_seen() -> bool:
        count = await pg.fetchval(
            "SELECT count(*) FROM payment_psp_events WHERE payment_id = $1", payment_id
        )
        return bool(count == 2)

    await wait_until(both_events_seen, timeout_s=5.0)
    await asyncio.sleep(0.5)  # the duplicate delivery, too
    assert await status_of(pg, payment_id) == "succeeded"
    await wait_until(lambda: order.status == "paid", timeout_s=2.0)
    assert await outbox_kinds(pg, payment_id) == ["paid"]


async def test_events_that_do_not_match_the_payment_change_nothing(
    api: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    payment_id, _ = await pending_payment(pg, standin, "u-mm-" + uuid.uuid4().hex[:6])
    wrong_amount = event(payment_id, "succeeded", amount_cents=1)
    assert (await send(api, wrong_amount)).json() == {"status": "processed"}
    unknown: dict[str, Any] = orjson.loads(event(payment_id, "succeeded"))
    unknown["type"] = "charge.refunded"
    assert (await send(api, orjson.dumps(unknown))).json() == {"status": "ignored"}
    assert await status_of(pg, payment_id) == "pending"


async def test_a_redelivery_is_answered_from_the_worker_memory(
    api: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """Once an event is recorded, the worker answers its redeliveries without asking Postgres.

    Shown by removing the record behind the worker's back: the redelivery is still a
    duplicate, and nothing is recorded or queued again.
    """
    payment_id, order = await pending_payment(pg, standin, "u-mem-" + uuid.uuid4().hex[:6])
    body = event(payment_id, "succeeded", amount_cents=order.amount_cents)
    assert (await send(api, body)).json() == {"status": "processed"}
    await pg.execute("DELETE FROM payment_psp_events WHERE payment_id = $1", payment_id)
    again = await send(api, body)
    assert again.status_code == 200
    assert again.json() == {"status": "duplicate"}
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM payment_psp_events WHERE payment_id = $1", payment_id
        )
        == 0
    )
    assert await outbox_kinds(pg, payment_id) == ["paid"]


def test_the_recorded_events_memory_is_bounded_and_forgets_the_oldest() -> None:
    remembered = RecentSet(3)
    for member in ("a", "b", "c", "b", "d"):
        remembered.add(member)
    assert len(remembered) == 3
    assert "a" not in remembered
    assert all(m in remembered for m in ("b", "c", "d"))
    off = RecentSet(0)
    off.add("a")
    assert "a" not in off
