"""Order use cases: place, read, cancel, expire; and the payment service's calls.

Placing an order: local sold-out flag -> Redis gate (one Lua script, keyed by the
order id) -> one Postgres statement (the authority) -> mark the gate committed.
If Postgres refuses what the gate admitted, the gate is undone for that id.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
from redis.exceptions import RedisError

from services.catalog import storage
from services.catalog.gate import Admission, now_ms
from services.catalog.inventory import Inventory, announce_stock_restored, load_products
from services.catalog.metrics import GATE_CALLS, ORDER_ATTEMPTS, ORDERS_EXPIRED
from services.common.db import PG_UNAVAILABLE
from services.common.errors import (
    Conflict,
    LimitExceeded,
    NotFound,
    OrderNotPayable,
    Problem,
    SoldOut,
    UpstreamUnavailable,
)
from services.common.outage import unavailable_problem

log = logging.getLogger("shopstack.catalog.orders")


class OrderNotCancellable(Conflict):
    code = "order-not-cancellable"
    title = "Order Not Cancellable"


def order_document(row: Any) -> dict[str, Any]:
    """An order as its owner sees it (API.md)."""
    return {
        "id": str(row["id"]),
        "status": row["status"],
        "product_id": row["product_id"],
        "quantity": row["quantity"],
        "amount_cents": row["amount_cents"],
        "currency": row["currency"],
        "expires_at": row["expires_at"],
    }


def internal_order_document(row: Any) -> dict[str, Any]:
    """An order as the payment service sees it."""
    held_by = row["held_by"] if row["status"] == "reserved" else row["paid_by"]
    return {
        **order_document(row),
        "user_id": row["user_id"],
        "held_by": None if held_by is None else str(held_by),
    }


def _gate_down(exc: Exception) -> UpstreamUnavailable:
    log.warning("inventory gate unavailable", extra={"error": str(exc)})
    return UpstreamUnavailable("the inventory gate is unavailable", status=503, retry_after_s=1)


def _db_down(exc: Exception) -> Exception:
    """What a Postgres error on the order path becomes: the shared 503 when Postgres did
    not answer (services.common.outage); a DataError or a client misconfiguration is a
    bug, not an outage, and stays itself (a 500 from the catch-all, with its trace)."""
    problem = unavailable_problem(exc)
    if problem is None:
        return exc
    log.warning("postgres unavailable on the order path", extra={"error": str(exc)})
    return problem


@asynccontextmanager
async def postgres_guard() -> AsyncIterator[None]:
    """Turn "Postgres did not answer" into 503 upstream-unavailable (never a bare 500)."""
    try:
        yield
    except PG_UNAVAILABLE as exc:
        raise _db_down(exc) from None


def refuse_if_flagged(inv: Inventory, product_id: int) -> None:
    """Sold out per this process's flag: refuse with no Redis and no Postgres work."""
    if inv.flags.is_sold_out(product_id):
        ORDER_ATTEMPTS.labels("sold_out_local").inc()
        raise SoldOut(f"product {product_id} is sold out")


