from __future__ import annotations

import itertools
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from services.catalog import domain
from services.catalog.app import create_app
from services.catalog.inventory import Inventory, ensure_gate
from services.catalog.schemas import ProductIn
from services.catalog.settings import CatalogSettings
from services.catalog.state import CatalogState
from services.common.state import open_data_state
from tests.support.asgi import client_for

ADMIN = {"X-User-Id": "1", "X-User-Role": "admin"}
USER = {"X-User-Id": "2", "X-User-Role": "user"}


def product_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "sku": "TEST-1",
        "name": "Test product",
        "description": "for tests",
        "price_cents": 1999,
        "currency": "EUR",
        "stock": 10,
        "flash_sale": None,
    }
    body.update(overrides)
    return body


@pytest.fixture
async def catalog(settings_kwargs: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(CatalogSettings(**settings_kwargs))
    async with client_for(app) as client:
        yield client


# --- orders -------------------------------------------------------------------

_product_ids = itertools.count(200_000)
_users = itertools.count(1)


def new_product_id() -> int:
    return next(_product_ids)


def new_user() -> dict[str, str]:
    """Headers of a fresh user, as the gateway would forward them."""
    return {"X-User-Id": f"user-{next(_users)}-{uuid.uuid4().hex[:6]}", "X-User-Role": "user"}


OPEN_SALE = {
    "price_cents": 500,
    "starts_at": "2020-01-01T00:00:00Z",
    "ends_at": "2099-01-01T00:00:00Z",
    "per_user_limit": 2,
}


def order_settings(settings_kwargs: dict[str, Any], **overrides: Any) -> CatalogSettings:
    """Catalog settings for order tests: background jobs off (tests drive them)."""
    values: dict[str, Any] = {
        **settings_kwargs,
        "catalog_jobs_enabled": False,
        "catalog_sold_out_ttl_s": 30.0,
        "db_pool_max": 20,
        # Races run hundreds of gate calls at once: let them wait for a Redis connection.
        "redis_pool_max": 100,
        "redis_timeout_s": 5.0,
    }
    values.update(overrides)
    return CatalogSettings(**values)


@dataclass
class OrdersApp:
    """The catalog app in-process (jobs off), and the state its lifespan opened."""

    client: httpx.AsyncClient
    state: CatalogState

    @property
    def inv(self) -> Inventory:
        return self.state.inventory


@pytest.fixture
async def orders_app(settings_kwargs: dict[str, Any]) -> AsyncIterator[OrdersApp]:
    app = create_app(order_settings(settings_kwargs))
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app, client=("203.0.113.7", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield OrdersApp(client, manager._state["app_state"])


@asynccontextmanager
async def open_inventory(settings_kwargs: dict[str, Any]) -> AsyncIterator[Inventory]:
    """The order path's dependencies without HTTP: pool (20), Redis, gate, flags."""
    settings = order_settings(settings_kwargs)
    async with open_data_state(settings) as base:
        state = CatalogState(base, settings)
        await ensure_gate(state.inventory, force=True)
        yield state.inventory


@pytest.fixture
async def inventory(settings_kwargs: dict[str, Any]) -> AsyncIterator[Inventory]:
    async with open_inventory(settings_kwargs) as inv:
        yield inv


async def create_product(
    inv: Inventory, *, stock: int, flash_sale: dict[str, Any] | None = None, price: int = 1999
) -> int:
    """A new product with `stock` units (through the domain, gate loaded)."""
    pid = new_product_id()
    data = ProductIn.model_validate(
        product_body(sku=f"SKU-O{pid}", stock=stock, flash_sale=flash_sale, price_cents=price)
    )
    await domain.put_product(
        pool=inv.pool, cache=inv.cache, product_id=pid, data=data, inventory=inv
    )
    return pid


async def assert_consistent(inv: Inventory, pid: int) -> dict[str, int]:
    """The invariant holds for `pid`, stock >= 0, and the gate agrees with Postgres."""
    async with inv.pool.acquire() as conn:
        row = await conn.fetchrow(
            """
            SELECT p.stock, p.units_on_sale,
                   coalesce((SELECT sum(quantity) FROM orders o WHERE o.product_id = p.id
                             AND o.status IN ('reserved', 'paid')), 0)::int AS held,
                   coalesce((SELECT sum(units) FROM order_limits l
                             WHERE l.product_id = p.id), 0)::int AS counted
            FROM products p WHERE p.id = $1
            """,
            pid,
        )
    assert row["stock"] >= 0
    assert row["units_on_sale"] == row["stock"] + row["held"], dict(row)
    assert row["counted"] == row["held"], dict(row)
    gate_stock = await inv.gate.loaded_stock(pid)
    assert gate_stock == row["stock"], (gate_stock, dict(row))
    return dict(row)
