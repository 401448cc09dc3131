"""Catalog settings (SHOPSTACK_CATALOG_* for its own knobs)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from services.common.settings import CommonSettings


class CatalogSettings(CommonSettings):
    service_name: ClassVar[str] = "catalog"

    catalog_cache_ttl_s: int = Field(
        default=30, ge=1, le=3600, description="life of a cached product body in Redis"
    )
    catalog_negative_cache_ttl_s: int = Field(
        default=5, ge=1, le=300, description="life of a cached 'no such product' in Redis"
    )
    catalog_page_max: int = Field(
        default=200, ge=1, le=1000, description="largest page of the product list"
    )
