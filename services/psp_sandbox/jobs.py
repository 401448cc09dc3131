"""Callback delivery: at least once, signed, retried with backoff until acknowledged.

A claimed delivery is leased (its due time pushed past the delivery timeout); a 2xx
reply queues its acknowledgement, and one task writes the queued acknowledgements in a
batch (one round trip for as many as arrived while the last batch was written). A
worker that stops before acknowledging leaves the lease to run out: the delivery is
claimed and sent again, as after a crash between sending and acknowledging.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aiohttp

from services.common.outage import OutageLog
from services.psp_sandbox.settings import SandboxSettings
from services.psp_sandbox.store import Delivery, SandboxStore
from services.psp_sandbox.webhooks import SIGNATURE_HEADER, signature_header

log = logging.getLogger("shopstack.psp_sandbox.callbacks")

MAX_BACKOFF_S = 30.0


class CallbackDispatcher:
    """Delivers queued events to the callback URL; any worker may deliver any event."""

    def __init__(self, settings: SandboxSettings, store: SandboxStore, secret: str) -> None:
        self.settings = settings
        self.store = store
        self.secret = secret
        self.url = settings.psp_callback_url or ""
        self.wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.psp_callback_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.Task[None] | None = None
        self._acks: list[str] = []
        self._acks_queued = asyncio.Event()
        self._acker: asyncio.Task[None] | None = None
        self._stopping = False
        self._claim_errors = OutageLog(log, "psp-callback-claim")
        self._ack_errors = OutageLog(log, "psp-callback-ack")
        self._bookkeeping_errors = OutageLog(log, "psp-callback-bookkeeping")

    def start(self) -> None:
        if not self.url:
            return
        timeout = aiohttp.ClientTimeout(total=self.settings.psp_callback_timeout_s)
        connector = aiohttp.TCPConnector(limit=self.settings.psp_callback_concurrency)
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        self._loop = asyncio.create_task(self._run(), name="psp-callbacks")
        self._acker = asyncio.create_task(self._acknowledge(), name="psp-callback-acks")

    async def stop(self) -> None:
        self._stopping = True
        self.wakeup.set()
        if self._loop is not None:
            # Cancel until it ends: a single cancel can be swallowed by the poll's own
            # asyncio.timeout() expiring at the same moment (Python 3.11), and the loop
            # would then run on, holding up the shutdown (seen under uvicorn, SHD-1).
            while not self._loop.done():
                self._loop.cancel()
                await asyncio.wait({self._loop}, timeout=0.1)
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._acker is not None:
            self._acker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acker
            await self._flush_acks()  # what was acknowledged meanwhile
        if self._session is not None:
            await self._session.close()

    def kick(self) -> None:
        """Deliver now rather than at the next poll."""
        self.wakeup.set()

    async def _run(self) -> None:
        lease_ms = int((self.settings.psp_callback_timeout_s + 5) * 1000)
        limit = self.settings.psp_callback_concurrency
        while not self._stopping:
            self.wakeup.clear()  # a kick from now on claims again
            try:
                deliveries = await self.store.claim_callbacks(lease_ms=lease_ms, limit=limit)
            except Exception as exc:
                self._claim_errors.failed("claiming callbacks failed", exc)
                deliveries = []
            else:
                self._claim_errors.succeeded()
            for delivery in deliveries:
                await self._slots.acquire()
                task = asyncio.create_task(self._deliver(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if len(deliveries) < limit:  # every due one was claimed: wait for more
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.psp_callback_poll_s):
                        await self.wakeup.wait()

    async def _acknowledge(self) -> None:
        while True:
            await self._acks_queued.wait()
            self._acks_queued.clear()
            await self._flush_acks()

    async def _flush_acks(self) -> None:
        batch, self._acks = self._acks, []
        if not batch:
            return
        try:
            await self.store.callbacks_delivered(batch)
        except Exception as exc:
            # Not acknowledged: the leases run out and the deliveries are sent again.
            self._ack_errors.failed(
                "acknowledging callbacks failed", exc, {"deliveries": len(batch)}
            )
        else:
            self._ack_errors.succeeded()

    async def _deliver(self, delivery: Delivery) -> None:
        try:
            await self._attempt(delivery)
        except Exception as exc:
            self._bookkeeping_errors.failed(
                "callback bookkeeping failed", exc, {"delivery": delivery.id}
            )
        else:
            self._bookkeeping_errors.succeeded()
        finally:
            self._slots.release()

    async def _attempt(self, delivery: Delivery) -> None:
        assert self._session is not None
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: signature_header(self.secret, delivery.body),
        }
        reply = ""
        try:
            async with self._session.post(self.url, data=delivery.body, headers=headers) as resp:
                reply = (await resp.text())[:500]
                if 200 <= resp.status < 300:
                    self._acks.append(delivery.id)
                    self._acks_queued.set()
                    return
                reply = f"{resp.status} {reply}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            reply = repr(exc)
        attempts = delivery.attempts + 1
        if attempts >= self.settings.psp_callback_max_attempts:
            log.error(
                "callback given up",
                extra={"delivery": delivery.id, "reply": reply, "attempts": attempts},
            )
            await self.store.callback_given_up(delivery.id)
            return
        backoff = min(MAX_BACKOFF_S, self.settings.psp_callback_backoff_s * 2 ** (attempts - 1))
        log.warning(
            "callback failed, will retry",
            extra={"delivery": delivery.id, "reply": reply, "attempts": attempts},
        )
        await self.store.callback_retry(delivery, delay_ms=int(backoff * 1000))
