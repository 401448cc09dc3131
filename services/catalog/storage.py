"""Every SQL statement of the catalog, one function per query."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from services.catalog.metrics import ORDER_PG_QUERIES
from services.catalog.schemas import ProductIn
from services.common.db import Connection, Executor

_PRODUCT_COLUMNS = """
    id, sku, name, description, price_cents, currency, stock, flash_price_cents,
    flash_starts_at, flash_ends_at, flash_per_user_limit, updated_at
"""


async def fetch_product(conn: Executor, product_id: int) -> Any:
    """One product row, or None."""
    return await conn.fetchrow(
        f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE id = $1",  # noqa: S608
        product_id,
    )


async def fetch_page(conn: Executor, *, after: int, limit: int) -> list[Any]:
    """Up to `limit` products with id > `after`, in id order (keyset pagination)."""
    return await conn.fetch(
        f"SELECT {_PRODUCT_COLUMNS} FROM products WHERE id > $1 ORDER BY id LIMIT $2",  # noqa: S608
        after,
        limit,
    )


async def lock_product(conn: Connection, product_id: int) -> None:
    """Lock a product row (if it exists) until the transaction ends."""
    await conn.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", product_id)


async def upsert_product(conn: Connection, product_id: int, data: ProductIn) -> Any:
    """Create or replace a product; the row carries `created` (true when it was new).

    `stock` restarts the inventory invariant: units_on_sale becomes the new stock
    plus the units already held by reserved or paid orders. Call lock_product()
    first in the same transaction so the sum sees every committed order.
    """
    sale = data.flash_sale
    return await conn.fetchrow(
        f"""
        INSERT INTO products (id, sku, name, description, price_cents, currency, stock,
                              units_on_sale, flash_price_cents, flash_starts_at,
                              flash_ends_at, flash_per_user_limit, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10, $11, clock_timestamp())
        ON CONFLICT (id) DO UPDATE SET
            sku = EXCLUDED.sku, name = EXCLUDED.name, description = EXCLUDED.description,
            price_cents = EXCLUDED.price_cents, currency = EXCLUDED.currency,
            stock = EXCLUDED.stock,
            units_on_sale = EXCLUDED.stock + (
                SELECT coalesce(sum(o.quantity), 0) FROM orders o
                WHERE o.product_id = EXCLUDED.id AND o.status IN ('reserved', 'paid')
            ),
            flash_price_cents = EXCLUDED.flash_price_cents,
            flash_starts_at = EXCLUDED.flash_starts_at, flash_ends_at = EXCLUDED.flash_ends_at,
            flash_per_user_limit = EXCLUDED.flash_per_user_limit,
            updated_at = clock_timestamp()
        RETURNING {_PRODUCT_COLUMNS}, (xmax = 0) AS created
        """,  # noqa: S608
        product_id,
        data.sku,
        data.name,
        data.description,
        data.price_cents,
        data.currency,
        data.stock,
        sale.price_cents if sale else None,
        sale.starts_at if sale else None,
        sale.ends_at if sale else None,
        sale.per_user_limit if sale else None,
    )


async def insert_products_if_absent(conn: Connection, rows: list[tuple[Any, ...]]) -> int:
    """Bulk-insert demo products, keeping existing ids untouched; return how many were new."""
    result = await conn.fetchval(
        """
        WITH input AS (
            SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[],
                                 $5::bigint[], $6::text[], $7::int[], $8::bigint[],
                                 $9::timestamptz[], $10::timestamptz[], $11::int[])
              AS t(id, sku, name, description, price_cents, currency, stock,
                   flash_price_cents, flash_starts_at, flash_ends_at, flash_per_user_limit)
        ), ins AS (
            INSERT INTO products (id, sku, name, description, price_cents, currency, stock,
                                  flash_price_cents, flash_starts_at, flash_ends_at,
                                  flash_per_user_limit)
            SELECT * FROM input
            ON CONFLICT DO NOTHING
            RETURNING 1
        )
        SELECT count(*) FROM ins
        """,
        *[list(column) for column in zip(*rows, strict=True)],
    )
    return int(result)


# ---------------------------------------------------------------------------
# Orders. Lock order, everywhere: order rows, then products (by id), then
# order_limits (by product, user). Every function counts its statements in
# shopstack_order_pg_queries_total.

ORDER_COLUMNS = """
    id, user_id, product_id, quantity, amount_cents, currency, status, created_at,
    expires_at, held_by, held_until, paid_by
