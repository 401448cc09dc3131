"""Background loops the lifespan starts and stops: settle, outbox relay, key expiry.

Each runs in every worker; rows are claimed with SKIP LOCKED and a lease, so
workers share the work and a crashed worker's claims come back after the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from services.common.outage import OutageLog
from services.payment import storage
from services.payment.breaker import BreakerOpen
from services.payment.catalog import CatalogRefused, CatalogUnavailable
from services.payment.domain import record_outcome
from services.payment.metrics import OUTBOX_DELIVERIES
from services.payment.provider import ProviderCharge, ProviderError
from services.payment.resilience import call_with_retries
from services.payment.state import PaymentState

log = logging.getLogger("shopstack.payment.jobs")

KEY_EXPIRY_INTERVAL_S = 60.0


async def settle_due_payments(state: PaymentState, errors: OutageLog) -> int:
    """Ask the provider about payments whose outcome is unknown; return how many settled.

    A payment that fails is logged through `errors` and the rest of the batch goes on.
    """
    cfg = state.config
    lease_s = cfg.psp_timeout_s * cfg.psp_max_attempts + cfg.payment_settle_interval_s
    rows = await storage.claim_unsettled(state.db, limit=cfg.payment_settle_batch, lease_s=lease_s)
    settled = 0
    for row in rows:
        try:
            settled += await settle_payment(state, row)
        except Exception as exc:
            errors.failed("settling failed", exc, {"payment_id": str(row["id"])})
        else:
            errors.succeeded()
    return settled


async def settle_payment(state: PaymentState, payment: Any) -> int:
    """Settle one payment from the provider's records (1 when it reached a final status)."""
    cfg = state.config
    context = {"order_id": str(payment["order_id"]), "payment_id": str(payment["id"])}
    try:
        charges: list[ProviderCharge] = await call_with_retries(
            lambda timeout_s: state.provider.find_charges(
                reference=str(payment["id"]), timeout_s=timeout_s
            ),
            provider=state.provider.name,
            operation="lookup",
            breaker=state.breaker,
            policy=state.retry_policy,
            budget=state.retry_budget,
            idempotent=True,
            is_retryable=lambda exc: isinstance(exc, ProviderError) and exc.retryable,
            history=[],
            rng=state.rng,
            attempt_timeout_s=cfg.psp_timeout_s,
        )
    except (BreakerOpen, ProviderError, TimeoutError) as exc:
        log.warning(
            "settle lookup failed; will ask again",
            extra={
                **context,
                "error": f"{type(exc).__name__}: {exc}",
                "provider_reply": getattr(exc, "reply", ""),
            },
        )
        return 0
    mine = [c for c in charges if c.reference == str(payment["id"])]
    succeeded = next((c for c in mine if c.status == "succeeded"), None)
    if succeeded is not None:
        await record_outcome(
            state, payment=payment, status="succeeded", charge_id=succeeded.id, source="settle"
        )
        return 1
    if mine:
        await record_outcome(
            state,
            payment=payment,
            status="failed",
            charge_id=mine[0].id,
            reason="declined",
            source="settle",
        )
        return 1
    since = payment["last_attempt_at"] or payment["created_at"]
    if (payment["now"] - since).total_seconds() >= cfg.payment_settle_grace_s:
        # Every request we sent has long ended and the provider holds no charge.
        log.warning("no charge at the provider; payment failed", extra=context)
        await record_outcome(
            state, payment=payment, status="failed", reason="not-charged", source="settle"
        )
        return 1
    return 0


async def relay_outbox(state: PaymentState) -> int:
    """Deliver due outbox messages to the catalog (at least once); return how many went.

    Every message claimed together goes in one request (the catalog applies them in one
    transaction and answers each as its own call would), so under load the relay's cost
    per message shrinks as batches grow.
    """
    cfg = state.config
    rows = await storage.claim_outbox(
        state.db, limit=cfg.payment_outbox_batch, lease_s=cfg.catalog_timeout_s * 2 + 1
    )
    if not rows:
        return 0
    items = [(row["kind"], row["order_id"], row["payment_id"]) for row in rows]
    try:
        results = await state.catalog.apply_outcomes(items)
    except (CatalogUnavailable, CatalogRefused) as exc:
        # The batch as a whole did not arrive (a refusal of the batch itself, such as a
        # catalog without the route, is not a refusal of its messages): retry each later.
        for row in rows:
            await _retry_later(state, row, error=str(exc), reply=exc.reply)
        return 0
    delivered: list[int] = []
    for row, result in zip(rows, results, strict=True):
        if result.status == 200:
            OUTBOX_DELIVERIES.labels(row["kind"], "delivered").inc()
            delivered.append(row["id"])
        elif result.status in (404, 409):
            await _refused(state, row, reply=result.reply)
        else:
            await _retry_later(
                state, row, error=f"catalog answered {result.status}", reply=result.reply
            )
    if delivered:
        await storage.outbox_delivered(state.db, delivered)
    return len(delivered)


