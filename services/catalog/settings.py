"""Catalog settings (SHOPSTACK_CATALOG_* for its own knobs)."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from services.common.settings import CommonSettings, Environment


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

    # Orders and inventory (docs/flash-sale.md).
    catalog_reservation_ttl_s: float = Field(
        default=900.0, gt=0, le=7 * 86_400, description="unpaid reservations expire after this"
    )
    catalog_hold_ttl_s: float = Field(
        default=600.0, gt=0, le=86_400, description="a payment's hold on an order lapses after this"
    )
    catalog_idempotency_ttl_s: float = Field(
        default=86_400.0,
        gt=0,
        le=30 * 86_400,
        description="Idempotency-Key records are kept this long (API.md: at least 24 h)",
    )
    catalog_idempotency_lock_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="an unfinished key may be taken over by a retry after this (same order id)",
    )
    catalog_sold_out_ttl_s: float = Field(
        default=1.0,
        ge=0,
        le=60,
        description="life of the in-process sold-out flag (0: off); pub/sub clears it on restock",
    )
    catalog_jobs_enabled: bool = Field(
        default=True, description="run the expiry sweeper and the reconciler in this process"
    )
    catalog_sweep_interval_s: float = Field(
        default=1.0, gt=0, le=3600, description="expiry sweeper cadence"
    )
    catalog_sweep_batch: int = Field(
        default=500, ge=1, le=10_000, description="reservations expired per sweeper transaction"
    )
    catalog_reconcile_interval_s: float = Field(
        default=10.0, gt=0, le=3600, description="reconciler cadence (invariant check, gate repair)"
    )
    catalog_gate_pending_grace_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="a gate admission not in Postgres after this is dead and is undone",
    )
    catalog_gate_tombstone_ttl_s: int = Field(
        default=86_400,
        ge=60,
        le=30 * 86_400,
        description="how long the gate remembers released or undone reservation ids",
    )
    catalog_fault_crash_after_gate: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description=(
            "TEST ONLY: chance a worker os._exit()s between the Lua gate and the commit "
            "(refused in prod)"
        ),
    )

    @model_validator(mode="after")
    def _no_faults_in_prod(self) -> CatalogSettings:
        if self.catalog_fault_crash_after_gate > 0 and self.env is Environment.PROD:
            raise ValueError(
                "SHOPSTACK_CATALOG_FAULT_CRASH_AFTER_GATE is a test hook, not for prod"
            )
        return self
