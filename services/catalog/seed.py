"""Demo products: ids 1..N; ids 1..10 carry an open flash sale with 100 units each."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from services.catalog import storage

FLASH_SALE_IDS = range(1, 11)
FLASH_SALE_UNITS = 100
REGULAR_STOCK = 500


def demo_rows(count: int, now: datetime | None = None) -> list[tuple[Any, ...]]:
    """Deterministic demo products (prices vary, flash sales open for 30 days)."""
    start = (now or datetime.now(UTC)) - timedelta(hours=1)
    end = start + timedelta(days=30)
    rows: list[tuple[Any, ...]] = []
    for pid in range(1, count + 1):
        price = 499 + (pid * 7919) % 49_500
        on_sale = pid in FLASH_SALE_IDS
        rows.append(
            (
                pid,
                f"SKU-{pid:06d}",
                f"Demo product {pid}",
                f"A demo product for load tests and exploring the API (#{pid}).",
                price,
                "EUR",
                FLASH_SALE_UNITS if on_sale else REGULAR_STOCK,
                price // 2 if on_sale else None,
                start if on_sale else None,
                end if on_sale else None,
                2 if on_sale else None,
            )
        )
    return rows


async def seed_products(conn: asyncpg.Connection, count: int = 1000) -> int:
    """Insert the demo products that are missing; return how many were added."""
    return await storage.insert_products_if_absent(conn, demo_rows(count))
