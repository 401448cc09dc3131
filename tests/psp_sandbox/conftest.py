from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from aiohttp import web

from tests.psp_sandbox.process import ServiceProcess, start_service
from tests.support.servers import aiohttp_site, free_port


@dataclass
class Receiver:
    """A real HTTP endpoint that records the callbacks it gets."""

    url: str
    received: list[dict[str, Any]] = field(default_factory=list)
    fail_next: int = 0  # answer 500 to this many deliveries first

    def events(self, charge_id: str) -> list[dict[str, Any]]:
        return [r for r in self.received if r["json"]["data"]["charge_id"] == charge_id]


@pytest.fixture(scope="session")
async def receiver() -> AsyncIterator[Receiver]:
    port = free_port()
    state = Receiver(url=f"http://127.0.0.1:{port}/callbacks")

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        import orjson

        state.received.append(
            {"headers": dict(request.headers), "body": body, "json": orjson.loads(body)}
        )
        if state.fail_next > 0:
            state.fail_next -= 1
            return web.Response(status=500, text="try later")
        return web.json_response({"status": "processed"})

    app = web.Application()
    app.router.add_post("/callbacks", handle)
    async with aiohttp_site(app, port):
        yield state


@pytest.fixture(scope="session")
def sandbox(
    redis_url: str, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    proc = start_service(
        "psp_sandbox",
        port=free_port(),
        env={
            "SHOPSTACK_REDIS_URL": redis_url,
            "SHOPSTACK_PSP_CALLBACK_URL": receiver.url,
            "SHOPSTACK_PSP_CALLBACK_BACKOFF_S": "0.1",
            "SHOPSTACK_PSP_HANG_S": "5",
            # Keys of our own: a whole-stack sandbox may share this Redis db.
            "SHOPSTACK_PSP_KEY_PREFIX": f"psptest-{uuid.uuid4().hex[:8]}:",
        },
        run_dir=tmp_path_factory.mktemp("sandbox"),
    )
    yield proc
    proc.stop()


@pytest.fixture
async def psp(sandbox: ServiceProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sandbox.url, timeout=10) as client:
        resp = await client.post("/_sandbox/faults", json={"reset": True})
        assert resp.status_code == 200
        yield client
