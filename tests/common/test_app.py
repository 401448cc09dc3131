"""build_app(): problem+json for every failure, body limits and deadlines, request ids."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from fastapi import APIRouter, Request

from services.common.app import ServiceState, build_app
from services.common.settings import CommonSettings
from tests.support.asgi import client_for
from tests.support.problems import assert_problem

router = APIRouter()


@router.get("/boom")
async def boom() -> dict[str, str]:
    raise RuntimeError("secret internals /etc/passwd")


# What asyncpg raises while Postgres restarts or is unreachable (FLT-2 sees them for real),
# and the errors that are our own mistakes.
OUTAGES: dict[str, Exception] = {
    "gone": asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    "admin-shutdown": asyncpg.AdminShutdownError("terminating connection due to administrator"),
    "starting": asyncpg.CannotConnectNowError("the database system is starting up"),
    "closed": asyncpg.InterfaceError("cannot call Connection.fetch(): connection is closed"),
    "out-of-step": asyncpg.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    ),
    "refused": ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"),
    "timeout": TimeoutError(),
}
BUGS: dict[str, Exception] = {
    "bad-argument": asyncpg.DataError("invalid input for query argument $1: 'x'"),
    "syntax": asyncpg.PostgresSyntaxError('syntax error at or near "SELEC"'),
}


@router.get("/fail/{name}")
async def fail(name: str) -> dict[str, str]:
    raise {**OUTAGES, **BUGS}[name]


@router.post("/echo")
async def echo(request: Request) -> dict[str, int]:
    return {"bytes": len(await request.body())}


@router.get("/both")
async def read_both() -> dict[str, str]:
    return {"read": "ok"}


@router.post("/both")
async def write_both() -> dict[str, str]:
    return {"write": "ok"}


def make_app(**overrides: object) -> object:
    settings = CommonSettings(log_level="CRITICAL", **overrides)  # type: ignore[arg-type]

    @asynccontextmanager
    async def lifespan(s: CommonSettings) -> AsyncIterator[ServiceState]:
        yield ServiceState(s)

    return build_app(
        settings=settings, title="t", description="t", lifespan=lifespan, routers=[router]
    )


async def test_unhandled_errors_are_plain_500_problems() -> None:
    async with client_for(make_app()) as client:
        resp = await client.get("/boom")
    assert resp.status_code == 500
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["type"] == "/problems/internal-error"
    assert "secret internals" not in resp.text
    assert "Traceback" not in resp.text
    assert resp.headers["x-request-id"]


@pytest.mark.parametrize(
    ("name", "outage"), [(name, True) for name in OUTAGES] + [(name, False) for name in BUGS]
)
async def test_outages_are_retryable_503s_and_bugs_stay_500(name: str, outage: bool) -> None:
    async with client_for(make_app()) as client:
        resp = await client.get(f"/fail/{name}")
    assert resp.headers["x-request-id"]
    if outage:
        doc = assert_problem(resp, 503, "upstream-unavailable")
        assert doc["title"] == "Upstream Unavailable"
        assert resp.headers["retry-after"] == "1"
    else:
        doc = assert_problem(resp, 500, "internal-error")
        assert doc["detail"] == "an unexpected error occurred"
        assert "retry-after" not in resp.headers


async def test_slow_body_times_out_with_408() -> None:
    async def trickle() -> AsyncIterator[bytes]:
        yield b"{"
        await asyncio.sleep(1.0)
        yield b"}"

    async with client_for(make_app(body_read_timeout_s=0.2)) as client:
        resp = await client.post("/echo", content=trickle())
    assert resp.status_code == 408
    assert resp.json()["type"] == "/problems/request-timeout"


async def test_bodies_within_the_limit_pass() -> None:
    async with client_for(make_app(max_body_bytes=2048)) as client:
        ok = await client.post("/echo", content=b"x" * 2048)
        too_big = await client.post("/echo", content=b"x" * 2049)
    assert ok.json() == {"bytes": 2048}
    assert too_big.status_code == 413


async def test_bad_content_length_is_400() -> None:
    async with client_for(make_app()) as client:
        resp = await client.post("/echo", content=b"abc", headers={"Content-Length": "x3"})
    assert resp.status_code == 400
    assert resp.headers["content-type"] == "application/problem+json"


async def test_readyz_without_dependencies_is_ok() -> None:
    async with client_for(make_app()) as client:
        resp = await client.get("/readyz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "checks": {}}


async def test_405_allow_names_every_route_of_the_path() -> None:
    """IN-1: Starlette's 405 named only the first route's methods of a path two routes share."""
    async with client_for(make_app()) as client:
        resp = await client.request("OPTIONS", "/both")
        assert resp.status_code == 405
        assert resp.headers["allow"] == "GET, POST"
        assert resp.headers["content-type"] == "application/problem+json"
        assert (await client.request("DELETE", "/boom")).headers["allow"] == "GET"
