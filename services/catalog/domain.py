"""Catalog use cases: read products (cached), list them, create or replace them."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from redis.exceptions import RedisError

from services.catalog import storage
from services.catalog.cache import MISSING, ProductCache
from services.catalog.inventory import Inventory, announce_stock_restored, load_products
from services.catalog.schemas import ProductIn
from services.common.errors import Conflict, NotFound
from services.common.outage import log_failure

log = logging.getLogger("shopstack.catalog")


@dataclass(frozen=True)
class ProductBody:
    """A serialized product and its entity tag."""

    body: bytes
    etag: str


def entity_tag(body: bytes) -> str:
    """Strong ETag derived from the exact bytes served."""
    return '"' + hashlib.blake2b(body, digest_size=12).hexdigest() + '"'


def product_document(row: Any) -> dict[str, Any]:
    """Shape a products row as the API.md `Product`."""
    sale = None
    if row["flash_price_cents"] is not None:
        sale = {
            "price_cents": row["flash_price_cents"],
            "starts_at": row["flash_starts_at"],
            "ends_at": row["flash_ends_at"],
            "per_user_limit": row["flash_per_user_limit"],
        }
    return {
        "id": row["id"],
        "sku": row["sku"],
        "name": row["name"],
        "description": row["description"],
        "price_cents": row["price_cents"],
        "currency": row["currency"],
        "stock": row["stock"],
        "flash_sale": sale,
        "updated_at": row["updated_at"],
    }


def serialize(document: dict[str, Any]) -> bytes:
    """JSON bytes with RFC 3339 timestamps (UTC, 'Z')."""
    return orjson.dumps(document, option=orjson.OPT_UTC_Z)


async def get_product(*, pool: asyncpg.Pool, cache: ProductCache, product_id: int) -> ProductBody:
    """Product detail through the cache; NotFound for an unknown id (negatively cached)."""
    cached, generation = await cache.lookup(product_id)
    if cached == MISSING:
        raise NotFound(f"product {product_id} does not exist")
    if cached is not None:
        return ProductBody(cached, entity_tag(cached))
    row = await storage.fetch_product(pool, product_id)
    if row is None:
        await cache.fill(product_id, generation, None)
        raise NotFound(f"product {product_id} does not exist")
    body = serialize(product_document(row))
    await cache.fill(product_id, generation, body)
    return ProductBody(body, entity_tag(body))


async def list_products(*, pool: asyncpg.Pool, after: int, limit: int) -> bytes:
    """One page of products in id order, with the cursor of the next page."""
    rows = await storage.fetch_page(pool, after=after, limit=limit + 1)
    has_more = len(rows) > limit
    rows = rows[:limit]
    page = {
        "items": [product_document(row) for row in rows],
        "next": rows[-1]["id"] if has_more else None,
    }
    return serialize(page)


async def put_product(
    *,
    pool: asyncpg.Pool,
    cache: ProductCache,
    product_id: int,
    data: ProductIn,
    inventory: Inventory | None = None,
) -> tuple[ProductBody, bool]:
    """Create or replace a product; caches everywhere drop the old body at once.

    `stock` restarts the inventory invariant (units_on_sale = stock + units held
    by orders), and the Redis gate of the product is rewritten from Postgres.
    """
    async with pool.acquire() as conn, conn.transaction():
        try:
            await storage.lock_product(conn, product_id)
            row = await storage.upsert_product(conn, product_id, data)
        except asyncpg.UniqueViolationError:
            raise Conflict(f"sku {data.sku!r} belongs to another product") from None
    if inventory is not None:
        try:
            await load_products(inventory, [product_id], replace=True)
        except RedisError as exc:
            # The reconciler rewrites the gate from Postgres on its next run.
            log_failure(log, "gate reload failed", exc, {"product_id": product_id})
        await announce_stock_restored(inventory, [product_id])
    else:
        try:
            await cache.invalidate(product_id)
        except RedisError as exc:
            # The write is committed; a stale cached body expires with its TTL.
            log_failure(log, "cache invalidation failed", exc, {"product_id": product_id})
    body = serialize(product_document(row))
    return ProductBody(body, entity_tag(body)), bool(row["created"])
