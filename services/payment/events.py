"""Provider events (signed callbacks): dedupe by event id, then move the payment forward."""

from __future__ import annotations

import logging

from services.payment import storage
from services.payment.domain import apply_outcome, at_or_past
from services.payment.metrics import WEBHOOKS
from services.payment.schemas import CallbackEvent
from services.payment.state import PaymentState

log = logging.getLogger("shopstack.payment.events")

OUTCOMES = {"charge.succeeded": "succeeded", "charge.failed": "failed"}


async def process_event(state: PaymentState, event: CallbackEvent) -> str:
    """Apply an event once: processed, duplicate (seen before) or ignored (unknown type).

    The event id is recorded in the same transaction as its effect, and concurrent
    twins wait on that row, so ten deliveries of one event change the payment once.
    """
    data = event.data
    context = {
        "event_id": event.id,
        "event_type": event.type,
        "payment_id": str(data.payment_id),
        "charge_id": data.charge_id,
    }
    status = OUTCOMES.get(event.type)
    if event.id in state.recorded_events:
        # A recorded event committed together with its effect: nothing left to do.
        WEBHOOKS.labels("duplicate").inc()
        return "duplicate"
    if status is not None:
        # The usual case: the charge's own reply already settled the payment, so the
        # event only needs recording (one statement, no transaction).
        settled, fresh = await storage.record_settled_event(
            state.db,
            event_id=event.id,
            type_=event.type,
            payment_id=data.payment_id,
            charge_id=data.charge_id,
            created=event.created,
            settled=at_or_past(status),
            amount_cents=data.amount_cents,
            currency=data.currency,
        )
        if settled:
            state.recorded_events.add(event.id)
            WEBHOOKS.labels("stale" if fresh else "duplicate").inc()
            return "processed" if fresh else "duplicate"
    outcome = await _record_and_apply(state, event, status, context)
    # Recorded now (by this call or by a concurrent twin): later deliveries skip the query.
    state.recorded_events.add(event.id)
    return outcome


async def _record_and_apply(
    state: PaymentState, event: CallbackEvent, status: str | None, context: dict[str, str]
) -> str:
    data = event.data
    changed = False
    async with state.db.acquire() as conn, conn.transaction():
        fresh = await storage.insert_event(
            conn,
            event_id=event.id,
            type_=event.type,
            payment_id=data.payment_id,
            charge_id=data.charge_id,
            created=event.created,
        )
        if not fresh:
            WEBHOOKS.labels("duplicate").inc()
            return "duplicate"
        if status is None:
            log.info("provider event of an unknown type ignored", extra=context)
            WEBHOOKS.labels("ignored").inc()
            return "ignored"
        payment = await storage.fetch_payment_for_update(conn, data.payment_id)
        if payment is None:
            log.warning("provider event for an unknown payment", extra=context)
            WEBHOOKS.labels("unknown-payment").inc()
            return "processed"
        context["order_id"] = str(payment["order_id"])
        if (data.amount_cents, data.currency) != (payment["amount_cents"], payment["currency"]):
            log.error(
                "provider event amount does not match the payment; not applied",
                extra={
                    **context,
                    "provider_amount": data.amount_cents,
                    "provider_currency": data.currency,
                },
            )
            WEBHOOKS.labels("mismatch").inc()
            return "processed"
        row = await apply_outcome(
            conn,
            payment_id=payment["id"],
            order_id=payment["order_id"],
            status=status,
            charge_id=data.charge_id,
            reason="declined" if status == "failed" else None,
            source="callback",
        )
        if row is not None:
            changed = True
            await storage.mark_event_applied(conn, event.id)
        else:
            log.info(
                "provider event would not move the payment forward",
                extra={**context, "payment_status": payment["status"]},
            )
    WEBHOOKS.labels("applied" if changed else "stale").inc()
    if changed:
        state.outbox_wakeup.set()
    return "processed"