def _context(message: Any) -> dict[str, Any]:
    return {
        "order_id": str(message["order_id"]),
        "payment_id": str(message["payment_id"]),
        "kind": message["kind"],
        "attempts": message["attempts"],
    }


async def _retry_later(state: PaymentState, message: Any, *, error: str, reply: str) -> None:
    delay = min(state.config.payment_outbox_max_backoff_s, 0.2 * 2 ** message["attempts"])
    log.warning(
        "outbox delivery failed; will retry",
        extra={**_context(message), "error": error, "reply": reply, "retry_in_s": delay},
    )
    OUTBOX_DELIVERIES.labels(message["kind"], "retry").inc()
    await storage.outbox_retry_later(
        state.db, outbox_id=message["id"], delay_s=delay, error=f"{error} {reply}"
    )


async def _refused(state: PaymentState, message: Any, *, reply: str) -> None:
    """The catalog will never take it (the order expired, or another payment paid it):
    a charged payment then needs a refund, which is for a person to decide."""
    log.error("outbox message refused by the catalog", extra={**_context(message), "reply": reply})
    OUTBOX_DELIVERIES.labels(message["kind"], "refused").inc()
    async with state.db.acquire() as conn, conn.transaction():
        await storage.outbox_dead(conn, outbox_id=message["id"], error=reply)
        if message["kind"] == "paid":
            await storage.mark_refund_required(conn, message["payment_id"])


async def expire_keys(state: PaymentState) -> int:
    total = 0
    while True:
        removed = await storage.expire_keys(
            state.db, ttl_s=state.config.payment_idempotency_ttl_s, limit=1000
        )
        total += removed
        if removed < 1000:
            return total


class Jobs:
    """The background loops of one worker."""

    def __init__(self, state: PaymentState) -> None:
        self.state = state
        self._tasks: list[asyncio.Task[None]] = []
        # One payment of a claimed batch failing (the loop's own log is per loop).
        self._settle_errors = OutageLog(log, "settle-payment")

    def start(self) -> None:
        cfg = self.state.config
        self._tasks = [
            asyncio.create_task(
                self._loop(
                    "settle",
                    lambda state: settle_due_payments(state, self._settle_errors),
                    cfg.payment_settle_interval_s,
                ),
                name="payment-settle",
            ),
            asyncio.create_task(
                self._loop(
                    "outbox", relay_outbox, cfg.payment_outbox_poll_s, self.state.outbox_wakeup
                ),
                name="payment-outbox",
            ),
            asyncio.create_task(
                self._loop("key-expiry", expire_keys, KEY_EXPIRY_INTERVAL_S),
                name="payment-key-expiry",
            ),
        ]

    async def stop(self) -> None:
        # Cancel until they end: a single cancel can be swallowed by a loop's own
        # asyncio.timeout() expiring at the same moment (Python 3.11), and the loop
        # would then run on, holding up the shutdown.
        pending = {task for task in self._tasks if not task.done()}
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=0.1)
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(
        self,
        name: str,
        job: Callable[[PaymentState], Awaitable[int]],
        interval_s: float,
        wakeup: asyncio.Event | None = None,
    ) -> None:
        errors = OutageLog(log, name)
        while True:
            done = 0
            try:
                done = await job(self.state)
            except Exception as exc:
                errors.failed("job failed", exc)
            else:
                errors.succeeded()
            if done:
                continue  # there may be more due right now
            if wakeup is None:
                await asyncio.sleep(interval_s)
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s):
                    await wakeup.wait()
            wakeup.clear()
