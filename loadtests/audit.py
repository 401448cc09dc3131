"""Correctness audit after every run: a fast run that broke an invariant is a failed run.

Each check reads Postgres (and the API where that is the claim) and ends
`passed`, `failed`, or `not-available` when what it needs does not exist on
this stack (a table that no migration created yet, a route that answers 404):
"not available" is never reported as "passed". Tables are found by name and
columns, so the audit follows the schema rather than pinning it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import asyncpg
import httpx

Status = Literal["passed", "failed", "not-available"]
HELD = ("reserved", "paid")
ON_SALE_COLUMNS = ("initial_stock", "units_on_sale", "total_stock", "stock_total", "on_sale")
CALLBACK_TABLE_HINTS = ("webhook", "callback", "psp_event", "provider_event")
CALLBACK_ID_COLUMNS = ("event_id", "provider_event_id", "psp_event_id", "id")
STATS_TABLES = ("events", "stats_events", "user_events", "behaviour_events", "behavior_events")
STATS_WAIT_S = 5.0
SHOWN = 10


@dataclass
class Check:
    name: str
    status: Status
    detail: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ledger:
    """What the run did that the audit must find in the database."""

    callback_prefixes: list[str] = field(default_factory=list)
    callbacks_sent: int = 0  # requests written (some replies are lost when a tool stops)
    callbacks_processed: int = 0  # "processed" replies the clients saw
    callbacks_reprocessed: int = 0  # "processed" again for an event already processed
    callbacks_available: bool = False
    stats_accepted: list[str] = field(default_factory=list)
    stats_available: bool = False
    product_ids: list[int] = field(default_factory=list)


@dataclass
class AuditResult:
    checks: list[Check]

    @property
    def failed(self) -> bool:
        return any(c.status == "failed" for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": "failed" if self.failed else "passed",
            "checks": [asdict(c) for c in self.checks],
        }


Schema = dict[str, dict[str, str]]


def ident(name: str) -> str:
    """Quote a table or column name read from information_schema (never from input)."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"unexpected identifier {name!r}")
    return f'"{name}"'


async def schema(conn: asyncpg.Connection) -> Schema:
    """table -> {column: data type} for the current schema."""
    rows = await conn.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema()"
    )
    out: Schema = {}
    for row in rows:
        out.setdefault(row["table_name"], {})[row["column_name"]] = row["data_type"]
    return out


def orders_table(tables: Schema) -> str | None:
    need = {"product_id", "quantity", "status"}
    names = ["orders", *sorted(t for t in tables if "order" in t and t != "orders")]
    return next((t for t in names if t in tables and need <= set(tables[t])), None)


def payments_table(tables: Schema) -> str | None:
    names = ["payments", *sorted(t for t in tables if "payment" in t and t != "payments")]
    return next(
        (t for t in names if t in tables and {"order_id", "status"} <= set(tables[t])), None
    )


def callbacks_table(tables: Schema) -> tuple[str, str] | None:
    for table in sorted(tables):
        if any(hint in table for hint in CALLBACK_TABLE_HINTS):
            for column in CALLBACK_ID_COLUMNS:
                if column in tables[table] and tables[table][column] in (
                    "text",
                    "character varying",
                ):
                    return table, column
    return None


def stats_table(tables: Schema) -> str | None:
    for table in STATS_TABLES:
        cols = tables.get(table, {})
        if cols.get("event_id") == "uuid" and "product_id" in cols:
            return table
    return None


def on_sale_column(tables: Schema) -> str | None:
    return next((c for c in ON_SALE_COLUMNS if c in tables.get("products", {})), None)


async def stock_rows(conn: asyncpg.Connection, tables: Schema) -> dict[int, dict[str, int]]:
    """Per product: stock, held units (reserved or paid), units on sale if the schema says."""
    orders = orders_table(tables)
    on_sale = on_sale_column(tables)
    held_sql = "0"
    if orders:
        held_sql = (
            f"(SELECT coalesce(sum(o.quantity), 0) FROM {ident(orders)} o "  # noqa: S608
            "WHERE o.product_id = p.id AND o.status = ANY($1::text[]))"
        )
    on_sale_sql = f"p.{ident(on_sale)}" if on_sale else "NULL"
    sql = (
        f"SELECT p.id, p.stock, {held_sql} AS held, "  # noqa: S608
        f"{on_sale_sql} AS on_sale FROM products p"
    )
    rows = await conn.fetch(sql, list(HELD)) if orders else await conn.fetch(sql)
    return {
        int(r["id"]): {
            "stock": int(r["stock"]),
            "held": int(r["held"]),
            **({"on_sale": int(r["on_sale"])} if r["on_sale"] is not None else {}),
        }
        for r in rows
    }


