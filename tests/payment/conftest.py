"""Payment under test: the real service (granian process), the sandbox process, the stand-in."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import httpx
import pytest

from services.payment.settings import PaymentSettings
from tests.payment.catalog_standin import CatalogStandIn
from tests.psp_sandbox.process import WEBHOOK_SECRET, ServiceProcess, start_service
from tests.support.servers import free_port, migrated_database

# Timers shortened so the unknown-outcome paths settle within a test's patience.
PAYMENT_ENV = {
    "SHOPSTACK_PSP_TIMEOUT_S": "1.0",
    "SHOPSTACK_PSP_DEADLINE_S": "5.0",
    "SHOPSTACK_PSP_RETRY_BASE_S": "0.05",
    "SHOPSTACK_PSP_RETRY_CAP_S": "0.4",
    "SHOPSTACK_PSP_BREAKER_FAIL_MAX": "1000",  # the breaker has tests of its own
    "SHOPSTACK_PAYMENT_SETTLE_AFTER_S": "1.0",
    "SHOPSTACK_PAYMENT_SETTLE_INTERVAL_S": "0.2",
    "SHOPSTACK_PAYMENT_SETTLE_GRACE_S": "3.0",
    "SHOPSTACK_PAYMENT_OUTBOX_POLL_S": "0.2",
    "SHOPSTACK_PAYMENT_OUTBOX_MAX_BACKOFF_S": "1.0",
    "SHOPSTACK_CATALOG_TIMEOUT_S": "1.0",
}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="session")
def database_url(servers: tuple[str, str]) -> Iterator[str]:
    """A database of payment's own: other suites run whole stacks (with their own payment
    relay and settle jobs) against the shared test database, which would race ours."""
    with migrated_database(servers[0]) as dsn:
        yield dsn


@pytest.fixture(scope="session")
def psp_key_prefix() -> str:
    """Sandbox Redis keys of our own (a whole-stack sandbox may share the Redis db)."""
    return f"psp-{uuid.uuid4().hex[:8]}:"


@pytest.fixture(scope="session")
def payment_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
async def standin() -> AsyncIterator[CatalogStandIn]:
    server = CatalogStandIn(free_port())
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(scope="session")
def psp_process(
    redis_url: str,
    payment_port: int,
    psp_key_prefix: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    proc = start_service(
        "psp_sandbox",
        port=free_port(),
        env={
            "SHOPSTACK_REDIS_URL": redis_url,
            "SHOPSTACK_PSP_CALLBACK_URL": (
                f"http://127.0.0.1:{payment_port}/api/v1/payments/callbacks/psp"
            ),
            "SHOPSTACK_PSP_CALLBACK_BACKOFF_S": "0.2",
            "SHOPSTACK_PSP_CALLBACK_MAX_ATTEMPTS": "30",
            "SHOPSTACK_PSP_HANG_S": "10",
            "SHOPSTACK_PSP_KEY_PREFIX": psp_key_prefix,
        },
        run_dir=tmp_path_factory.mktemp("psp"),
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def payment_process(
    database_url: str,
    redis_url: str,
    standin: CatalogStandIn,
    psp_process: ServiceProcess,
    payment_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    proc = start_service(
        "payment",
        port=payment_port,
        env={
            "SHOPSTACK_DATABASE_URL": database_url,
            "SHOPSTACK_REDIS_URL": redis_url,
            "SHOPSTACK_CATALOG_URL": standin.url,
            "SHOPSTACK_PSP_URL": psp_process.url,
            "SHOPSTACK_JSON_LOGS": "true",
            **PAYMENT_ENV,
        },
        run_dir=tmp_path_factory.mktemp("payment"),
    )
    yield proc
    proc.stop()


@pytest.fixture
async def psp(psp_process: ServiceProcess) -> AsyncIterator[httpx.AsyncClient]:
    """The sandbox's API, with its faults back to none for each test."""
    async with httpx.AsyncClient(base_url=psp_process.url, timeout=10) as client:
        assert (await client.post("/_sandbox/faults", json={"reset": True})).status_code == 200
        yield client
        await client.post("/_sandbox/faults", json={"reset": True})


@pytest.fixture
async def api(
    payment_process: ServiceProcess, standin: CatalogStandIn
) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=payment_process.url, timeout=15, limits=limits) as client:
        yield client
    if not standin.is_up:
        await standin.start()


def payment_settings(
    settings_kwargs: dict[str, Any], standin: CatalogStandIn, psp: ServiceProcess, **overrides: Any
) -> PaymentSettings:
    """Settings for an in-process payment app against the same stand-in and sandbox."""
    values: dict[str, Any] = {
        **settings_kwargs,
        "catalog_url": standin.url,
        "psp_url": psp.url,
        "psp_webhook_secret": WEBHOOK_SECRET,
        "psp_timeout_s": 1.0,
        "psp_deadline_s": 5.0,
        "psp_retry_base_s": 0.01,
        "psp_retry_cap_s": 0.05,
    }
    values.update(overrides)
    return PaymentSettings(**values)


def user() -> dict[str, str]:
    """Headers of a fresh user, as the gateway would set them."""
    return {"X-User-Id": "u" + uuid.uuid4().hex[:12]}


async def pay(
    api: httpx.AsyncClient, headers: dict[str, str], order_id: uuid.UUID, key: str | None = None
) -> httpx.Response:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return await api.post(
        "/api/v1/payments", json={"order_id": str(order_id)}, headers={**headers, **extra}
    )


async def charges_for_order(
    pg: asyncpg.Connection, psp: httpx.AsyncClient, order_id: uuid.UUID
) -> tuple[int, int]:
    """(charges created, charge requests) at the provider over every payment of the order."""
    ids = await pg.fetch("SELECT id FROM payments WHERE order_id = $1", order_id)
    created = requests = 0
    for row in ids:
        doc = (await psp.get("/_sandbox/stats", params={"reference": str(row["id"])})).json()
        created += doc["charges_created"]
        requests += doc["charge_requests"]
    return created, requests


async def wait_until(predicate: Any, *, timeout_s: float, interval_s: float = 0.02) -> float:
    """Poll a (sync or async) predicate; return the seconds it took, fail on timeout."""
    started = time.monotonic()
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout_s, f"not true within {timeout_s} s"
        await asyncio.sleep(interval_s)
