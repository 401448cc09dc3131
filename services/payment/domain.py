"""Payment use cases: pay an order, read a payment, and move payments forward.

State machine (ranks only grow; a late, duplicated or out-of-order event that
would move a payment back is a no-op):

    created ──> pending ──> failed ──> succeeded
       │           │                      ^
       │           └──────────────────────┤
       └──────────────────────────────────┘  (and created ──> failed)

`created` reads as `pending` in the API. `failed -> succeeded` exists because
the provider's word that money moved outranks an earlier decline. Every move
to succeeded queues an outbox 'paid' message and every move to failed a
'release', in the same transaction.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import asyncpg
import orjson

from services.common.errors import NotFound, OrderNotPayable, UpstreamUnavailable
from services.common.identity import Caller
from services.payment import idempotency, storage
from services.payment.breaker import BreakerOpen
from services.payment.catalog import CatalogRefused, CatalogUnavailable, Order
from services.payment.idempotency import KeyClaim, StoredResponse
from services.payment.metrics import PAYMENT_OUTCOMES
from services.payment.provider import ProviderCharge, ProviderError, ProviderRejected
from services.payment.resilience import call_with_retries
from services.payment.state import PaymentState

log = logging.getLogger("shopstack.payment")

RANK = {"created": 0, "pending": 1, "failed": 2, "succeeded": 3}
FINAL = frozenset({"succeeded", "failed"})
JSON_HEADERS = {"content-type": "application/json"}
_JSON_HEADERS_TEXT = orjson.dumps(JSON_HEADERS).decode()  # as stored under a key


def api_status(status: str) -> str:
    """The status a client sees (`created` is still pending to them)."""
    return "pending" if status == "created" else status


def earlier_statuses(target: str) -> list[str]:
    """The statuses a payment may move to `target` from."""
    return [status for status, rank in RANK.items() if rank < RANK[target]]


def at_or_past(target: str) -> list[str]:
    """The statuses from which `target` is no move forward (the payment is there or past)."""
    return [status for status, rank in RANK.items() if rank >= RANK[target]]


def payment_document(row: Any) -> dict[str, Any]:
    return {
        "id": str(row["id"]),
        "order_id": str(row["order_id"]),
        "status": api_status(row["status"]),
        "amount_cents": row["amount_cents"],
        "currency": row["currency"],
    }


def payment_body(row: Any) -> bytes:
    return orjson.dumps(payment_document(row))


async def apply_outcome(
    conn: Any,
    *,
    payment_id: uuid.UUID,
    order_id: uuid.UUID,
    status: str,
    charge_id: str | None,
    reason: str | None,
    source: str,
    answer: storage.KeyAnswer | None = None,
) -> Any:
    """Move a payment forward and queue its catalog message, in one statement.

    Returns the updated row, or None when the payment was already at or past `status`.
    """
    outbox_kind = {"succeeded": "paid", "failed": "release"}.get(status)
    row = await storage.transition(
        conn,
        payment_id=payment_id,
        status=status,
        from_statuses=earlier_statuses(status),
        charge_id=charge_id,
        failure_reason=reason,
        outbox_kind=outbox_kind,
        answer=answer,
    )
    if row is None:
        return None
    PAYMENT_OUTCOMES.labels(api_status(status), source).inc()
    return row


async def record_outcome(
    state: PaymentState,
    *,
    payment: Any,
    status: str,
    charge_id: str | None = None,
    reason: str | None = None,
    source: str,
    claim: KeyClaim | None = None,
) -> Any:
    """Apply an outcome; with a key claim, store the idempotent response atomically with it.

    Usually the payment moves: then one statement moves it, queues its outbox message
    and (keyed) stores the reply, which is known beforehand: the document of the
    payment at `status`.
    """
    answer = None
    if claim is not None:
        expected = payment_body({**dict(payment), "status": status})
        answer = storage.KeyAnswer(claim.user_id, claim.key, 201, _JSON_HEADERS_TEXT, expected)
    changed = await apply_outcome(
        state.db,
        payment_id=payment["id"],
        order_id=payment["order_id"],
        status=status,
        charge_id=charge_id,
        reason=reason,
        source=source,
        answer=answer,
    )
    if changed is not None:
        if status in FINAL:
            state.outbox_wakeup.set()
        return changed
    if claim is None:
        return await storage.fetch_payment(state.db, payment["id"])
    # It was already at or past `status` (a callback or the settle job came first):
    # store the reply as the payment is now.
    async with state.db.acquire() as conn, conn.transaction():
        row = await storage.fetch_payment(conn, payment["id"])
        await idempotency.complete(
            conn, claim, StoredResponse(201, JSON_HEADERS, payment_body(row))
        )
    return row


async def get_payment(*, state: PaymentState, caller: Caller, payment_id: uuid.UUID) -> bytes:
    """The caller's own payment; anyone else's is indistinguishable from a missing one."""
    row = await storage.fetch_user_payment(state.db, payment_id=payment_id, user_id=caller.user_id)
    if row is None:
        raise NotFound("payment not found")
    return payment_body(row)


async def create_payment(
    *, state: PaymentState, caller: Caller, order_id: uuid.UUID, claim: KeyClaim | None
) -> bytes:
    """Pay an order: hold it at the catalog, charge the provider once, record the outcome.

    The hold is the one catalog call before the charge: it checks that the caller owns
    the order (404 otherwise) and that it is payable (409), keeps it from expiring, and
    returns its amount. Only then is the payment row written, before any charge.

    Returns the 201 body. Raises NotFound (not the caller's order), OrderNotPayable,
    or UpstreamUnavailable (breaker open, catalog down, provider unreachable: nothing
    was charged, so the idempotency key is released by the caller).
    """
    payment_id = claim.payment_id if claim is not None else uuid.uuid4()
    if claim is not None and claim.resumed:
        existing = await storage.fetch_payment(state.db, payment_id)
        if existing is not None:
            if existing["status"] in FINAL:
                row = await record_outcome(
                    state, payment=existing, status=existing["status"], source="resume", claim=claim
                )
                return payment_body(row)
            return await charge(state, payment=existing, claim=claim, stamped=False)

    _refuse_if_breaker_open(state)
    order = await _hold(state, caller=caller, order_id=order_id, payment_id=payment_id)
    why = _why_not_payable(order)
    if why is not None:
        await _drop_hold(state, order_id=order_id, payment_id=payment_id)
        raise OrderNotPayable(why)
    try:
        payment = await storage.insert_payment(
            state.db,
            payment_id=payment_id,
            order_id=order_id,
            user_id=caller.user_id,
            amount_cents=order.amount_cents,
            currency=order.currency,
            provider=state.provider.name,
            settle_after_s=state.config.payment_settle_after_s,
        )
    except asyncpg.UniqueViolationError:
        await _drop_hold(state, order_id=order_id, payment_id=payment_id)
        raise OrderNotPayable("a payment for this order is already in progress") from None
    if payment is None:
        await _drop_hold(state, order_id=order_id, payment_id=payment_id)
        raise OrderNotPayable("this order is already paid")
    return await charge(state, payment=payment, claim=claim, stamped=True)


def _refuse_if_breaker_open(state: PaymentState) -> None:
    try:
        state.breaker.check()
    except BreakerOpen as exc:
        raise UpstreamUnavailable(
            "the payment provider is unavailable; try again later",
            status=503,
            retry_after_s=max(1, round(exc.retry_after_s)),
        ) from None


def _why_not_payable(order: Order) -> str | None:
    """Why a held order still cannot be charged (None: it can)."""
    if order.status != "reserved":
        return f"the order is {order.status}"
    if order.amount_cents <= 0:
        return "the order has nothing to pay"
    return None


async def _hold(
    state: PaymentState, *, caller: Caller, order_id: uuid.UUID, payment_id: uuid.UUID
) -> Order:
    """Hold the caller's order for this payment and return it; refusals become 404/409/503."""
    context = {"order_id": str(order_id), "payment_id": str(payment_id)}
    try:
        return await state.catalog.hold(order_id, payment_id, user_id=caller.user_id)
    except CatalogRefused as exc:
        log.info("order hold refused", extra={**context, "reply": exc.reply})
        if exc.status == 404:
            raise NotFound("order not found") from None
        raise OrderNotPayable("the order cannot be paid now") from None
    except CatalogUnavailable as exc:
        log.warning("order hold failed", extra={**context, "error": str(exc), "reply": exc.reply})
        raise UpstreamUnavailable(
            "the catalog is unavailable", status=503, retry_after_s=1
        ) from None


async def _drop_hold(state: PaymentState, *, order_id: uuid.UUID, payment_id: uuid.UUID) -> None:
    """Give back a hold this request took but will not charge for (best effort: a hold
    left behind lapses by itself after the catalog's hold TTL)."""
    try:
        await state.catalog.release(order_id, payment_id)
    except (CatalogRefused, CatalogUnavailable) as exc:
        log.warning(
            "hold release failed; it will lapse",
            extra={"order_id": str(order_id), "payment_id": str(payment_id), "error": str(exc)},
        )


async def charge(
    state: PaymentState, *, payment: Any, claim: KeyClaim | None, stamped: bool
) -> bytes:
    """Charge the provider with the payment id as its idempotency key; record what we learn.

    A reply we could not read (timeout, connection lost, 5xx) is an unknown outcome:
    the payment stays pending for a callback or the settle job, never failed.
    """
    if not stamped:
        await storage.note_charge_attempt(
            state.db, payment_id=payment["id"], settle_after_s=state.config.payment_settle_after_s
        )
    history: list[Exception] = []
    context = {"order_id": str(payment["order_id"]), "payment_id": str(payment["id"])}
    try:
        result: ProviderCharge = await call_with_retries(
            lambda timeout_s: state.provider.create_charge(
                idempotency_key=str(payment["id"]),
                amount_cents=payment["amount_cents"],
                currency=payment["currency"],
                reference=str(payment["id"]),
                timeout_s=timeout_s,
            ),
            provider=state.provider.name,
            operation="charge",
            breaker=state.breaker,
            policy=state.retry_policy,
            budget=state.retry_budget,
            idempotent=True,
            is_retryable=lambda exc: isinstance(exc, ProviderError) and exc.retryable,
            history=history,
            rng=state.rng,
            attempt_timeout_s=state.config.psp_timeout_s,
        )
    except (BreakerOpen, ProviderError, TimeoutError) as exc:
        return await _charge_failed(state, payment=payment, claim=claim, exc=exc, history=history)
    if (result.amount_cents, result.currency) != (payment["amount_cents"], payment["currency"]):
        log.error(
            "provider charged a different amount",
            extra={
                **context,
                "charge_id": result.id,
                "provider_amount": result.amount_cents,
                "provider_currency": result.currency,
            },
        )
    if result.status == "failed":
        log.warning("charge declined", extra={**context, "charge_id": result.id})
    row = await record_outcome(
        state,
        payment=payment,
        status=result.status,
        charge_id=result.id,
        reason="declined" if result.status == "failed" else None,
        source="charge",
        claim=claim,
    )
    return payment_body(row)


async def _charge_failed(
    state: PaymentState,
    *,
    payment: Any,
    claim: KeyClaim | None,
    exc: Exception,
    history: list[Exception],
) -> bytes:
    maybe_charged = any(not isinstance(e, ProviderError) or e.maybe_processed for e in history)
    last_reply = next((e.reply for e in reversed(history) if isinstance(e, ProviderError)), "")
    context = {
        "order_id": str(payment["order_id"]),
        "payment_id": str(payment["id"]),
        "error": f"{type(exc).__name__}: {exc}",
        "attempts": len(history),
        "provider_reply": last_reply,
    }
    if isinstance(exc, ProviderRejected):
        log.warning("charge rejected by the provider", extra=context)
        row = await record_outcome(
            state,
            payment=payment,
            status="failed",
            reason="provider-rejected",
            source="charge",
            claim=claim,
        )
        return payment_body(row)
    if maybe_charged:
        log.warning("charge outcome unknown; left pending", extra=context)
        row = await record_outcome(
            state, payment=payment, status="pending", source="charge", claim=claim
        )
        return payment_body(row)
    # Nothing reached the provider: fail the payment and let the client try again later.
    log.warning("charge not attempted: provider unavailable", extra=context)
    await record_outcome(
        state, payment=payment, status="failed", reason="provider-unavailable", source="charge"
    )
    retry_after = state.breaker.retry_after_s() if isinstance(exc, BreakerOpen) else 1.0
    raise UpstreamUnavailable(
        "the payment provider is unavailable; nothing was charged",
        status=503,
        retry_after_s=max(1, round(retry_after)),
    )
