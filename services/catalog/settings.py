"""Catalog settings (SHOPSTACK_CATALOG_* for its own knobs)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import CommonSettings, Environment


class CatalogSettings(CommonSettings):
    service_name: ClassVar[str] = "catalog"

    catalog_cache_ttl_s: int = Field(default=30, ge=1, le=3600)
    catalog_negative_cache_ttl_s: int = Field(default=5, ge=1, le=300)
    catalog_page_max: int = Field(default=200, ge=1, le=1000)

    # Orders and inventory.
    catalog_reservation_ttl_s: float = Field(default=900.0, gt=0, le=7 * 86_400)
    catalog_hold_ttl_s: float = Field(default=600.0, gt=0, le=86_400)
    # Keys are kept at least this long (API.md: at least 24 h; tests may shorten it).
    catalog_idempotency_ttl_s: float = Field(default=86_400.0, gt=0, le=30 * 86_400)
    # A key whose first request has not finished after this long may be taken over
    # by a retry (the first worker died); the retry reuses the same order id.
    catalog_idempotency_lock_s: float = Field(default=30.0, gt=0, le=3600)
    catalog_sold_out_ttl_s: float = Field(default=1.0, ge=0, le=60)
    catalog_jobs_enabled: bool = True
    catalog_sweep_interval_s: float = Field(default=1.0, gt=0, le=3600)
    catalog_sweep_batch: int = Field(default=500, ge=1, le=10_000)
    catalog_reconcile_interval_s: float = Field(default=10.0, gt=0, le=3600)
    # A gate admission with no order in Postgres after this long is dead (its
    # worker crashed between the gate and the commit) and is undone.
    catalog_gate_pending_grace_s: float = Field(default=30.0, gt=0, le=3600)
    catalog_gate_tombstone_ttl_s: int = Field(default=86_400, ge=60, le=30 * 86_400)
    # Test-only fault hook: probability that a worker os._exit()s right after the
    # Lua gate admitted a buy and before Postgres commits it. Refused in prod.
    catalog_fault_crash_after_gate: float = Field(default=0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _no_faults_in_prod(self) -> CatalogSettings:
        if self.catalog_fault_crash_after_gate > 0 and self.env is Environment.PROD:
            raise ValueError(
                "SHOPSTACK_CATALOG_FAULT_CRASH_AFTER_GATE is a test hook, not for prod"
            )
        return self
