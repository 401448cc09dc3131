"""The PSP sandbox as a real process: idempotent charges, faults, signed callbacks."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from services.payment.webhooks import verify_signature
from services.psp_sandbox.domain import env_faults
from services.psp_sandbox.settings import SandboxSettings
from tests.psp_sandbox.conftest import Receiver
from tests.psp_sandbox.process import WEBHOOK_SECRET, ServiceProcess, declare_huge_body
from tests.support.problems import assert_problem


def charge_body(reference: str | None = None, amount: int = 1500) -> dict[str, Any]:
    return {"amount_cents": amount, "currency": "EUR", "reference": reference or str(uuid.uuid4())}


async def stats(psp: httpx.AsyncClient, reference: str) -> dict[str, Any]:
    resp = await psp.get("/_sandbox/stats", params={"reference": reference})
    assert resp.status_code == 200
    doc: dict[str, Any] = resp.json()
    return doc


async def wait_for(predicate: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.02)


async def test_one_charge_per_idempotency_key_under_concurrency(psp: httpx.AsyncClient) -> None:
    body = charge_body()
    key = str(uuid.uuid4())
    replies = await asyncio.gather(
        *(psp.post("/v1/charges", json=body, headers={"Idempotency-Key": key}) for _ in range(20))
    )
    assert sorted(r.status_code for r in replies) == [200] * 19 + [201]
    assert len({r.json()["id"] for r in replies}) == 1
    assert replies[0].json()["status"] == "succeeded"
    counts = await stats(psp, body["reference"])
    assert counts["charges_created"] == 1
    assert counts["charge_requests"] == 20


async def test_same_key_with_another_body_is_refused(psp: httpx.AsyncClient) -> None:
    key = str(uuid.uuid4())
    body = charge_body()
    assert (
        await psp.post("/v1/charges", json=body, headers={"Idempotency-Key": key})
    ).status_code == 201
    other = await psp.post(
        "/v1/charges", json={**body, "amount_cents": 1}, headers={"Idempotency-Key": key}
    )
    assert_problem(other, 422, "idempotency-mismatch")
    assert (await stats(psp, body["reference"]))["charges_created"] == 1


async def test_charges_are_found_by_id_and_by_reference(psp: httpx.AsyncClient) -> None:
    body = charge_body()
    created = (
        await psp.post(
            "/v1/charges", json=body, headers={"Idempotency-Key": "k-" + body["reference"]}
        )
    ).json()
    one = await psp.get(f"/v1/charges/{created['id']}")
    assert one.status_code == 200
    assert one.json() == created
    listed = await psp.get("/v1/charges", params={"reference": body["reference"]})
    assert listed.json() == {"items": [created]}
    assert (await psp.get("/v1/charges", params={"reference": "nothing-here"})).json() == {
        "items": []
    }
    assert_problem(await psp.get("/v1/charges/ch_" + "0" * 32), 404, "not-found")
    assert_problem(await psp.get("/v1/charges/nope"), 422, "validation-error")


async def test_queued_faults_apply_in_order_before_rates(psp: httpx.AsyncClient) -> None:
    set_ = await psp.post("/_sandbox/faults", json={"next_faults": ["error", "reject", "decline"]})
    assert set_.json()["next_faults"] == ["error", "reject", "decline"]
    body = charge_body()
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    assert_problem(await psp.post("/v1/charges", json=body, headers=headers), 503, "provider-error")
    assert_problem(
        await psp.post("/v1/charges", json=body, headers=headers), 400, "charge-rejected"
    )
    declined = await psp.post("/v1/charges", json=body, headers=headers)
    assert declined.status_code == 201
    assert declined.json()["status"] == "failed"
    again = await psp.post("/v1/charges", json=body, headers=headers)
    assert again.status_code == 200
    assert again.json() == declined.json()
    counts = await stats(psp, body["reference"])
    assert counts == {**counts, "charge_requests": 4, "charges_created": 1}


async def test_error_rate_at_one_fails_every_request(psp: httpx.AsyncClient) -> None:
    faults = (await psp.post("/_sandbox/faults", json={"error_rate": 1.0})).json()
    assert faults["error_rate"] == 1.0
    body = charge_body()
    for _ in range(3):
        resp = await psp.post(
            "/v1/charges", json=body, headers={"Idempotency-Key": "e" + body["reference"]}
        )
        assert resp.status_code == 503
    assert (await stats(psp, body["reference"]))["charges_created"] == 0
    assert (await psp.get("/_sandbox/faults")).json()["error_rate"] == 1.0
    reset = (await psp.post("/_sandbox/faults", json={"reset": True})).json()
    assert reset["error_rate"] == 0.0


async def test_reset_fault_charges_then_drops_the_reply(psp: httpx.AsyncClient) -> None:
    await psp.post("/_sandbox/faults", json={"next_faults": ["reset"]})
    body = charge_body()
    headers = {"Idempotency-Key": str(uuid.uuid4())}
    with pytest.raises(httpx.RemoteProtocolError):
        await psp.post("/v1/charges", json=body, headers=headers)
    retry = await psp.post("/v1/charges", json=body, headers=headers)
    assert retry.status_code == 200  # the charge the lost reply was about
    assert (await stats(psp, body["reference"]))["charges_created"] == 1


async def test_timeout_fault_charges_then_hangs(psp: httpx.AsyncClient) -> None:
    await psp.post("/_sandbox/faults", json={"next_faults": ["timeout"]})
    body = charge_body()
    started = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        await psp.post(
            "/v1/charges", json=body, headers={"Idempotency-Key": str(uuid.uuid4())}, timeout=0.5
        )
    assert time.monotonic() - started < 2
    listed = (await psp.get("/v1/charges", params={"reference": body["reference"]})).json()
    assert [c["status"] for c in listed["items"]] == ["succeeded"]


async def test_latency_fault_delays_replies(psp: httpx.AsyncClient) -> None:
    await psp.post("/_sandbox/faults", json={"latency_ms": 300})
    body = charge_body()
    for _ in range(2):  # the faults just changed, then the faults already known
        started = time.monotonic()
        resp = await psp.post(
            "/v1/charges", json=body, headers={"Idempotency-Key": str(uuid.uuid4())}
        )
        assert resp.status_code == 201
        assert time.monotonic() - started >= 0.3
        assert resp.json()["created"] >= int(time.time()) - 1  # charged after the wait
    counts = await stats(psp, body["reference"])
    assert (counts["charge_requests"], counts["charges_created"]) == (2, 2)


@pytest.mark.parametrize(
    "faults", [{"reset": 1}, {"error_rate": False}, {"error_rate": "0.5"}, {"latency_ms": 1.5}]
)
async def test_faults_of_the_wrong_type_are_422(psp: httpx.AsyncClient, faults: Any) -> None:
    """IN-1 found `false` taken for a rate of 0 and `1` for `reset: true` (lax types)."""
    assert_problem(await psp.post("/_sandbox/faults", json=faults), 422, "validation-error")


async def test_fault_changes_apply_to_the_next_request(psp: httpx.AsyncClient) -> None:
    body = charge_body()

    async def charge() -> httpx.Response:
        return await psp.post(
            "/v1/charges", json=body, headers={"Idempotency-Key": str(uuid.uuid4())}
        )

    assert (await charge()).json()["status"] == "succeeded"
    assert (await charge()).json()["status"] == "succeeded"
    await psp.post("/_sandbox/faults", json={"decline_rate": 1.0})
    assert (await charge()).json()["status"] == "failed"
    assert (await charge()).json()["status"] == "failed"
    await psp.post("/_sandbox/faults", json={"decline_rate": 0.0, "reject_rate": 1.0})
    assert_problem(await charge(), 400, "charge-rejected")
    assert_problem(await charge(), 400, "charge-rejected")
    await psp.post("/_sandbox/faults", json={"reset": True})
    assert (await charge()).status_code == 201
    counts = await stats(psp, body["reference"])
    assert (counts["charge_requests"], counts["charges_created"]) == (7, 5)


async def test_callbacks_are_signed_and_delivered(
    psp: httpx.AsyncClient, receiver: Receiver
) -> None:
    body = charge_body()
    charge = (
        await psp.post("/v1/charges", json=body, headers={"Idempotency-Key": str(uuid.uuid4())})
    ).json()
    await wait_for(lambda: len(receiver.events(charge["id"])) == 1)
    delivery = receiver.events(charge["id"])[0]
    verify_signature(
        delivery["headers"]["PSP-Signature"],
        delivery["body"],
        secret=WEBHOOK_SECRET,
        tolerance_s=300,
        now=time.time(),
    )
    event = delivery["json"]
    assert event["type"] == "charge.succeeded"
    assert event["id"].startswith("evt_")
    assert event["data"] == {
        "charge_id": charge["id"],
        "payment_id": body["reference"],
        "amount_cents": body["amount_cents"],
        "currency": "EUR",
    }


async def test_duplicates_and_out_of_order_callbacks_on_demand(
    psp: httpx.AsyncClient, receiver: Receiver
) -> None:
    await psp.post("/_sandbox/faults", json={"duplicate_rate": 1.0, "out_of_order_rate": 1.0})
    charge = (
        await psp.post(
            "/v1/charges", json=charge_body(), headers={"Idempotency-Key": str(uuid.uuid4())}
        )
    ).json()
    await wait_for(lambda: len(receiver.events(charge["id"])) == 3)
    await asyncio.sleep(0.3)
    events = [d["json"] for d in receiver.events(charge["id"])]
    assert len(events) == 3
    succeeded = [e for e in events if e["type"] == "charge.succeeded"]
    assert len(succeeded) == 2
    assert succeeded[0]["id"] == succeeded[1]["id"]
    assert events[-1]["type"] == "charge.failed"  # the older event arrives last
    assert events[-1]["created"] < succeeded[0]["created"]


async def test_callbacks_are_retried_until_acknowledged(
    psp: httpx.AsyncClient, receiver: Receiver
) -> None:
    receiver.fail_next = 2
    charge = (
        await psp.post(
            "/v1/charges", json=charge_body(), headers={"Idempotency-Key": str(uuid.uuid4())}
        )
    ).json()
    await wait_for(lambda: len(receiver.events(charge["id"])) == 3)
    deliveries = receiver.events(charge["id"])
    assert len({d["json"]["id"] for d in deliveries}) == 1
    totals = (await psp.get("/_sandbox/stats")).json()
    assert totals["callbacks_sent"] >= 1


async def test_dropped_callbacks_are_never_sent(psp: httpx.AsyncClient, receiver: Receiver) -> None:
    await psp.post("/_sandbox/faults", json={"callback_drop_rate": 1.0})
    charge = (
        await psp.post(
            "/v1/charges", json=charge_body(), headers={"Idempotency-Key": str(uuid.uuid4())}
        )
    ).json()
    await asyncio.sleep(0.5)
    assert receiver.events(charge["id"]) == []


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b'{"amount_cents": 1', 422, "validation-error"),
        (b'{"amount_cents": 10.5, "currency": "EUR", "reference": "r"}', 422, "validation-error"),
        (b'{"amount_cents": "10", "currency": "EUR", "reference": "r"}', 422, "validation-error"),
        (
            b'{"amount_cents": 10, "currency": "EUR", "reference": "r", "x": 1}',
            422,
            "validation-error",
        ),
        (b'{"amount_cents": 0, "currency": "EUR", "reference": "r"}', 422, "validation-error"),
        (b'{"amount_cents": 10, "currency": "eur", "reference": "r"}', 422, "validation-error"),
        (b"[]", 422, "validation-error"),
    ],
)
async def test_bad_charge_requests_are_problems(
    psp: httpx.AsyncClient, content: bytes, status: int, code: str
) -> None:
    resp = await psp.post(
        "/v1/charges", content=content, headers={"Content-Type": "application/json"}
    )
    assert_problem(resp, status, code)


async def test_oversized_body_is_refused_before_it_is_read(sandbox: ServiceProcess) -> None:
    status, body = await declare_huge_body(sandbox.port, "/v1/charges")
    assert status == 413
    assert b"/problems/payload-too-large" in body


async def test_bad_faults_are_refused(psp: httpx.AsyncClient) -> None:
    for body in ({"error_rate": 1.5}, {"latency_ms": -1}, {"next_faults": ["explode"]}, {"x": 1}):
        assert_problem(await psp.post("/_sandbox/faults", json=body), 422, "validation-error")


def test_fault_defaults_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOPSTACK_PSP_LATENCY_MS", "25")
    monkeypatch.setenv("SHOPSTACK_PSP_ERROR_RATE", "0.1")
    monkeypatch.setenv("SHOPSTACK_PSP_TIMEOUT_RATE", "0.2")
    monkeypatch.setenv("SHOPSTACK_PSP_DUPLICATE_RATE", "0.5")
    faults = env_faults(SandboxSettings())
    assert (faults.latency_ms, faults.error_rate, faults.timeout_rate, faults.duplicate_rate) == (
        25,
        0.1,
        0.2,
        0.5,
    )
