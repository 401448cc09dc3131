from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from aiohttp import web

from services.catalog.seed import seed_products
from services.common.embedded import EmbeddedRedis
from services.gateway.app import create_app
from services.gateway.seed import seed_users
from services.gateway.settings import GatewaySettings
from tests.support.asgi import client_for
from tests.support.servers import aiohttp_site, free_port
from tests.support.stack import RunningStack, private_stack

DEMO_USERS = 3


@pytest.fixture(scope="session")
def seeded(database_url: str, settings_kwargs: dict[str, Any]) -> str:
    """A few demo products and users (hashing 1,000 users is for `make run`)."""

    async def seed() -> None:
        conn = await asyncpg.connect(database_url)
        try:
            await seed_products(conn, 20)
            await seed_users(conn, GatewaySettings(**settings_kwargs), DEMO_USERS)
        finally:
            await conn.close()

    asyncio.run(seed())
    return database_url


@pytest.fixture(scope="session")
def stack(
    servers: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    """A whole stack with a database and a Redis of its own, seeded like `seeded`.

    Its background jobs (the catalog's expiry sweeper and reconciler) run for the rest of
    the session: on the shared test database they expired and repaired rows and gate keys
    that in-process tests run later were counting (INV-5 and INV-7 failed when
    tests/gateway ran before tests/catalog)."""
    redis = EmbeddedRedis(tmp_path_factory.mktemp("stack-redis"), port=free_port())
    log_dir = tmp_path_factory.mktemp("stack")
    try:
        with private_stack(
            servers[0],
            redis_url=redis.start(),
            log_dir=log_dir,
            products=20,
            users=DEMO_USERS,
        ) as (running, _):
            yield running
        assert not (log_dir / "data" / "run" / "stack.json").exists()
    finally:
        redis.stop()


@pytest.fixture(scope="session")
def stack_gateway(stack: RunningStack) -> str:
    return stack.url()


@dataclass
class Echo:
    """A real upstream HTTP server that records what it receives."""

    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    delay_s: float = 0.0
    status: int = 200
    drop: bool = False
    body: bytes | None = None  # a raw reply body instead of {"ok": true}


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    port = free_port()
    state = Echo(url=f"http://127.0.0.1:{port}")

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        state.seen.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "body": body,
            }
        )
        if state.drop:
            assert request.transport is not None
            request.transport.close()
            raise ConnectionResetError("dropped on purpose")
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        if state.body is not None:
            return web.Response(
                body=state.body, status=state.status, content_type="application/problem+json"
            )
        return web.json_response(
            {"ok": True},
            status=state.status,
            headers={
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "1",
                "Keep-Alive": "timeout=5",
                "X-Upstream": "echo",
            },
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with aiohttp_site(app, port):
        yield state


def gateway_settings(settings_kwargs: dict[str, Any], **overrides: Any) -> GatewaySettings:
    return GatewaySettings(**{**settings_kwargs, **overrides})


@pytest.fixture
async def gateway_to_echo(
    seeded: str, settings_kwargs: dict[str, Any], echo: Echo
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway in-process, every upstream pointing at the echo server."""
    settings = gateway_settings(
        settings_kwargs,
        catalog_url=echo.url,
        payment_url=echo.url,
        stats_url=echo.url,
        gateway_read_timeout_s=0.5,
    )
    async with client_for(create_app(settings)) as client:
        yield client