async def snapshot(conn: asyncpg.Connection) -> dict[int, dict[str, int]]:
    """The baseline taken before the load: what `stock + held` must still be afterwards."""
    tables = await schema(conn)
    if "products" not in tables:
        return {}
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        return await stock_rows(conn, tables)


def _first(items: list[Any]) -> list[Any]:
    return items[:SHOWN]


async def check_stock(
    conn: asyncpg.Connection, tables: Schema, baseline: dict[int, dict[str, int]]
) -> list[Check]:
    if "products" not in tables:
        na = "no products table"
        return [Check(n, "not-available", na) for n in ("stock-invariant", "sold-within-on-sale")]
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        now = await stock_rows(conn, tables)
    negative = sorted(pid for pid, r in now.items() if r["stock"] < 0)
    orders = orders_table(tables)
    if orders is None:
        return [
            Check(
                "stock-invariant",
                "failed" if negative else "not-available",
                f"products with negative stock: {_first(negative)}"
                if negative
                else "no orders table (product_id, quantity, status) on this stack",
            ),
            Check("sold-within-on-sale", "not-available", "no orders table on this stack"),
        ]
    broken: list[dict[str, int]] = []
    oversold: list[dict[str, int]] = []
    for pid, row in sorted(now.items()):
        before = baseline.get(pid)
        if "on_sale" in row:
            expected = row["on_sale"]
        elif before is not None:
            expected = before["stock"] + before["held"]
        else:
            continue  # created during the run with no record of its units on sale
        if row["stock"] + row["held"] != expected:
            broken.append({"product_id": pid, **row, "expected": expected})
        if row["held"] > expected:
            oversold.append({"product_id": pid, "sold": row["held"], "on_sale": expected})
    basis = (
        f"column products.{on_sale_column(tables)}"
        if on_sale_column(tables)
        else "stock + held units before the run"
    )
    invariant = Check(
        "stock-invariant",
        "failed" if broken or negative else "passed",
        (
            f"{len(broken)} products where stock + reserved/paid units != units on sale "
            f"({basis}); negative stock: {len(negative)}"
            if broken or negative
            else f"stock + reserved/paid units == units on sale for {len(now)} products ({basis})"
        ),
        {"broken": _first(broken), "negative": _first(negative)},
    )
    sold = Check(
        "sold-within-on-sale",
        "failed" if oversold else "passed",
        f"{len(oversold)} products sold more units than were on sale"
        if oversold
        else "no product sold more units than it had on sale",
        {"oversold": _first(oversold)},
    )
    return [invariant, sold]


async def check_double_charge(conn: asyncpg.Connection, tables: Schema) -> Check:
    payments = payments_table(tables)
    if payments is None:
        return Check("no-double-charge", "not-available", "no payments table on this stack")
    table = ident(payments)
    rows = await conn.fetch(
        f"SELECT order_id::text AS order_id, count(*) AS n FROM {table} "  # noqa: S608
        "WHERE status = 'succeeded' GROUP BY order_id HAVING count(*) > 1"
    )
    total = await conn.fetchval(
        f"SELECT count(*) FROM {table} WHERE status = 'succeeded'"  # noqa: S608
    )
    twice = [{"order_id": r["order_id"], "succeeded_payments": int(r["n"])} for r in rows]
    return Check(
        "no-double-charge",
        "failed" if twice else "passed",
        f"{len(twice)} orders charged more than once"
        if twice
        else f"{total} succeeded payments, none for an order already paid",
        {"orders": _first(twice)},
    )


async def check_callbacks(conn: asyncpg.Connection, tables: Schema, ledger: Ledger) -> Check:
    name = "callbacks-applied-once"
    if not ledger.callbacks_available or not ledger.callback_prefixes:
        return Check(name, "not-available", "the callback endpoint is not on this stack")
    found = callbacks_table(tables)
    if found is None:
        return Check(name, "not-available", "no table of received provider events found")
    table, column = found
    col = ident(column)
    rows = await conn.fetch(
        f"SELECT {col} AS id, count(*) AS n FROM {ident(table)} "  # noqa: S608
        f"WHERE {col} LIKE ANY($1::text[]) GROUP BY {col}",
        [f"{p}%" for p in ledger.callback_prefixes],
    )
    repeated = [{"event_id": r["id"], "rows": int(r["n"])} for r in rows if r["n"] > 1]
    stored = len(rows)
    processed, sent = ledger.callbacks_processed, ledger.callbacks_sent
    # Every "processed" reply must be durable; nothing is stored that was never sent; an
    # event already processed must never be "processed" again.
    problems = []
    if repeated:
        problems.append(f"{len(repeated)} events stored more than once")
    if stored < processed:
        problems.append(f'{processed - stored} "processed" replies with no stored event')
    if sent and stored > sent:
        problems.append(f"{stored - sent} more events stored than were sent")
    if ledger.callbacks_reprocessed:
        problems.append(
            f'{ledger.callbacks_reprocessed} repeats of a processed event answered "processed"'
        )
    summary = (
        f'{stored} distinct events stored in {table}.{column}; {processed} replies "processed" '
        f"out of {sent} sent (replies in flight when a tool stops are never read)"
    )
    return Check(
        name,
        "failed" if problems else "passed",
        "; ".join([*problems, summary]),
        {
            "repeated": _first(repeated),
            "stored": stored,
            "processed": processed,
            "sent": sent,
            "reprocessed": ledger.callbacks_reprocessed,
        },
    )