async def place_order(
    *,
    inv: Inventory,
    user_id: str,
    product_id: int,
    quantity: int,
    order_id: UUID | None = None,
    is_retry: bool = False,
) -> Any:
    """Reserve `quantity` units for the user; return the order row.

    Raises SoldOut, LimitExceeded, NotFound (unknown product) or
    UpstreamUnavailable (gate or database down). `order_id` is the reservation id
    (an idempotent retry passes the id of its first attempt).
    """
    rid = order_id or uuid4()
    if is_retry:
        existing = await _existing_order(inv, rid)
        if existing is not None:
            return existing
    refuse_if_flagged(inv, product_id)
    await _admit(
        inv, user_id=user_id, product_id=product_id, quantity=quantity, rid=rid, is_retry=is_retry
    )
    _maybe_crash(inv)
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=inv.settings.catalog_reservation_ttl_s)
    try:
        row = await storage.reserve(
            inv.pool,
            order_id=rid,
            user_id=user_id,
            product_id=product_id,
            quantity=quantity,
            now=now,
            expires_at=expires,
        )
    except asyncpg.CheckViolationError as exc:
        await _undo(inv, product_id, rid)
        if exc.constraint_name == "per_user_limit":
            ORDER_ATTEMPTS.labels("limit_pg").inc()
            raise LimitExceeded(_limit_detail(product_id)) from None
        raise
    except asyncpg.UniqueViolationError:
        # A retry whose first attempt did commit: that order is the answer.
        existing = await _existing_order(inv, rid)
        if existing is None:
            raise
        return existing
    except PG_UNAVAILABLE as exc:
        await _undo(inv, product_id, rid)
        raise _db_down(exc) from None
    except BaseException:
        await _undo(inv, product_id, rid)
        raise
    if row is None:
        await _undo(inv, product_id, rid)
        ORDER_ATTEMPTS.labels("sold_out_pg").inc()
        raise SoldOut(f"product {product_id} has fewer than {quantity} units left")
    try:
        GATE_CALLS.labels("commit").inc()
        await inv.gate.commit(
            product_id=product_id, rid=str(rid), user_id=user_id, quantity=quantity
        )
    except RedisError:
        log.warning(
            "gate commit failed; the reconciler will commit it", extra={"order_id": str(rid)}
        )
    ORDER_ATTEMPTS.labels("reserved").inc()
    try:
        await inv.cache.invalidate(product_id)
    except RedisError:
        log.warning("cache invalidation failed", extra={"product_id": product_id})
    return row


def _limit_detail(product_id: int) -> str:
    return f"the flash-sale limit per customer for product {product_id} would be exceeded"


async def _existing_order(inv: Inventory, rid: UUID) -> Any:
    try:
        return await storage.fetch_order(inv.pool, rid)
    except PG_UNAVAILABLE as exc:
        raise _db_down(exc) from None


async def _admit(
    inv: Inventory, *, user_id: str, product_id: int, quantity: int, rid: UUID, is_retry: bool
) -> None:
    """Pass the Redis gate or raise; loads the product into the gate on first sight."""
    for attempt in range(2):
        try:
            GATE_CALLS.labels("admit").inc()
            result = await inv.gate.admit(
                product_id=product_id,
                rid=str(rid),
                user_id=user_id,
                quantity=quantity,
                at_ms=now_ms(),
                reopen=is_retry,
            )
        except RedisError as exc:
            raise _gate_down(exc) from None
        decision = result.decision
        if decision in (Admission.ADMITTED, Admission.ALREADY_ADMITTED):
            return
        if decision is Admission.SOLD_OUT:
            if result.stock <= 0:
                inv.flags.mark(product_id)
            ORDER_ATTEMPTS.labels("sold_out_gate").inc()
            raise SoldOut(f"product {product_id} is sold out")
        if decision is Admission.LIMIT:
            ORDER_ATTEMPTS.labels("limit_gate").inc()
            raise LimitExceeded(_limit_detail(product_id))
        if decision is Admission.CLOSED:
            raise Conflict("this reservation was already closed")
        if attempt == 0:  # NOT_LOADED: a new product, or Redis lost the gate
            try:
                GATE_CALLS.labels("load").inc()
                found = await load_products(inv, [product_id], replace=False)
            except RedisError as exc:
                raise _gate_down(exc) from None
            except PG_UNAVAILABLE as exc:
                raise _db_down(exc) from None
            if product_id not in found:
                ORDER_ATTEMPTS.labels("unknown_product").inc()
                raise NotFound(f"product {product_id} does not exist")
    raise _gate_down(RuntimeError("product could not be loaded into the gate"))


async def _undo(inv: Inventory, product_id: int, rid: UUID) -> None:
    try:
        GATE_CALLS.labels("undo").inc()
        await inv.gate.undo(product_id=product_id, rid=str(rid))
    except RedisError:
        log.warning("gate undo failed; the reconciler will undo it", extra={"order_id": str(rid)})


