"""The state one `shopstack loadtest` run shares between its scenarios."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from loadtests import audit, prepare, workload
from loadtests.processes import ProcessGroup
from loadtests.sampler import Sampler
from loadtests.tools import CpuPlan, PinMode

DEFAULT_TARGET = "http://127.0.0.1:8000"
SCENARIO_NAMES = (
    "product-detail",
    "payment",
    "payment-status",
    "login",
    "callbacks",
    "callbacks-unique",
)


@dataclass
class Options:
    """Everything the command line can set; the defaults make a ~3.5 minute run."""

    target: str = DEFAULT_TARGET
    scenarios: tuple[str, ...] = SCENARIO_NAMES
    duration_s: float = 5.0
    warmup_s: float = 2.0
    repeats: int = 3
    open_duration_s: float = 5.0
    open_fraction: float = 0.6
    rates: dict[str, float] = field(default_factory=dict)  # scenario (or "*") -> requests/s
    users: int = 100  # demo users the login scenario cycles through
    token_users: int = 100  # demo users whose orders the payment scenario pays
    product_ids: int = workload.FLASH_SALE_IDS  # 10: the flash-sale set; 1000: the long tail
    connections: dict[str, int] = field(default_factory=dict)
    calibration: bool = True
    calibration_duration_s: float = 1.0
    pin: PinMode = "auto"
    database_url: str | None = None
    redis_url: str | None = None
    out_dir: Path = Path("loadtests/reports")
    max_pairs: int = 20_000

    @property
    def gateway_port(self) -> int:
        parts = urlsplit(self.target)
        return parts.port or (443 if parts.scheme == "https" else 80)


@dataclass
class Session:
    options: Options
    plan: CpuPlan
    workdir: Path
    groups: dict[str, ProcessGroup]
    sampler: Sampler | None = None
    ledger: audit.Ledger = field(default_factory=audit.Ledger)
    users: prepare.Users | None = None
    product_ready: bool = False
    refs: list[workload.PaymentRef] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=dict)

    def tokens(self) -> prepare.Users:
        """Demo users' tokens, logged in once per run."""
        if self.users is None:
            self.users = asyncio.run(
                prepare.login_users(self.options.target, self.options.token_users)
            )
        return self.users

    def ensure_product(self) -> None:
        """The dedicated load-test product, its stock reset (created once per run)."""
        if not self.product_ready:
            asyncio.run(prepare.ensure_product(self.options.target))
            self.product_ready = True
            if prepare.LOADTEST_PRODUCT_ID not in self.ledger.product_ids:
                self.ledger.product_ids.append(prepare.LOADTEST_PRODUCT_ID)

    def generator_ceiling(self, close: bool) -> float | None:
        gen = self.calibration.get("generator", {}).get("close" if close else "keepalive")
        if not gen or not gen.get("sustained_rps"):
            return None
        return float(gen["sustained_rps"])


async def lookup_charge_ids(database_url: str | None, payment_ids: list[str]) -> dict[str, str]:
    """Provider charge ids of payments, when the payments table records them."""
    if not database_url or not payment_ids:
        return {}
    try:
        conn = await asyncpg.connect(database_url, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return {}
    try:
        tables = await audit.schema(conn)
        table = audit.payments_table(tables)
        if table is None or "id" not in tables[table]:
            return {}
        column = next(
            (
                c
                for c in ("provider_charge_id", "charge_id", "psp_charge_id", "provider_id")
                if c in tables[table]
            ),
            None,
        )
        if column is None:
            return {}
        rows = await conn.fetch(
            f"SELECT id::text AS id, {audit.ident(column)}::text AS charge "  # noqa: S608
            f"FROM {audit.ident(table)} WHERE id::text = ANY($1::text[])",
            payment_ids,
        )
        return {r["id"]: r["charge"] for r in rows if r["charge"]}
    finally:
        await conn.close()