async def check_stats(conn: asyncpg.Connection, tables: Schema, ledger: Ledger) -> Check:
    name = "stats-events-stored"
    if not ledger.stats_available:
        return Check(name, "not-available", "POST /api/v1/events is not on this stack")
    table = stats_table(tables)
    if table is None:
        return Check(name, "not-available", "no events table (uuid event_id) on this stack")
    if not ledger.stats_accepted:
        return Check(name, "not-available", "the stack accepted no probe events")
    began = time.monotonic()
    while True:
        rows = await conn.fetch(
            f"SELECT event_id::text AS id, count(*) AS n FROM {ident(table)} "  # noqa: S608
            "WHERE event_id = ANY($1::uuid[]) GROUP BY event_id",
            ledger.stats_accepted,
        )
        counts = {r["id"]: int(r["n"]) for r in rows}
        missing = [e for e in ledger.stats_accepted if e not in counts]
        if not missing or time.monotonic() - began > STATS_WAIT_S:
            break
        await asyncio.sleep(0.25)
    twice = [e for e, n in counts.items() if n > 1]
    waited = time.monotonic() - began
    return Check(
        name,
        "failed" if missing or twice else "passed",
        f"{len(ledger.stats_accepted) - len(missing)}/{len(ledger.stats_accepted)} accepted "
        f"events stored ({len(twice)} more than once) after waiting {waited:.1f} s",
        {"missing": _first(missing), "duplicated": _first(twice)},
    )


async def check_api_stock(base_url: str, conn: asyncpg.Connection, ledger: Ledger) -> Check:
    """The stock the API shows equals Postgres once caches had their second to catch up."""
    name = "api-stock-matches-db"
    if not ledger.product_ids:
        return Check(name, "not-available", "no products to compare")
    mismatched: list[dict[str, int]] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as http:
        for attempt in range(3):
            await asyncio.sleep(1.2)
            db = {
                int(r["id"]): int(r["stock"])
                for r in await conn.fetch(
                    "SELECT id, stock FROM products WHERE id = ANY($1::bigint[])",
                    ledger.product_ids,
                )
            }
            mismatched = []
            for pid, stock in db.items():
                resp = await http.get(f"/api/v1/products/{pid}")
                if resp.status_code == 200 and int(resp.json()["stock"]) != stock:
                    mismatched.append(
                        {"product_id": pid, "api": int(resp.json()["stock"]), "db": stock}
                    )
            if not mismatched or attempt == 2:
                break
    return Check(
        name,
        "failed" if mismatched else "passed",
        f"{len(mismatched)} products show a stock other than Postgres' after 3 tries"
        if mismatched
        else f"API stock equals Postgres for {len(ledger.product_ids)} products",
        {"mismatched": _first(mismatched)},
    )


async def run_audit(
    database_url: str | None,
    baseline: dict[int, dict[str, int]],
    ledger: Ledger,
    base_url: str | None = None,
) -> AuditResult:
    """Every check; a database that cannot be reached makes them all not-available."""
    names = [
        "stock-invariant",
        "sold-within-on-sale",
        "no-double-charge",
        "callbacks-applied-once",
        "stats-events-stored",
    ]
    if not database_url:
        why = "no database URL (set SHOPSTACK_DATABASE_URL or --database-url)"
        return AuditResult([Check(n, "not-available", why) for n in names])
    try:
        conn = await asyncpg.connect(database_url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        return AuditResult([Check(n, "not-available", f"database: {exc}") for n in names])
    try:
        tables = await schema(conn)
        checks = await check_stock(conn, tables, baseline)
        checks.append(await check_double_charge(conn, tables))
        checks.append(await check_callbacks(conn, tables, ledger))
        checks.append(await check_stats(conn, tables, ledger))
        if base_url is not None and "products" in tables:
            checks.append(await check_api_stock(base_url, conn, ledger))
    finally:
        await conn.close()
    return AuditResult(checks)
