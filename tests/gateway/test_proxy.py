"""Gateway forwarding: header hygiene, identity, errors, retries (real upstream server)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from aiohttp import web
from yarl import URL

from services.common.errors import UpstreamUnavailable
from services.gateway.app import create_app
from services.gateway.proxy import URL_CACHE_ENTRIES, Upstream
from tests.gateway.conftest import Echo, gateway_settings
from tests.gateway.helpers import login
from tests.support.asgi import client_for
from tests.support.problems import assert_problem
from tests.support.servers import aiohttp_site, free_port


async def test_hop_by_hop_and_identity_headers_are_stripped(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    token = await login(gateway_to_echo, "demo1", "demo-password-1")
    resp = await gateway_to_echo.get(
        "/api/v1/orders/abc?x=1",
        headers={
            "Authorization": f"Bearer {token}",
            "X-User-Id": "999",
            "X-User-Role": "admin",
            "Connection": "X-Client-Hop",
            "X-Client-Hop": "1",
            "Keep-Alive": "timeout=100",
            "Proxy-Authorization": "Basic Zm9vOmJhcg==",
            "Upgrade": "websocket",
            "X-Request-Id": "req-42",
            "X-Custom": "kept",
        },
    )
    assert resp.status_code == 200
    seen = echo.seen[-1]
    headers = seen["headers"]
    assert seen["path"] == "/api/v1/orders/abc?x=1"
    assert headers["x-user-id"] != "999"
    assert headers["x-user-id"].isdigit()
    assert headers["x-user-role"] == "user"
    for gone in ("x-client-hop", "keep-alive", "proxy-authorization", "upgrade", "authorization"):
        assert gone not in headers, gone
    assert headers["x-request-id"] == "req-42"
    assert headers["x-custom"] == "kept"
    assert headers["x-forwarded-for"] == "203.0.113.7"
    # Upstream hop-by-hop headers (and those its Connection header names) never reach the client.
    assert "x-secret-hop" not in resp.headers
    assert "keep-alive" not in resp.headers
    assert resp.headers["x-upstream"] == "echo"
    assert resp.headers["x-request-id"] == "req-42"


async def test_public_routes_never_carry_a_user(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    resp = await gateway_to_echo.get(
        "/api/v1/products/1", headers={"X-User-Id": "1", "X-User-Role": "admin"}
    )
    assert resp.status_code == 200
    headers = echo.seen[-1]["headers"]
    assert "x-user-id" not in headers
    assert "x-user-role" not in headers


async def test_spoofed_forwarded_for_is_ignored_from_untrusted_peers(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    await gateway_to_echo.get("/api/v1/stats/top", headers={"X-Forwarded-For": "1.2.3.4"})
    assert echo.seen[-1]["headers"]["x-forwarded-for"] == "203.0.113.7"


async def test_forwarded_for_is_believed_from_trusted_proxies(
    seeded: str, settings_kwargs: dict[str, Any], echo: Echo
) -> None:
    settings = gateway_settings(
        settings_kwargs, stats_url=echo.url, trusted_proxies=["203.0.113.0/24"]
    )
    async with client_for(create_app(settings)) as client:
        await client.get("/api/v1/stats/top", headers={"X-Forwarded-For": "198.51.100.9, 1.2.3.4"})
    # The rightmost address not vouched for by a trusted proxy is the client.
    assert echo.seen[-1]["headers"]["x-forwarded-for"] == "1.2.3.4"


async def test_upstream_down_is_502_problem(seeded: str, settings_kwargs: dict[str, Any]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = gateway_settings(settings_kwargs, catalog_url=dead)
    async with client_for(create_app(settings)) as client:
        resp = await client.get("/api/v1/products/1")
    doc = assert_problem(resp, 502, "upstream-unavailable")
    assert "catalog" in str(doc["detail"])
    assert resp.headers["retry-after"] == "1"


async def test_slow_upstream_is_504_problem(gateway_to_echo: httpx.AsyncClient, echo: Echo) -> None:
    echo.delay_s = 2.0  # the gateway's read timeout in this fixture is 0.5 s
    resp = await gateway_to_echo.get("/api/v1/products/1")
    assert_problem(resp, 504, "upstream-unavailable")


async def test_upstream_errors_pass_through_unchanged(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    echo.status = 409
    resp = await gateway_to_echo.get("/api/v1/products/1")
    assert resp.status_code == 409
    assert resp.json() == {"ok": True}


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/api/v1/nothing-here"), ("GET", "/api/v1/productsX"), ("GET", "/")],
)
async def test_unknown_routes_are_404_problems(
    gateway_to_echo: httpx.AsyncClient, echo: Echo, method: str, path: str
) -> None:
    assert_problem(await gateway_to_echo.request(method, path), 404, "not-found")
    assert echo.seen == []


async def test_wrong_method_is_405_with_allow(gateway_to_echo: httpx.AsyncClient) -> None:
    resp = await gateway_to_echo.delete("/api/v1/products/1")
    assert_problem(resp, 405, "method-not-allowed")
    assert resp.headers["allow"] == "GET, HEAD"


async def test_write_prefixes_leave_methods_to_the_upstream(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    """Under /api/v1/orders each path takes its own methods: the upstream's 405 names them
    (IN-1 found the gateway answering OPTIONS with every method of the whole prefix)."""
    token = await login(gateway_to_echo, "demo1", "demo-password-1")
    resp = await gateway_to_echo.request(
        "OPTIONS", "/api/v1/orders/x", headers={"Authorization": f"Bearer {token}"}
    )
    assert resp.status_code == 200
    assert [(seen["method"], seen["path"]) for seen in echo.seen] == [
        ("OPTIONS", "/api/v1/orders/x")
    ]


async def test_oversized_body_is_413_and_not_forwarded(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    token = await login(gateway_to_echo, "demo1", "demo-password-1")
    resp = await gateway_to_echo.post(
        "/api/v1/orders",
        content=b"x" * 70_000,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    assert_problem(resp, 413, "payload-too-large")
    assert echo.seen == []


async def test_health_and_metrics(gateway_to_echo: httpx.AsyncClient) -> None:
    assert (await gateway_to_echo.get("/healthz")).json() == {"status": "ok"}
    ready = await gateway_to_echo.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert set(ready.json()["checks"]) == {"postgres", "redis", "catalog", "payment", "stats"}
    await gateway_to_echo.get("/api/v1/products/7")
    metrics = (await gateway_to_echo.get("/metrics")).text
    assert 'route="/api/v1/products/{id}"' in metrics


async def test_readyz_names_what_is_down(
    seeded: str, settings_kwargs: dict[str, Any], echo: Echo
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = gateway_settings(
        settings_kwargs, catalog_url=dead, payment_url=echo.url, stats_url=echo.url
    )
    async with client_for(create_app(settings)) as client:
        resp = await client.get("/readyz")
    doc = assert_problem(resp, 503, "not-ready")
    assert doc["checks"] == {
        "postgres": "ok",
        "redis": "ok",
        "catalog": "down",
        "payment": "ok",
        "stats": "ok",
    }
    assert "catalog" in str(doc["detail"])


@pytest.mark.parametrize(
    ("method", "path", "key", "attempts"),
    [
        ("POST", "/api/v1/orders", None, 1),  # IN-8: never auto-retry a POST without a key
        ("POST", "/api/v1/orders", "key-1", 2),
        ("GET", "/api/v1/orders/1", None, 2),  # idempotent: resent once (RFC 9112 9.3.1)
    ],
)
async def test_retry_only_when_safe(
    gateway_to_echo: httpx.AsyncClient,
    echo: Echo,
    method: str,
    path: str,
    key: str | None,
    attempts: int,
) -> None:
    token = await login(gateway_to_echo, "demo1", "demo-password-1")
    echo.drop = True  # the upstream closes the connection without answering
    headers = {"Authorization": f"Bearer {token}"}
    if key:
        headers["Idempotency-Key"] = key
    resp = await gateway_to_echo.request(method, path, headers=headers, json={"a": 1})
    assert_problem(resp, 502, "upstream-unavailable")
    assert len(echo.seen) == attempts


async def test_a_resend_never_takes_another_pooled_connection() -> None:
    """SHD-6 in small: a restarting upstream closes all its idle keep-alive connections
    at once, so after one pooled socket failed the next pooled one is dead too. Here the
    upstream drops every request that arrives on a connection it already answered on:
    the one resend goes out on a new connection, and only when it is safe."""
    port = free_port()
    answered: list[asyncio.BaseTransport] = []  # connections that served a request
    seen: list[tuple[str, bool]] = []  # (method, arrived on a reused connection)
    closing = False

    async def handle(request: web.Request) -> web.Response:
        transport = request.transport
        assert transport is not None
        reused = any(t is transport for t in answered)
        seen.append((request.method, reused))
        if closing and reused:
            transport.close()
            raise ConnectionResetError("closed on purpose")
        answered.append(transport)
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    upstream = Upstream(
        "catalog", f"http://127.0.0.1:{port}", pool_size=10, idle_s=30.0, connect_timeout_s=1.0
    )
    try:
        async with aiohttp_site(app, port):

            async def send(method: str, *, may_retry: bool = False) -> int:
                reply = await upstream.forward(
                    method, "/x", [], b"{}", timeout_s=5.0, may_retry=may_retry
                )
                return reply.status

            assert await asyncio.gather(*(send("GET") for _ in range(3))) == [200] * 3
            closing = True  # the three pooled connections are dead from now on
            seen.clear()
            assert await send("GET") == 200
            assert seen == [("GET", True), ("GET", False)]
            seen.clear()
            assert await send("POST", may_retry=True) == 200  # carries an Idempotency-Key
            assert seen == [("POST", True), ("POST", False)]
            seen.clear()
            with pytest.raises(UpstreamUnavailable):
                await send("POST")  # no key: never resent
            assert seen == [("POST", True)]
    finally:
        await upstream.close()


async def test_odd_paths_reach_the_upstream_as_before(
    gateway_to_echo: httpx.AsyncClient, echo: Echo
) -> None:
    for _ in range(2):  # the second time from the parsed-URL cache
        resp = await gateway_to_echo.get("/api/v1/stats/a%20b/%C3%A9?q=x%2Fy&r=1 2")
        assert resp.status_code == 200
        # What the upstream saw before URLs were cached (its server decodes the query).
        assert echo.seen[-1]["path"] == "/api/v1/stats/a%20b/%C3%A9?q=x/y&r=1%202"


async def test_upstream_urls_and_timeouts_are_parsed_once() -> None:
    upstream = Upstream(
        "stats", "http://127.0.0.1:1/", pool_size=1, idle_s=1.0, connect_timeout_s=0.5
    )
    try:
        first = upstream.url("/api/v1/stats/top?x=1")
        assert first == URL("http://127.0.0.1:1/api/v1/stats/top?x=1")
        assert upstream.url("/api/v1/stats/top?x=1") is first
        long_path = "/api/v1/stats/" + "a" * 400
        assert upstream.url(long_path) == URL("http://127.0.0.1:1" + long_path)
        assert long_path not in upstream._urls  # long paths are parsed, not kept
        for i in range(URL_CACHE_ENTRIES + 10):
            upstream.url(f"/api/v1/stats/{i}")
        assert len(upstream._urls) <= URL_CACHE_ENTRIES
        timeout = upstream.timeout(3.0)
        assert upstream.timeout(3.0) is timeout
        assert (timeout.total, timeout.connect, timeout.sock_connect) == (3.0, 0.5, 0.5)
    finally:
        await upstream.close()
