"""PAY-8 retries with full jitter under a budget; PAY-4 timeouts stay pending until settled."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import asyncpg
import httpx
import orjson
import pytest

from services.payment.breaker import ProviderBreaker
from services.payment.provider import ProviderRejected, ProviderUnavailable
from services.payment.resilience import RetryBudget, RetryPolicy, call_with_retries
from services.payment.state import is_breaker_failure
from tests.payment.catalog_standin import CatalogStandIn
from tests.payment.conftest import FakeClock, charges_for_order, pay, user, wait_until
from tests.psp_sandbox.process import ServiceProcess

POLICY = RetryPolicy(max_attempts=3, base_s=0.1, cap_s=1.0, deadline_s=10.0)


def log_records(process: ServiceProcess) -> list[dict[str, object]]:
    records = []
    for line in process.log().splitlines():
        if line.startswith("{"):
            records.append(orjson.loads(line))
    return records


async def test_pay8_503_is_retried_3_times_within_the_deadline(
    api: httpx.AsyncClient,
    psp: httpx.AsyncClient,
    standin: CatalogStandIn,
    pg: asyncpg.Connection,
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"])
    await psp.post("/_sandbox/faults", json={"next_faults": ["error", "error", "error", "error"]})
    started = time.monotonic()
    resp = await pay(api, me, order.id)
    elapsed = time.monotonic() - started
    assert resp.status_code == 201
    # A 5xx may hide a charge: unknown, so pending; never a fourth attempt.
    assert resp.json()["status"] == "pending"
    assert elapsed < 5.0  # the service's deadline in this run (default 8 s, gateway 10 s)
    assert await charges_for_order(pg, psp, order.id) == (0, 3)
    # The settle job finds no charge; after the grace period the payment fails and the
    # hold is released.
    payment_id = resp.json()["id"]
    await wait_until(
        lambda: pg.fetchval(
            "SELECT status = 'failed' FROM payments WHERE id = $1", uuid.UUID(payment_id)
        ),
        timeout_s=10.0,
        interval_s=0.1,
    )
    await wait_until(lambda: standin.count("release", order.id) >= 1, timeout_s=3.0)
    assert order.held_by is None


async def test_pay8_one_503_then_success(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"])
    await psp.post("/_sandbox/faults", json={"next_faults": ["error"]})
    resp = await pay(api, me, order.id)
    assert resp.json()["status"] == "succeeded"
    assert await charges_for_order(pg, psp, order.id) == (1, 2)


async def test_pay8_400_is_one_attempt_and_the_failure_is_logged(
    api: httpx.AsyncClient,
    psp: httpx.AsyncClient,
    standin: CatalogStandIn,
    pg: asyncpg.Connection,
    payment_process: ServiceProcess,
) -> None:
    me = user()
    order = standin.add_order(me["X-User-Id"])
    await psp.post("/_sandbox/faults", json={"next_faults": ["reject"]})
    request_id = "req-pay8-" + uuid.uuid4().hex[:8]
    resp = await api.post(
        "/api/v1/payments",
        json={"order_id": str(order.id)},
        headers={**me, "X-Request-Id": request_id},
    )
    assert resp.status_code == 201
    assert resp.json()["status"] == "failed"
    assert resp.headers["x-request-id"] == request_id
    assert await charges_for_order(pg, psp, order.id) == (0, 1)
    await wait_until(lambda: standin.count("release", order.id) >= 1, timeout_s=2.0)

    def logged() -> list[dict[str, object]]:
        return [r for r in log_records(payment_process) if r.get("request_id") == request_id]

    await wait_until(lambda: bool(logged()), timeout_s=2.0)
    record = logged()[0]
    assert record["msg"] == "charge rejected by the provider"
    assert record["order_id"] == str(order.id)
    assert "charge-rejected" in str(record["provider_reply"])
    assert record["level"] == "warning"


def test_full_jitter_backoff_is_bounded_and_spread() -> None:
    rng = random.Random(7)
    for retry, ceiling in ((1, 0.1), (2, 0.2), (3, 0.4), (5, 1.0), (9, 1.0)):
        samples = [POLICY.backoff_s(retry, rng) for _ in range(500)]
        assert all(0 <= s <= ceiling for s in samples)
        assert max(samples) - min(samples) > ceiling * 0.8  # spread over the whole range


async def _run(
    errors: list[Exception], *, idempotent: bool, budget: RetryBudget | None = None
) -> tuple[int, list[float], BaseException | None]:
    calls = 0
    sleeps: list[float] = []

    async def attempt(timeout_s: float) -> str:
        nonlocal calls
        calls += 1
        if errors:
            raise errors.pop(0)
        return "ok"

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    breaker = ProviderBreaker(
        "unit", fail_max=100, reset_timeout_s=1, is_failure=is_breaker_failure, clock=FakeClock()
    )
    outcome: BaseException | None = None
    try:
        await call_with_retries(
            attempt,
            provider="unit",
            operation="charge",
            breaker=breaker,
            policy=POLICY,
            budget=budget or RetryBudget(ratio=0.2, min_per_s=5, window_s=10),
            idempotent=idempotent,
            is_retryable=lambda exc: getattr(exc, "retryable", False),
            history=[],
            rng=random.Random(1),
            sleep=sleep,
            attempt_timeout_s=3.0,
        )
    except Exception as exc:
        outcome = exc
    return calls, sleeps, outcome


async def test_retries_only_when_safe() -> None:
    calls, sleeps, outcome = await _run([ProviderUnavailable("503")] * 5, idempotent=True)
    assert (calls, len(sleeps)) == (3, 2)
    assert isinstance(outcome, ProviderUnavailable)
    assert sleeps[0] <= 0.1
    assert sleeps[1] <= 0.2
    calls, _, outcome = await _run([ProviderUnavailable("503")], idempotent=False)
    assert calls == 1  # no idempotency key: never repeated
    calls, _, outcome = await _run([ProviderRejected("400")], idempotent=True)
    assert calls == 1
    assert isinstance(outcome, ProviderRejected)


async def test_retry_budget_caps_retries_when_everything_fails() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.1, min_per_s=0.2, window_s=10, clock=clock)  # floor: 2
    total_calls = 0
    for _ in range(20):
        calls, _, _ = await _run([ProviderUnavailable("503")] * 3, idempotent=True, budget=budget)
        total_calls += calls
    # 20 calls may add 2 + 10% of 20 = 4 retries, not 40.
    assert total_calls == 20 + 4
    clock.advance(11)
    calls, _, _ = await _run([ProviderUnavailable("503")] * 3, idempotent=True, budget=budget)
    assert calls == 3  # the window moved on


@pytest.mark.slow
async def test_pay4_provider_hangs_payments_stay_pending_until_settled(
    api: httpx.AsyncClient, psp: httpx.AsyncClient, standin: CatalogStandIn, pg: asyncpg.Connection
) -> None:
    """PAY-4, 100 trials: timeout -> pending, never failed; the settle job settles each."""
    trials = 100
    me = user()
    orders = [standin.add_order(me["X-User-Id"]) for _ in range(trials)]
    # The provider charges and then never answers; no callback, so only the settle job can tell.
    await psp.post("/_sandbox/faults", json={"timeout_rate": 1.0, "callback_drop_rate": 1.0})
    started = time.monotonic()
    replies = await asyncio.gather(*(pay(api, me, o.id) for o in orders))
    statuses = [r.json()["status"] for r in replies]
    # Unknown is never reported as failed. A reply may already say "succeeded": the settle
    # job (due 1 s after the charge attempt) can learn the truth while the client's retries
    # still hang, and the reply shows the payment as it is then (it never moves back).
    assert set(statuses) <= {"pending", "succeeded"}
    assert statuses.count("pending") >= trials // 4  # most replies come before settling
    ids = [uuid.UUID(r.json()["id"]) for r in replies]
    seen: set[str] = set()

    async def all_settled() -> bool:
        rows = await pg.fetch("SELECT status FROM payments WHERE id = ANY($1::uuid[])", ids)
        seen.update(r["status"] for r in rows)
        return all(r["status"] == "succeeded" for r in rows)

    took = await wait_until(all_settled, timeout_s=60.0, interval_s=0.1)
    assert "failed" not in seen
    await wait_until(lambda: all(o.status == "paid" for o in orders), timeout_s=5.0)
    for order in orders:
        assert (await charges_for_order(pg, psp, order.id))[0] == 1
    print(
        f"PAY-4: {trials} trials settled {took:.1f} s after the last reply, "
        f"{time.monotonic() - started:.1f} s in all"
    )