def _maybe_crash(inv: Inventory) -> None:
    """Test-only fault hook (INV-4): die between the gate and the commit."""
    chance = inv.settings.catalog_fault_crash_after_gate
    if chance > 0 and random.random() < chance:
        os._exit(137)


async def get_order(*, inv: Inventory, user_id: str, order_id: UUID) -> Any:
    """The order, for its owner only (NotFound for anyone else)."""
    try:
        row = await storage.fetch_order(inv.pool, order_id)
    except PG_UNAVAILABLE as exc:
        raise _db_down(exc) from None
    if row is None or row["user_id"] != user_id:
        raise NotFound(f"order {order_id} does not exist")
    return row


async def cancel_order(*, inv: Inventory, user_id: str, order_id: UUID) -> Any:
    """Cancel the owner's reserved order; its units return once. Idempotent."""
    now = datetime.now(UTC)
    async with postgres_guard(), inv.pool.acquire() as conn, conn.transaction():
        row = await storage.fetch_order(conn, order_id, for_update=True)
        if row is None or row["user_id"] != user_id:
            raise NotFound(f"order {order_id} does not exist")
        if row["status"] in ("cancelled", "expired"):
            return row
        if row["status"] == "paid":
            raise OrderNotCancellable(f"order {order_id} is already paid")
        if row["held_until"] is not None and row["held_until"] > now:
            raise OrderNotCancellable(f"a payment for order {order_id} is in progress")
        closed = await storage.close_order(conn, row, status="cancelled", now=now)
    await _release(inv, row["product_id"], order_id)
    return closed


async def _release(inv: Inventory, product_id: int, order_id: UUID) -> None:
    try:
        GATE_CALLS.labels("release").inc()
        await inv.gate.release(product_id=product_id, rid=str(order_id))
    except RedisError:
        log.warning(
            "gate release failed; the reconciler will release it", extra={"order_id": str(order_id)}
        )
    await announce_stock_restored(inv, [product_id])


async def expire_due_orders(*, inv: Inventory, limit: int | None = None) -> list[Any]:
    """Expire one batch of due reservations (several workers may run this at once)."""
    batch = limit or inv.settings.catalog_sweep_batch
    now = datetime.now(UTC)
    async with inv.pool.acquire() as conn, conn.transaction():
        rows = await storage.expire_due(conn, now=now, limit=batch)
    if rows:
        ORDERS_EXPIRED.inc(len(rows))
        try:
            await inv.gate.release_many((row["product_id"], str(row["id"])) for row in rows)
        except RedisError:
            log.warning("gate release failed for expired orders; the reconciler will")
        await announce_stock_restored(inv, {row["product_id"] for row in rows})
    return rows


# --- the payment service's calls (internal API) -----------------------------


def _not_payable(order_id: UUID, why: str) -> OrderNotPayable:
    return OrderNotPayable(f"order {order_id} {why}")


async def _locked(conn: Any, order_id: UUID) -> Any:
    row = await storage.fetch_order(conn, order_id, for_update=True)
    if row is None:
        raise NotFound(f"order {order_id} does not exist")
    return row


def _why_not_payable(row: Any, payment_id: UUID, now: datetime) -> str | None:
    status = row["status"]
    if status == "paid":
        return None if row["paid_by"] == payment_id else "is already paid by another payment"
    if status != "reserved":
        return f"is {status}"
    held_by, held_until = row["held_by"], row["held_until"]
    if held_by is not None and held_by != payment_id and held_until > now:
        return "is held by another payment"
    if held_by != payment_id and row["expires_at"] <= now:
        return "has expired"
    return None


async def internal_get(*, inv: Inventory, order_id: UUID) -> Any:
    async with postgres_guard():
        row = await storage.fetch_order(inv.pool, order_id)
    if row is None:
        raise NotFound(f"order {order_id} does not exist")
    return row


