from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from services.catalog.app import create_app
from services.catalog.settings import CatalogSettings
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
