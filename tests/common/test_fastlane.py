"""The fast lane: same request ids, limits, errors and metrics as the framework's routes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import orjson
from fastapi import APIRouter, Request, Response

from services.common.app import ServiceState, build_app
from services.common.errors import Conflict
from services.common.fastlane import (
    FastReply,
    FastRequest,
    FastRoute,
    ServiceApp,
    framework_reply,
)
from services.common.metrics import render_metrics
from services.common.settings import CommonSettings
from tests.support.asgi import client_for
from tests.support.problems import assert_problem

SERVED_BY: list[str] = []


async def echo(request: FastRequest) -> FastReply:
    if request.body == b"conflict":
        raise Conflict("already done", headers={"Retry-After": "3"})
    if request.body == b"crash":
        raise RuntimeError("secret internals /etc/passwd")
    doc = {
        "bytes": len(request.body),
        "item": request.params.get("item"),
        "mark": request.headers.get("x-mark"),
        "service": request.state.settings.service_name,
    }
    return FastReply(201, orjson.dumps(doc), {"x-answered": "yes"})


router = APIRouter()


@router.post("/items/{item}/echo", status_code=201)
async def echo_route(item: str, request: Request) -> Response:
    SERVED_BY.append("framework")
    return await framework_reply(echo, request, item=item)


async def counting(request: FastRequest) -> FastReply:
    SERVED_BY.append("lane")
    return await echo(request)


FAST = [FastRoute("POST", "/items/{item}/echo", counting)]


def make_app(**overrides: object) -> ServiceApp:
    settings = CommonSettings(log_level="CRITICAL", **overrides)  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(s: CommonSettings) -> AsyncIterator[ServiceState]:
        yield ServiceState(s)

    return build_app(
        settings=settings,
        title="t",
        description="t",
        lifespan=lifespan,
        routers=[router],
        fast_routes=FAST,
    )


async def test_a_fast_route_skips_the_framework_and_keeps_request_ids() -> None:
    SERVED_BY.clear()
    async with client_for(make_app()) as client:
        resp = await client.post(
            "/items/42/echo", content=b"abc", headers={"x-mark": "m", "x-request-id": "rid-1"}
        )
    assert resp.status_code == 201
    assert resp.json() == {"bytes": 3, "item": "42", "mark": "m", "service": "common"}
    assert resp.headers["x-answered"] == "yes"
    assert resp.headers["x-request-id"] == "rid-1"
    assert SERVED_BY == ["lane"]


async def test_with_the_lane_off_the_framework_serves_the_same_reply() -> None:
    SERVED_BY.clear()
    replies = []
    for lane in (True, False):
        async with client_for(make_app(fast_lane=lane)) as client:
            resp = await client.post("/items/7/echo", content=b"hello")
            replies.append((resp.status_code, resp.json(), resp.headers["x-answered"]))
    assert replies[0] == replies[1]
    assert SERVED_BY == ["lane", "framework"]


async def test_problems_keep_their_status_headers_and_body() -> None:
    async with client_for(make_app()) as client:
        resp = await client.post("/items/1/echo", content=b"conflict")
    assert_problem(resp, 409, "conflict")
    assert resp.headers["retry-after"] == "3"
    assert resp.json()["detail"] == "already done"


async def test_an_unexpected_error_is_a_plain_500_problem() -> None:
    async with client_for(make_app()) as client:
        resp = await client.post("/items/1/echo", content=b"crash")
    assert_problem(resp, 500, "internal-error")
    assert "secret internals" not in resp.text


async def test_body_limit_deadline_and_bad_length_as_everywhere() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b"{"
        await asyncio.sleep(1.0)
        yield b"}"

    async def chunked(size: int) -> AsyncIterator[bytes]:
        for _ in range(size // 512):
            yield b"x" * 512

    async with client_for(make_app(max_body_bytes=2048, body_read_timeout_s=0.2)) as client:
        ok = await client.post("/items/1/echo", content=b"x" * 2048)
        declared = await client.post("/items/1/echo", content=b"x" * 2049)
        streamed = await client.post("/items/1/echo", content=chunked(4096))
        slow = await client.post("/items/1/echo", content=trickle())
        bad = await client.post("/items/1/echo", content=b"abc", headers={"Content-Length": "x3"})
    assert ok.json()["bytes"] == 2048
    assert_problem(declared, 413, "payload-too-large")
    assert_problem(streamed, 413, "payload-too-large")
    assert_problem(slow, 408, "request-timeout")
    assert_problem(bad, 400, "bad-request")
    for refused in (declared, streamed, slow, bad):
        assert refused.headers["connection"] == "close"


async def test_other_methods_and_paths_fall_through_to_the_framework() -> None:
    async with client_for(make_app()) as client:
        wrong_method = await client.get("/items/1/echo")
        wrong_path = await client.post("/items/1/echo/more", content=b"x")
        empty_param = await client.post("/items//echo", content=b"x")
    assert_problem(wrong_method, 405, "method-not-allowed")
    assert_problem(wrong_path, 404, "not-found")
    assert empty_param.status_code == 404


async def test_metrics_name_the_route_template() -> None:
    async with client_for(make_app()) as client:
        await client.post("/items/99/echo", content=b"x")
    text = render_metrics().decode()
    assert 'route="/items/{item}/echo"' in text
    assert 'route="/items/99/echo"' not in text
