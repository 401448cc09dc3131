"""Orders, the per-user counters, and what the gate is built from.

Lock order, everywhere: order rows, then products (by id), then order_limits
(by product, user). The order path counts its statements in
shopstack_order_pg_queries_total.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from services.catalog.metrics import ORDER_PG_QUERIES
from services.common.db import Connection, Executor

ORDER_COLUMNS = """
    id, user_id, product_id, quantity, amount_cents, currency, status, created_at,
    expires_at, held_by, held_until, paid_by
"""


def count_queries(statements: int = 1) -> None:
    ORDER_PG_QUERIES.inc(statements)


async def reserve(
    conn: Executor,
    *,
    order_id: UUID,
    user_id: str,
    product_id: int,
    quantity: int,
    now: datetime,
    expires_at: datetime,
) -> Any:
    """Take `quantity` units and insert the order, in one statement; None when sold out.

    The conditional UPDATE cannot take stock below zero; the order_limits upsert
    raises CheckViolationError (per_user_limit) when the user would pass the
    flash-sale cap. The price is the flash-sale price while the window is open.
    """
    count_queries()
    return await conn.fetchrow(
        f"""
        WITH p AS (
            UPDATE products SET stock = stock - $4
            WHERE id = $3 AND stock >= $4
            RETURNING id, currency,
                CASE WHEN flash_price_cents IS NOT NULL
                          AND $5 >= flash_starts_at AND $5 < flash_ends_at
                     THEN flash_price_cents ELSE price_cents END AS unit_price,
                CASE WHEN flash_price_cents IS NOT NULL
                          AND $5 >= flash_starts_at AND $5 < flash_ends_at
                     THEN flash_per_user_limit END AS cap
        ), l AS (
            INSERT INTO order_limits (user_id, product_id, units, cap)
            SELECT $2, p.id, $4, p.cap FROM p
            ON CONFLICT (user_id, product_id) DO UPDATE
                SET units = order_limits.units + EXCLUDED.units, cap = EXCLUDED.cap
            RETURNING units
        )
        INSERT INTO orders (id, user_id, product_id, quantity, amount_cents, currency,
                            status, created_at, expires_at)
        SELECT $1, $2, p.id, $4, p.unit_price * $4, p.currency, 'reserved', $5, $6
        FROM p, l
        RETURNING {ORDER_COLUMNS}
        """,  # noqa: S608
        order_id,
        user_id,
        product_id,
        quantity,
        now,
        expires_at,
    )


async def fetch_order(conn: Executor, order_id: UUID, *, for_update: bool = False) -> Any:
    """One order row, or None (FOR UPDATE locks it until the transaction ends)."""
    count_queries()
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchrow(
        f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1{lock}",  # noqa: S608
        order_id,
    )


async def fetch_orders_for_update(conn: Connection, order_ids: list[UUID]) -> list[Any]:
    """Lock several orders, in id order (so two batches never wait on each other in a
    cycle); missing ids are simply absent."""
    count_queries()
    return await conn.fetch(
        f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = ANY($1::uuid[]) "  # noqa: S608
        "ORDER BY id FOR UPDATE",
        sorted(set(order_ids)),
    )


async def close_order(conn: Connection, row: Any, *, status: str, now: datetime) -> Any:
    """Cancel a locked reserved order and return its units (stock and the user's count)."""
    count_queries(3)
    closed = await conn.fetchrow(
        f"""
        UPDATE orders SET status = $2, closed_at = $3, held_by = NULL, held_until = NULL
        WHERE id = $1 AND status = 'reserved'
        RETURNING {ORDER_COLUMNS}
        """,  # noqa: S608
        row["id"],
        status,
        now,
    )
    if closed is None:
        return None
    await conn.execute(
        "UPDATE products SET stock = stock + $2 WHERE id = $1", row["product_id"], row["quantity"]
    )
    await conn.execute(
        "UPDATE order_limits SET units = units - $3 WHERE user_id = $1 AND product_id = $2",
        row["user_id"],
        row["product_id"],
        row["quantity"],
    )
    return closed


async def set_hold(
    conn: Connection, order_id: UUID, *, payment_id: UUID | None, until: datetime | None
) -> Any:
    """Set (or clear, with None) the payment hold of a locked order."""
    count_queries()
    return await conn.fetchrow(
        f"""
        UPDATE orders SET held_by = $2, held_until = $3 WHERE id = $1
        RETURNING {ORDER_COLUMNS}
        """,  # noqa: S608
        order_id,
        payment_id,
        until,
    )


async def hold_if_payable(
    conn: Executor,
    order_id: UUID,
    *,
    payment_id: UUID,
    user_id: str | None,
    now: datetime,
    until: datetime,
) -> Any:
    """Hold a reserved order for a payment in one statement when nothing stands in the
    way: owned by `user_id` (if given), not held by another payment's live hold, not
    past `expires_at` unless this payment holds it. None otherwise (nothing written)."""
    count_queries()
    return await conn.fetchrow(
        f"""
        UPDATE orders SET held_by = $2, held_until = $3
        WHERE id = $1 AND status = 'reserved'
          AND ($4::text IS NULL OR user_id = $4::text)
          AND (held_by IS NULL OR held_by = $2 OR held_until <= $5)
          AND (held_by = $2 OR expires_at > $5)
        RETURNING {ORDER_COLUMNS}
        """,  # noqa: S608
        order_id,
        payment_id,
        until,
        user_id,
        now,
    )


async def mark_paid(conn: Connection, order_id: UUID, *, payment_id: UUID, now: datetime) -> Any:
    """Turn a locked reserved order into a paid one."""
    count_queries()
    return await conn.fetchrow(
        f"""
        UPDATE orders SET status = 'paid', paid_by = $2, closed_at = $3,
                          held_by = NULL, held_until = NULL
        WHERE id = $1 AND status = 'reserved'
        RETURNING {ORDER_COLUMNS}
        """,  # noqa: S608
        order_id,
        payment_id,
        now,
    )


async def expire_due(conn: Connection, *, now: datetime, limit: int) -> list[Any]:
    """Claim and expire up to `limit` due reservations, returning their units.

    FOR UPDATE SKIP LOCKED lets several sweepers run at once: each row is
    claimed by exactly one of them, and a row a cancel is holding is skipped.
    Run inside a transaction.
    """
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT id FROM orders
            WHERE status = 'reserved' AND expires_at <= $1
              AND (held_until IS NULL OR held_until <= $1)
            ORDER BY expires_at
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        UPDATE orders o SET status = 'expired', closed_at = $1, held_by = NULL,
                            held_until = NULL
        FROM due WHERE o.id = due.id AND o.status = 'reserved'
        RETURNING o.id, o.product_id, o.user_id, o.quantity
        """,
        now,
        limit,
    )
    if not rows:
        return []
    per_product: dict[int, int] = {}
    per_user: dict[tuple[int, str], int] = {}
    for row in rows:
        pid, uid, qty = row["product_id"], row["user_id"], row["quantity"]
        per_product[pid] = per_product.get(pid, 0) + qty
        per_user[(pid, uid)] = per_user.get((pid, uid), 0) + qty
    pids = sorted(per_product)
    await conn.execute(
        "SELECT 1 FROM products WHERE id = ANY($1::bigint[]) ORDER BY id FOR UPDATE", pids
    )
    await conn.execute(
        """
        UPDATE products p SET stock = p.stock + d.qty
        FROM unnest($1::bigint[], $2::int[]) AS d(pid, qty) WHERE p.id = d.pid
        """,
        pids,
        [per_product[pid] for pid in pids],
    )
    keys = sorted(per_user)
    await conn.execute(
        """
        SELECT 1 FROM order_limits l
        JOIN unnest($1::bigint[], $2::text[]) AS d(pid, uid)
          ON l.product_id = d.pid AND l.user_id = d.uid
        ORDER BY l.product_id, l.user_id FOR UPDATE OF l
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
    )
    await conn.execute(
        """
        UPDATE order_limits l SET units = l.units - d.qty
        FROM unnest($1::bigint[], $2::text[], $3::int[]) AS d(pid, uid, qty)
        WHERE l.product_id = d.pid AND l.user_id = d.uid
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [per_user[k] for k in keys],
    )
    return rows


async def fetch_gate_products(conn: Executor, product_ids: list[int] | None) -> list[Any]:
    """Stock and sale terms of the given products (None: all)."""
    return await conn.fetch(
        """
        SELECT id, stock, flash_per_user_limit, flash_starts_at, flash_ends_at
        FROM products WHERE $1::bigint[] IS NULL OR id = ANY($1::bigint[])
        ORDER BY id
        """,
        product_ids,
    )


async def fetch_reserved_orders(conn: Executor, product_ids: list[int] | None) -> list[Any]:
    """(product_id, id, user_id, quantity) of every reserved order of the products."""
    return await conn.fetch(
        """
        SELECT product_id, id, user_id, quantity FROM orders
        WHERE status = 'reserved'
          AND ($1::bigint[] IS NULL OR product_id = ANY($1::bigint[]))
        """,
        product_ids,
    )


async def fetch_user_units(conn: Executor, product_ids: list[int] | None) -> list[Any]:
    """(product_id, user_id, units) held in reserved or paid orders."""
    return await conn.fetch(
        """
        SELECT product_id, user_id, units FROM order_limits
        WHERE units > 0 AND ($1::bigint[] IS NULL OR product_id = ANY($1::bigint[]))
        """,
        product_ids,
    )


async def fetch_order_statuses(conn: Executor, order_ids: list[UUID]) -> dict[str, str]:
    """Status of each given order that exists, keyed by the id's text."""
    if not order_ids:
        return {}
    rows = await conn.fetch("SELECT id, status FROM orders WHERE id = ANY($1::uuid[])", order_ids)
    return {str(row["id"]): row["status"] for row in rows}


async def fetch_inventory_discrepancies(conn: Executor) -> list[Any]:
    """Products where units_on_sale != stock + units in reserved or paid orders."""
    return await conn.fetch(
        """
        SELECT p.id, p.units_on_sale, p.stock, coalesce(o.held, 0) AS held,
               p.units_on_sale - p.stock - coalesce(o.held, 0) AS discrepancy
        FROM products p
        LEFT JOIN (
            SELECT product_id, sum(quantity) AS held FROM orders
            WHERE status IN ('reserved', 'paid') GROUP BY product_id
        ) o ON o.product_id = p.id
        WHERE p.units_on_sale <> p.stock + coalesce(o.held, 0)
        """
    )