async def _payable(conn: Any, order_id: UUID, payment_id: UUID, now: datetime) -> Any:
    """The order, locked, if `payment_id` may hold or pay it; 409 order-not-payable if not."""
    row = await _locked(conn, order_id)
    why = _why_not_payable(row, payment_id, now)
    if why is not None:
        raise _not_payable(order_id, why)
    return row


async def hold_order(
    *, inv: Inventory, order_id: UUID, payment_id: UUID, user_id: str | None = None
) -> Any:
    """Hold a reserved order for a payment so the sweeper leaves it alone meanwhile.

    With `user_id`, an order that user does not own is answered like a missing one.
    """
    now = datetime.now(UTC)
    until = now + timedelta(seconds=inv.settings.catalog_hold_ttl_s)
    async with postgres_guard():
        # The usual case in one statement; anything else takes the locked path below,
        # which tells the reason (or finds the order already paid by this payment).
        held = await storage.hold_if_payable(
            inv.pool, order_id, payment_id=payment_id, user_id=user_id, now=now, until=until
        )
    if held is not None:
        return held
    async with postgres_guard(), inv.pool.acquire() as conn, conn.transaction():
        row = await _locked(conn, order_id)
        if user_id is not None and row["user_id"] != user_id:
            raise NotFound(f"order {order_id} does not exist")
        why = _why_not_payable(row, payment_id, now)
        if why is not None:
            raise _not_payable(order_id, why)
        if row["status"] == "paid":
            return row
        return await storage.set_hold(conn, order_id, payment_id=payment_id, until=until)


async def mark_order_paid(*, inv: Inventory, order_id: UUID, payment_id: UUID) -> Any:
    """The payment succeeded: the order becomes paid (idempotent per payment)."""
    return _one(await apply_payment_outcomes(inv=inv, items=[("paid", order_id, payment_id)]))


async def release_hold(*, inv: Inventory, order_id: UUID, payment_id: UUID) -> Any:
    """The payment failed: drop its hold (no-op unless this payment holds the order)."""
    return _one(await apply_payment_outcomes(inv=inv, items=[("release", order_id, payment_id)]))


def _one(results: list[Any]) -> Any:
    (result,) = results
    if isinstance(result, Problem):
        raise result
    return result


async def apply_payment_outcomes(
    *, inv: Inventory, items: Sequence[tuple[str, UUID, UUID]]
) -> list[Any]:
    """Apply payment outcomes, `(kind, order id, payment id)` with kind `paid` or
    `release`, in one transaction, in the order given.

    Each item gets what its own call would answer: the order row, or the NotFound /
    OrderNotPayable problem (returned, not raised: the other items still apply).
    `paid` turns a reserved order paid when this payment holds it, or when nobody does
    and it has not expired (idempotent per payment); `release` drops this payment's
    hold and is a no-op otherwise.
    """
    now = datetime.now(UTC)
    results: list[Any] = []
    newly_paid: list[Any] = []
    async with postgres_guard(), inv.pool.acquire() as conn, conn.transaction():
        locked = await storage.fetch_orders_for_update(conn, [order_id for _, order_id, _ in items])
        rows = {row["id"]: row for row in locked}
        for kind, order_id, payment_id in items:
            row = rows.get(order_id)
            if row is None:
                results.append(NotFound(f"order {order_id} does not exist"))
                continue
            if kind == "paid":
                why = _why_not_payable(row, payment_id, now)
                if why is not None:
                    results.append(_not_payable(order_id, why))
                    continue
                if row["status"] != "paid":
                    row = await storage.mark_paid(conn, order_id, payment_id=payment_id, now=now)
                    newly_paid.append(row)
            elif row["status"] == "reserved" and row["held_by"] == payment_id:
                row = await storage.set_hold(conn, order_id, payment_id=None, until=None)
            rows[order_id] = row
            results.append(row)
    if newly_paid:
        try:
            await inv.gate.forget_many((row["product_id"], str(row["id"])) for row in newly_paid)
        except RedisError:
            log.warning(
                "gate forget failed; the reconciler will",
                extra={"order_ids": [str(row["id"]) for row in newly_paid]},
            )
    return results
