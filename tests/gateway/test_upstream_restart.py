"""SHD-6: the upstream is told SIGTERM while the gateway holds pooled keep-alive
connections to it, and a replacement takes over on the same port.

Real processes throughout: the catalog under granian (`shopstack serve catalog`), the
gateway under granian in front of it, holding at least 50 pooled connections to the
catalog when it is told SIGTERM. Then:

1. Rolling restarts, three in a row: a replacement catalog starts beside the old one
   on the same port (granian binds with SO_REUSEPORT), product-list GETs and orders
   flow through the gateway, and the old catalog is told SIGTERM. It exits within its
   drain bound (idle connections do not hold it up; it closes them at once). No GET
   and no order with an Idempotency-Key fails: one written to a pooled socket the old
   catalog was closing is resent once, on a new connection. An order without a key
   is never resent (one order in Postgres per 201, none per 502): if it met such a
   socket, the gateway cannot know the catalog did not process it, so its 502 with
   Retry-After is the one failure allowed (4 runs in 20 before the fix below, none in
   28 runs since).
2. The same SIGTERM with nobody beside and the pool idle: the catalog exits within its
   bound, and while nothing listens the gateway answers 502 at once (never a hang).
   A replacement starts on the port, and the first requests after it (50 GETs and 20
   orders at once) all succeed.

Before the fix in services/gateway/proxy.py, 5 runs in 20 saw a GET fail with 502 in
step 1: aiohttp resent it once by itself, but on the next pooled socket, which the old
catalog had closed as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import httpx
import psutil
import pytest

from services.gateway.settings import GatewaySettings
from services.gateway.tokens import TokenService
from tests.catalog.conftest import ADMIN, new_product_id, product_body
from tests.support.problems import assert_problem
from tests.support.process import ServiceProcess, start_service
from tests.support.servers import free_port

pytestmark = pytest.mark.slow

POOLED = 50  # idle keep-alive connections the gateway holds to the catalog
KILL_S = 5  # the catalog's SHOPSTACK_SHUTDOWN_TIMEOUT_S: granian kills a worker after it
GET_LOOPS = 40  # clients reading the product list through the gateway, back to back
POST_LOOPS = 2  # clients ordering without an Idempotency-Key, one product each
KEYED_LOOPS = 2  # clients ordering with a fresh Idempotency-Key each time, one product each
ROUNDS = 3  # rolling restarts under traffic
AFTER_EXIT_S = 1.0  # traffic goes on this long after the last old catalog exited
PRODUCTS = "/api/v1/products?limit=5"
ORDERS = "/api/v1/orders"
UNAVAILABLE = b"/problems/upstream-unavailable"


@dataclass
class Traffic:
    """What the clients got, per kind of request ("GET", "POST", "POST+key")."""

    outcomes: defaultdict[str, Counter[int | str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    unexpected: list[tuple[str, int, bytes]] = field(default_factory=list)

    def record(self, kind: str, status: int, body: bytes) -> None:
        self.outcomes[kind][status] += 1
        if status not in (200, 201):
            self.unexpected.append((kind, status, body[:300]))

    def summary(self) -> dict[str, dict[int | str, int]]:
        return {kind: dict(counts) for kind, counts in sorted(self.outcomes.items())}


class Clients:
    """The gateway's clients: product-list reads and orders with or without a key."""

    def __init__(self, session: aiohttp.ClientSession, token: str) -> None:
        self.session = session
        self.auth = {"Authorization": f"Bearer {token}"}

    async def get(self, traffic: Traffic) -> None:
        await self._send(traffic, "GET", "GET", PRODUCTS)

    async def order(self, traffic: Traffic, product_id: int, *, keyed: bool) -> None:
        headers = dict(self.auth)
        if keyed:
            headers["Idempotency-Key"] = uuid.uuid4().hex
        body = {"product_id": product_id, "quantity": 1}
        kind = "POST+key" if keyed else "POST"
        await self._send(traffic, kind, "POST", ORDERS, json=body, headers=headers)

    async def _send(self, traffic: Traffic, kind: str, method: str, path: str, **kw: Any) -> None:
        try:
            async with self.session.request(method, path, **kw) as resp:
                body = await resp.read()
        except aiohttp.ClientError as exc:  # the gateway itself failed us
            traffic.outcomes[kind][type(exc).__name__] += 1
            traffic.unexpected.append((kind, 0, repr(exc).encode()))
            return
        traffic.record(kind, resp.status, body)