"""


def _counted(statements: int = 1) -> None:
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
    _counted()
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


async def product_exists(conn: Executor, product_id: int) -> bool:
    _counted()
    return bool(
        await conn.fetchval("SELECT EXISTS (SELECT 1 FROM products WHERE id = $1)", product_id)
    )


async def fetch_order(conn: Executor, order_id: UUID, *, for_update: bool = False) -> Any:
    """One order row, or None (FOR UPDATE locks it until the transaction ends)."""
    _counted()
    lock = " FOR UPDATE" if for_update else ""
    return await conn.fetchrow(
        f"SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1{lock}",  # noqa: S608
        order_id,
    )


async def close_order(conn: Connection, row: Any, *, status: str, now: datetime) -> Any:
    """Cancel a locked reserved order and return its units (stock and the user's count)."""
    _counted(3)
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
    _counted()
    return await conn.fetchrow(
        f"""
        UPDATE orders SET held_by = $2, held_until = $3 WHERE id = $1
        RETURNING {ORDER_COLUMNS}
        """,  # noqa: S608
        order_id,
        payment_id,
        until,
    )


async def mark_paid(conn: Connection, order_id: UUID, *, payment_id: UUID, now: datetime) -> Any:
    """Turn a locked reserved order into a paid one."""
    _counted()
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


# --- idempotency keys -------------------------------------------------------


async def claim_idempotency_key(
    conn: Executor,
    *,
    user_id: str,
    scope: str,
    key: str,
    request_hash: bytes,
    order_id: UUID,
    now: datetime,
    locked_until: datetime,
    expires_at: datetime,
) -> bool:
    """Insert a new key record (in flight); False when the key already exists."""
    _counted()
    inserted = await conn.fetchval(
        """
        INSERT INTO idempotency_keys (user_id, scope, key, request_hash, order_id,
                                      locked_until, created_at, expires_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        user_id,
        scope,
        key,
        request_hash,
        order_id,
        locked_until,
        now,
        expires_at,
    )
    return bool(inserted)


async def fetch_idempotency_key(conn: Executor, *, user_id: str, scope: str, key: str) -> Any:
    _counted()
    return await conn.fetchrow(
        """
        SELECT request_hash, order_id, response_status, response_body, locked_until, expires_at
        FROM idempotency_keys WHERE user_id = $1 AND scope = $2 AND key = $3
        """,
        user_id,
        scope,
        key,
    )


async def take_over_idempotency_key(
    conn: Executor,
    *,
    user_id: str,
    scope: str,
    key: str,
    now: datetime,
    locked_until: datetime,
) -> bool:
    """Take an in-flight key whose lock lapsed (its first worker died)."""
    _counted()
    taken = await conn.fetchval(
        """
        UPDATE idempotency_keys SET locked_until = $5
        WHERE user_id = $1 AND scope = $2 AND key = $3
          AND response_status IS NULL AND locked_until <= $4 AND expires_at > $4
        RETURNING true
        """,
        user_id,
        scope,
        key,
        now,
        locked_until,
    )
    return bool(taken)


async def unlock_idempotency_key(
    conn: Executor, *, user_id: str, scope: str, key: str, now: datetime
) -> None:
    """Let a retry take an unfinished key over at once (its attempt failed)."""
    _counted()
    await conn.execute(
        """
        UPDATE idempotency_keys SET locked_until = $4
        WHERE user_id = $1 AND scope = $2 AND key = $3 AND response_status IS NULL
        """,
        user_id,
        scope,
        key,
        now,
    )


async def delete_idempotency_key(
    conn: Executor, *, user_id: str, scope: str, key: str, only_expired_at: datetime | None = None
) -> None:
    """Forget a key (after a failure nobody should replay, or once it expired)."""
    _counted()
    await conn.execute(
        """
        DELETE FROM idempotency_keys WHERE user_id = $1 AND scope = $2 AND key = $3
          AND ($4::timestamptz IS NULL OR expires_at <= $4)
        """,
        user_id,
        scope,
        key,
        only_expired_at,
    )


async def store_idempotent_response(
    conn: Executor, *, user_id: str, scope: str, key: str, status: int, body: bytes
) -> None:
    _counted()
    await conn.execute(
        """
        UPDATE idempotency_keys SET response_status = $4, response_body = $5
        WHERE user_id = $1 AND scope = $2 AND key = $3
        """,
        user_id,
        scope,
        key,
        status,
        body,
    )


async def purge_idempotency_keys(conn: Executor, *, now: datetime, limit: int) -> int:
    """Delete up to `limit` expired keys; return how many."""
    result = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM idempotency_keys WHERE ctid IN (
                SELECT ctid FROM idempotency_keys WHERE expires_at <= $1 LIMIT $2
            ) RETURNING 1
        ) SELECT count(*) FROM gone
        """,
        now,
        limit,
    )
    return int(result)


# --- gate sources and the invariant ----------------------------------------


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
