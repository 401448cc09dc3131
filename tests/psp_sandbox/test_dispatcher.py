"""The callback dispatcher in process, on real Redis and a real HTTP receiver:
acknowledgements go in batches and a delivery never acknowledged is sent again."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp import web

from services.psp_sandbox.jobs import CallbackDispatcher
from services.psp_sandbox.settings import SandboxSettings
from services.psp_sandbox.store import Callback, ChargeWrite, SandboxStore
from tests.psp_sandbox.process import WEBHOOK_SECRET
from tests.support.servers import free_port


class RecordingStore(SandboxStore):
    """The real store, recording each acknowledgement batch; the first `fail` batches
    are lost (as if the worker stopped between sending and acknowledging)."""

    def __init__(self, redis: aioredis.Redis, *, fail: int = 0) -> None:
        super().__init__(redis, prefix=f"psptest-{uuid.uuid4().hex[:8]}:", retention_s=600)
        self.batches: list[list[str]] = []
        self.fail = fail

    async def callbacks_delivered(self, delivery_ids: list[str]) -> None:
        self.batches.append(list(delivery_ids))
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("acknowledgement lost")
        await super().callbacks_delivered(delivery_ids)


class Receiver:
    """Answers 200 to every callback; holds the replies until `hold_until` have arrived."""

    def __init__(self, hold_until: int = 0) -> None:
        self.bodies: list[bytes] = []
        self.hold_until = hold_until
        self.released = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        if len(self.bodies) >= self.hold_until:
            self.released.set()
        await self.released.wait()
        return web.json_response({"status": "processed"})


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    runners: list[web.AppRunner] = []

    async def start(receiver: Receiver) -> str:
        port = free_port()
        app = web.Application()
        app.router.add_post("/callbacks", receiver.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        runners.append(runner)
        return f"http://127.0.0.1:{port}/callbacks"

    yield start
    for runner in runners:
        await runner.cleanup()


def dispatcher_for(
    store: SandboxStore, url: str, settings_kwargs: dict[str, Any], **extra: Any
) -> CallbackDispatcher:
    settings = SandboxSettings(**settings_kwargs, psp_callback_url=url, **extra)
    return CallbackDispatcher(settings, store, WEBHOOK_SECRET)


async def queue(store: SandboxStore, count: int) -> list[bytes]:
    bodies = [b'{"event": %d}' % i for i in range(count)]
    write = ChargeWrite(
        idempotency_key=str(uuid.uuid4()),
        fingerprint="fp",
        charge_id="ch_" + uuid.uuid4().hex,
        charge=b"{}",
        reference="ref",
        callbacks=tuple(Callback(uuid.uuid4().hex, body, 0) for body in bodies),
    )
    assert (await store.create_charge(write)).outcome == "created"
    return bodies


async def wait_until_acknowledged(store: SandboxStore, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while await store.pending_callbacks():
        assert time.monotonic() < deadline, "deliveries left unacknowledged"
        await asyncio.sleep(0.02)


async def test_acknowledgements_are_written_in_batches(
    rds: aioredis.Redis, serve: Any, settings_kwargs: dict[str, Any]
) -> None:
    store = RecordingStore(rds)
    receiver = Receiver(hold_until=12)  # twelve replies at once
    dispatcher = dispatcher_for(store, await serve(receiver), settings_kwargs)
    bodies = await queue(store, 12)
    dispatcher.start()
    try:
        await wait_until_acknowledged(store, timeout_s=5)
    finally:
        await dispatcher.stop()
        await store.reset()
    assert sorted(receiver.bodies) == sorted(bodies)
    acknowledged = [i for batch in store.batches for i in batch]
    assert len(acknowledged) == len(set(acknowledged)) == 12
    assert len(store.batches) < 12


async def test_an_acknowledgement_lost_means_the_delivery_is_sent_again(
    rds: aioredis.Redis, serve: Any, settings_kwargs: dict[str, Any]
) -> None:
    store = RecordingStore(rds, fail=1)
    receiver = Receiver()
    # The lease is the delivery timeout plus 5 s.
    dispatcher = dispatcher_for(
        store, await serve(receiver), settings_kwargs, psp_callback_timeout_s=0.2
    )
    [body] = await queue(store, 1)
    dispatcher.start()
    try:
        await wait_until_acknowledged(store, timeout_s=10)
        totals = await store.stats(None)
    finally:
        await dispatcher.stop()
        await store.reset()
    assert receiver.bodies == [body, body]
    assert len(store.batches) == 2
    assert store.batches[0] == store.batches[1]
    assert totals["callbacks_sent"] == 1