def _established(server: ServiceProcess) -> int:
    """Connections the server's process tree holds open on its port (all the gateway's)."""
    try:
        parent = psutil.Process(server.process.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    count = 0
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in proc.net_connections("tcp"):
                if conn.laddr.port == server.port and conn.status == psutil.CONN_ESTABLISHED:
                    count += 1
    return count


async def _warm(clients: Clients, server: ServiceProcess) -> int:
    """Bursts of POOLED concurrent GETs until the server holds POOLED pooled connections."""
    traffic = Traffic()
    for _ in range(20):
        await asyncio.gather(*(clients.get(traffic) for _ in range(POOLED)))
        if _established(server) >= POOLED:
            break
    assert traffic.unexpected == []
    return _established(server)


def _token(settings_kwargs: dict[str, Any]) -> str:
    settings = GatewaySettings(**settings_kwargs)
    tokens = TokenService(
        secret=settings.secret("jwt_secret"),
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        ttl_s=settings.jwt_ttl_s,
    )
    return tokens.issue(user_id=606_606, username="shd6", role="user")


async def _orders(dsn: str, product_ids: list[int]) -> Counter[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT product_id, count(*) AS n FROM orders"
            " WHERE product_id = ANY($1::bigint[]) GROUP BY product_id",
            product_ids,
        )
    finally:
        await conn.close()
    return Counter({row["product_id"]: row["n"] for row in rows})


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    """Every server the test starts; all are gone afterwards, whatever happened."""
    started: list[ServiceProcess] = []
    yield started
    for server in reversed(started):
        server.stop()
        server.ensure_stopped()


async def test_shd6_upstream_sigterm_under_idle_pooled_connections(
    seeded: str,
    service_env: dict[str, str],
    settings_kwargs: dict[str, Any],
    processes: list[ServiceProcess],
    tmp_path: Path,
) -> None:
    port = free_port()
    catalog_env = {**service_env, "SHOPSTACK_SHUTDOWN_TIMEOUT_S": str(KILL_S)}

    def catalog(name: str, *, beside: bool = False) -> ServiceProcess:
        server = start_service(
            "catalog",
            env=catalog_env,
            log_path=tmp_path / f"{name}.log",
            port=port,
            timeout_s=60,
            beside=beside,
        )
        processes.append(server)
        return server

    first = catalog("catalog-1")
    upstream = first.url
    gateway = start_service(
        "gateway",
        env={
            **service_env,
            # /readyz probes every upstream: the catalog answers their /healthz too.
            "SHOPSTACK_CATALOG_URL": upstream,
            "SHOPSTACK_PAYMENT_URL": upstream,
            "SHOPSTACK_STATS_URL": upstream,
            "SHOPSTACK_GATEWAY_UPSTREAM_POOL_SIZE": "200",
            # Below granian's 10 s header-read timeout, above a slow replacement start.
            "SHOPSTACK_GATEWAY_UPSTREAM_IDLE_S": "8",
            "SHOPSTACK_WRITE_USER_RATE_PER_S": "100000",
            "SHOPSTACK_WRITE_USER_BURST": "100000",
        },
        log_path=tmp_path / "gateway.log",
        timeout_s=60,
    )
    processes.append(gateway)
    plain = [new_product_id() for _ in range(POST_LOOPS)]
    keyed = [new_product_id() for _ in range(KEYED_LOOPS)]
    for pid in plain + keyed:
        put = httpx.put(
            f"{upstream}/api/v1/admin/products/{pid}",
            json=product_body(sku=f"SKU-S{pid}", stock=1_000_000),
            headers=ADMIN,
            timeout=10,
        )
        assert put.status_code == 201, put.text
    rolling, after = Traffic(), Traffic()
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(gateway.url, timeout=timeout, connector=connector) as session:
        clients = Clients(session, _token(settings_kwargs))

        # --- 1. rolling restarts: the replacement listens before the old one stops ---
        stop = asyncio.Event()

        async def reading() -> None:
            while not stop.is_set():
                await clients.get(rolling)

        async def ordering(product_id: int, *, with_key: bool) -> None:
            while not stop.is_set():
                await clients.order(rolling, product_id, keyed=with_key)

        loops: list[asyncio.Task[None]] = []
        drains: list[float] = []
        current = first
        try:
            for n in range(2, ROUNDS + 2):
                assert await _warm(clients, current) >= POOLED
                replacement = catalog(f"catalog-{n}", beside=True)
                assert _established(current) >= POOLED, "the pool expired during the start"
                if not loops:
                    loops = [asyncio.create_task(reading()) for _ in range(GET_LOOPS)]
                    loops += [asyncio.create_task(ordering(p, with_key=False)) for p in plain]
                    loops += [asyncio.create_task(ordering(p, with_key=True)) for p in keyed]
                await asyncio.sleep(0.5)
                drains.append(await asyncio.to_thread(current.terminate, KILL_S + 10))
                assert current.process.returncode == 0
                current = replacement
            await asyncio.sleep(AFTER_EXIT_S)
        finally:
            stop.set()
            await asyncio.gather(*loops)

        # --- 2. SIGTERM with nothing beside, then a replacement on the port -----------
        assert await _warm(clients, current) >= POOLED
        idle_drain = await asyncio.to_thread(current.terminate, KILL_S + 10)
        assert current.process.returncode == 0
        started = time.monotonic()
        async with session.get(PRODUCTS) as resp:  # nothing listens: fail fast, retryable
            body = await resp.read()
        gap_s = time.monotonic() - started
        gap = httpx.Response(resp.status, headers=list(resp.headers.items()), content=body)
        catalog(f"catalog-{ROUNDS + 2}")
        await asyncio.gather(
            *(clients.get(after) for _ in range(POOLED)),
            *(clients.order(after, p, keyed=False) for p in plain for _ in range(5)),
            *(clients.order(after, p, keyed=True) for p in keyed for _ in range(5)),
        )

    orders = await _orders(seeded, plain + keyed)
    print(
        f"SHD-6: catalog exits after SIGTERM {[round(d, 2) for d in drains]} s (rolling, "
        f">= {POOLED} pooled), {idle_drain:.2f} s (idle pool); "
        f"rolling {rolling.summary()}; after {after.summary()}"
    )
    assert max(drains) < KILL_S, f"exits after SIGTERM took {drains} s (kill bound {KILL_S})"
    assert idle_drain < KILL_S, f"exit after SIGTERM took {idle_drain:.2f} s (bound {KILL_S})"
    # During the rolling restarts: every GET and every keyed order answered. An order
    # without a key that met a socket the old catalog was closing cannot be resent (the
    # gateway cannot know it was not processed): it may get a 502, nothing else.
    assert set(rolling.outcomes["GET"]) == {200}, rolling.unexpected[:5]
    assert set(rolling.outcomes["POST+key"]) == {201}, rolling.unexpected[:5]
    assert set(rolling.outcomes["POST"]) <= {201, 502}, rolling.unexpected[:5]
    assert all(body.startswith(b'{"type":"' + UNAVAILABLE) for _, _, body in rolling.unexpected)
    # Nothing was resent: one order per 201 without a key (a 502 made none), one per key.
    assert sum(orders[p] for p in plain) == rolling.outcomes["POST"][201] + 5 * POST_LOOPS
    assert sum(orders[p] for p in keyed) == rolling.outcomes["POST+key"].total() + 5 * KEYED_LOOPS
    # While nothing listened: a 502 at once, never a hang. After the replacement: all good.
    assert gap_s < 1.0
    assert_problem(gap, 502, "upstream-unavailable")
    assert gap.headers["retry-after"] == "1"
    assert after.summary() == {
        "GET": {200: POOLED},
        "POST": {201: 5 * POST_LOOPS},
        "POST+key": {201: 5 * KEYED_LOOPS},
    }, after.unexpected[:5]
