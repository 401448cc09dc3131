"""Products: every SQL statement about the products table."""

from __future__ import annotations

from typing import Any

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
