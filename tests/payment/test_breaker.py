"""PAY-7: the circuit breaker, on a fake monotonic clock, against the real sandbox."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import httpx
import pytest

from services.payment.app import create_app
from services.payment.breaker import BreakerOpen, ProviderBreaker
from services.payment.provider import ProviderCharge, ProviderUnavailable, SandboxProvider
from services.payment.state import is_breaker_failure
from tests.payment.catalog_standin import CatalogStandIn
from tests.payment.conftest import FakeClock, pay, payment_settings, user
from tests.psp_sandbox.process import ServiceProcess
from tests.support.asgi import client_for
from tests.support.problems import assert_problem


async def charge_requests(psp: httpx.AsyncClient) -> int:
    count: int = (await psp.get("/_sandbox/stats")).json()["charge_requests"]
    return count


async def test_pay7_breaker_opens_fails_fast_and_admits_one_trial(
    psp: httpx.AsyncClient, psp_process: ServiceProcess
) -> None:
    clock = FakeClock()
    provider = SandboxProvider(
        name="pay7", base_url=psp_process.url, pool_size=100, connect_timeout_s=1.0
    )
    breaker = ProviderBreaker(
        "pay7", fail_max=5, reset_timeout_s=30.0, is_failure=is_breaker_failure, clock=clock
    )

    async def charge() -> ProviderCharge:
        return await provider.create_charge(
            idempotency_key=str(uuid.uuid4()),
            amount_cents=100,
            currency="EUR",
            reference=str(uuid.uuid4()),
            timeout_s=5.0,
        )

    try:
        await psp.post("/_sandbox/faults", json={"error_rate": 1.0})
        before = await charge_requests(psp)
        for n in range(5):
            assert breaker.state == "closed", n
            with pytest.raises(ProviderUnavailable):
                await breaker.call(charge)
        assert breaker.state == "open"
        assert await charge_requests(psp) == before + 5

        # Open: refused at once, the provider never touched.
        timings = []
        for _ in range(100):
            started = time.perf_counter()
            with pytest.raises(BreakerOpen) as refused:
                await breaker.call(charge)
            timings.append(time.perf_counter() - started)
        timings.sort()
        # A refusal is microseconds; the odd outlier is the shared machine's scheduler.
        assert timings[49] < 0.001
        assert timings[94] < 0.005, timings[-5:]
        assert 0 < refused.value.retry_after_s <= 30
        clock.advance(29.9)
        with pytest.raises(BreakerOpen):
            await breaker.call(charge)
        assert await charge_requests(psp) == before + 5

        # After the timeout: 50 concurrent callers, exactly one trial reaches the provider.
        await psp.post("/_sandbox/faults", json={"error_rate": 0.0, "latency_ms": 200})
        clock.advance(0.2)
        results = await asyncio.gather(
            *(breaker.call(charge) for _ in range(50)), return_exceptions=True
        )
        trials = [r for r in results if isinstance(r, ProviderCharge)]
        refused_now = [r for r in results if isinstance(r, BreakerOpen)]
        assert (len(trials), len(refused_now)) == (1, 49)
        assert await charge_requests(psp) == before + 6
        assert breaker.state == "closed"  # the trial succeeded

        # A failed trial opens it again for another full period.
        await psp.post("/_sandbox/faults", json={"error_rate": 1.0, "latency_ms": 0})
        for _ in range(5):
            with pytest.raises(ProviderUnavailable):
                await breaker.call(charge)
        assert breaker.state == "open"
        clock.advance(30.0)
        with pytest.raises(ProviderUnavailable):
            await breaker.call(charge)  # the trial, failing
        assert breaker.state == "open"
        with pytest.raises(BreakerOpen):
            await breaker.call(charge)
        assert await charge_requests(psp) == before + 12
        clock.advance(30.0)
        await psp.post("/_sandbox/faults", json={"error_rate": 0.0})
        assert isinstance(await breaker.call(charge), ProviderCharge)
        assert breaker.state == "closed"
    finally:
        await provider.close()


async def test_pay7_late_failures_do_not_extend_the_open_period(
    psp: httpx.AsyncClient, psp_process: ServiceProcess
) -> None:
    clock = FakeClock()
    breaker = ProviderBreaker(
        "pay7-late", fail_max=2, reset_timeout_s=10.0, is_failure=is_breaker_failure, clock=clock
    )
    release = asyncio.Event()

    async def slow_failure() -> None:
        await release.wait()
        raise ProviderUnavailable("late")

    async def fast_failure() -> None:
        raise ProviderUnavailable("now")

    straggler = asyncio.create_task(breaker.call(slow_failure))
    await asyncio.sleep(0)
    for _ in range(2):
        with pytest.raises(ProviderUnavailable):
            await breaker.call(fast_failure)
    assert breaker.state == "open"
    clock.advance(9.0)
    release.set()
    with pytest.raises(ProviderUnavailable):
        await straggler
    clock.advance(1.0)  # 10 s after opening, not after the straggler
    assert breaker.retry_after_s() == 0.0


async def test_a_cancelled_trial_lets_the_next_caller_try(
    psp: httpx.AsyncClient, psp_process: ServiceProcess
) -> None:
    clock = FakeClock()
    breaker = ProviderBreaker(
        "pay7-cancel", fail_max=1, reset_timeout_s=5.0, is_failure=is_breaker_failure, clock=clock
    )

    async def fail() -> None:
        raise ProviderUnavailable("down")

    async def hang() -> None:
        await asyncio.sleep(60)

    async def ok() -> str:
        return "ok"

    with pytest.raises(ProviderUnavailable):
        await breaker.call(fail)
    clock.advance(5.0)
    trial = asyncio.create_task(breaker.call(hang))
    await asyncio.sleep(0)
    with pytest.raises(BreakerOpen):
        await breaker.call(ok)
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert await breaker.call(ok) == "ok"
    assert breaker.state == "closed"


async def test_pay7_through_the_api_503_with_retry_after_and_one_trial(
    psp: httpx.AsyncClient,
    psp_process: ServiceProcess,
    standin: CatalogStandIn,
    settings_kwargs: dict[str, Any],
) -> None:
    clock = FakeClock()
    settings = payment_settings(
        settings_kwargs,
        standin,
        psp_process,
        psp_breaker_fail_max=5,
        psp_breaker_reset_s=30.0,
        psp_max_attempts=1,
        psp_timeout_s=5.0,
        psp_deadline_s=8.0,
    )
    app = create_app(settings, breaker_clock=clock, run_jobs=False)
    me = user()
    async with client_for(app) as api:
        await psp.post("/_sandbox/faults", json={"error_rate": 1.0})
        for _ in range(5):
            resp = await pay(api, me, standin.add_order(me["X-User-Id"]).id)
            assert resp.status_code == 201
            assert resp.json()["status"] == "pending"  # a 5xx may have charged: unknown
        before = await charge_requests(psp)
        timings = []
        for _ in range(100):
            order = standin.add_order(me["X-User-Id"])
            started = time.perf_counter()
            resp = await pay(api, me, order.id)
            timings.append(time.perf_counter() - started)
            assert_problem(resp, 503, "upstream-unavailable")
            assert resp.headers["retry-after"] == "30"
            assert standin.count("get", order.id) == 0
        timings.sort()
        # Whole request in-process (client, middleware, FastAPI): the median is the figure;
        # the tail is the shared machine's scheduler (load average 5-9 while this was written).
        assert timings[49] < 0.005, timings[45:55]
        assert timings[94] < 0.05, timings[-5:]
        assert await charge_requests(psp) == before

        # The trial takes 1.5 s at the provider, so the other 49 (which first load the order
        # and hold it) reach the breaker while it is still in flight, even on a busy machine.
        await psp.post("/_sandbox/faults", json={"error_rate": 0.0, "latency_ms": 1500})
        clock.advance(30.0)
        orders = [standin.add_order(me["X-User-Id"]) for _ in range(50)]
        replies = await asyncio.gather(*(pay(api, me, o.id) for o in orders))
        statuses = sorted(r.status_code for r in replies)
        assert statuses == [201] + [503] * 49
        assert await charge_requests(psp) == before + 1
        await psp.post("/_sandbox/faults", json={"latency_ms": 0})
        assert next(r for r in replies if r.status_code == 201).json()["status"] == "succeeded"
        resp = await pay(api, me, standin.add_order(me["X-User-Id"]).id)
        assert resp.json()["status"] == "succeeded"
        metrics = (await api.get("/metrics")).text
        assert 'shopstack_payment_breaker_state{provider="sandbox"} 0.0' in metrics
        assert (
            'shopstack_payment_breaker_transitions_total{provider="sandbox",state="open"}'
            in metrics
        )
