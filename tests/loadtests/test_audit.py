"""The correctness audit catches broken invariants, in fresh databases of its own.

Each test builds the tables the audit reads (by name and columns, as the
services' migrations will) in a database created for it, breaks or keeps an
invariant, and checks the verdict. A missing table is "not-available", never
"passed".
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from loadtests.audit import Ledger, run_audit, snapshot
from tests.support.servers import create_database, drop_database

PRODUCTS = """
CREATE TABLE products (id bigint PRIMARY KEY, stock integer NOT NULL, sku text);
INSERT INTO products VALUES (1, 100, 'a'), (2, 100, 'b'), (900001, 1000, 'lt');
"""
ORDERS = """
CREATE TABLE orders (
    id uuid PRIMARY KEY, user_id bigint, product_id bigint, quantity integer, status text
);
"""
PAYMENTS = """
CREATE TABLE payments (id uuid PRIMARY KEY, order_id uuid, status text, amount_cents bigint);
"""
WEBHOOKS = "CREATE TABLE webhook_events (event_id text PRIMARY KEY, received_at timestamptz);"
WEBHOOKS_NO_KEY = "CREATE TABLE webhook_events (event_id text, received_at timestamptz);"
EVENTS = "CREATE TABLE events (event_id uuid PRIMARY KEY, product_id bigint, type text);"


@pytest.fixture
async def fresh_db(servers: tuple[str, str]) -> AsyncIterator[str]:
    dsn = await create_database(servers[0])
    yield dsn
    await drop_database(servers[0], dsn)


async def setup(dsn: str, *ddl: str) -> asyncpg.Connection:
    conn = await asyncpg.connect(dsn)
    for statement in ddl:
        await conn.execute(statement)
    return conn


async def reserve(
    conn: asyncpg.Connection, product_id: int, qty: int, *, honest: bool
) -> uuid.UUID:
    """An order; an honest one takes its units from stock in the same transaction."""
    order_id = uuid.uuid4()
    async with conn.transaction():
        if honest:
            await conn.execute(
                "UPDATE products SET stock = stock - $2 WHERE id = $1", product_id, qty
            )
        await conn.execute(
            "INSERT INTO orders VALUES ($1, 1, $2, $3, 'reserved')", order_id, product_id, qty
        )
    return order_id


def by_name(result: object) -> dict[str, str]:
    return {c.name: c.status for c in result.checks}  # type: ignore[attr-defined]


async def test_honest_sales_pass(fresh_db: str) -> None:
    conn = await setup(fresh_db, PRODUCTS, ORDERS, PAYMENTS)
    try:
        await reserve(conn, 1, 60, honest=True)  # before the run
        baseline = await snapshot(conn)
        for _ in range(40):
            await reserve(conn, 1, 1, honest=True)
        paid = await reserve(conn, 2, 3, honest=True)
        await conn.execute("UPDATE orders SET status = 'paid' WHERE id = $1", paid)
        await conn.execute(
            "INSERT INTO payments VALUES ($1, $2, 'succeeded', 10)", uuid.uuid4(), paid
        )
    finally:
        await conn.close()
    result = await run_audit(fresh_db, baseline, Ledger())
    status = by_name(result)
    assert status["stock-invariant"] == "passed"
    assert status["sold-within-on-sale"] == "passed"
    assert status["no-double-charge"] == "passed"
    assert not result.failed


async def test_units_sold_beyond_units_on_sale_fail_the_audit(fresh_db: str) -> None:
    """The deliberately broken invariant: 150 units sold of 100 put on sale."""
    conn = await setup(fresh_db, PRODUCTS, ORDERS)
    try:
        baseline = await snapshot(conn)
        for _ in range(100):
            await reserve(conn, 1, 1, honest=True)
        for _ in range(50):  # an oversell bug: orders without stock behind them
            await reserve(conn, 1, 1, honest=False)
    finally:
        await conn.close()
    result = await run_audit(fresh_db, baseline, Ledger())
    checks = {c.name: c for c in result.checks}
    assert result.failed
    assert checks["stock-invariant"].status == "failed"
    assert checks["stock-invariant"].data["broken"][0]["product_id"] == 1
    assert checks["sold-within-on-sale"].status == "failed"
    assert checks["sold-within-on-sale"].data["oversold"] == [
        {"product_id": 1, "sold": 150, "on_sale": 100}
    ]
    assert result.to_dict()["status"] == "failed"


async def test_units_on_sale_column_is_the_reference_when_present(fresh_db: str) -> None:
    conn = await setup(
        fresh_db,
        PRODUCTS,
        ORDERS,
        "ALTER TABLE products ADD COLUMN initial_stock integer",
        "UPDATE products SET initial_stock = stock",
        "UPDATE products SET stock = 95 WHERE id = 2",  # 5 units gone, no order holds them
    )
    try:
        baseline = await snapshot(conn)
    finally:
        await conn.close()
    checks = {c.name: c for c in (await run_audit(fresh_db, baseline, Ledger())).checks}
    assert checks["stock-invariant"].status == "failed"
    assert checks["stock-invariant"].data["broken"] == [
        {"product_id": 2, "stock": 95, "held": 0, "on_sale": 100, "expected": 100}
    ]


async def test_an_order_charged_twice_fails(fresh_db: str) -> None:
    conn = await setup(fresh_db, PRODUCTS, ORDERS, PAYMENTS)
    try:
        baseline = await snapshot(conn)
        order = await reserve(conn, 1, 1, honest=True)
        for _ in range(2):
            await conn.execute(
                "INSERT INTO payments VALUES ($1, $2, 'succeeded', 10)", uuid.uuid4(), order
            )
    finally:
        await conn.close()
    checks = {c.name: c for c in (await run_audit(fresh_db, baseline, Ledger())).checks}
    assert checks["no-double-charge"].status == "failed"
    assert checks["no-double-charge"].data["orders"] == [
        {"order_id": str(order), "succeeded_payments": 2}
    ]


async def test_callbacks_applied_twice_or_lost_fail(fresh_db: str) -> None:
    conn = await setup(fresh_db, PRODUCTS, WEBHOOKS_NO_KEY)
    try:
        await conn.execute(
            "INSERT INTO webhook_events (event_id) VALUES ('evt_lt_x-1'), ('evt_lt_x-1'), "
            "('evt_lt_x-2'), ('evt_other-1')"
        )
        baseline = await snapshot(conn)
    finally:
        await conn.close()
    ledger = Ledger(
        callback_prefixes=["evt_lt_x"],
        callbacks_available=True,
        callbacks_sent=5,
        callbacks_processed=3,  # three "processed" replies, two distinct events stored
    )
    check = {c.name: c for c in (await run_audit(fresh_db, baseline, ledger)).checks}[
        "callbacks-applied-once"
    ]
    assert check.status == "failed"
    assert check.data["repeated"] == [{"event_id": "evt_lt_x-1", "rows": 2}]
    assert check.data["stored"] == 2
    assert '1 "processed" replies with no stored event' in check.detail


async def test_callbacks_each_stored_once_pass(fresh_db: str) -> None:
    conn = await setup(fresh_db, PRODUCTS, WEBHOOKS)
    try:
        await conn.executemany(
            "INSERT INTO webhook_events (event_id) VALUES ($1)",
            [(f"evt_lt_y-{n}",) for n in range(5)],
        )
        baseline = await snapshot(conn)
    finally:
        await conn.close()
    ledger = Ledger(
        callback_prefixes=["evt_lt_y"],
        callbacks_available=True,
        callbacks_sent=6,
        callbacks_processed=4,  # one reply was still in flight when the tool stopped
    )
    result = await run_audit(fresh_db, baseline, ledger)
    assert by_name(result)["callbacks-applied-once"] == "passed"


async def test_accepted_stats_event_missing_fails(fresh_db: str) -> None:
    conn = await setup(fresh_db, PRODUCTS, EVENTS)
    stored, lost = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        await conn.execute("INSERT INTO events VALUES ($1, 1, 'view')", uuid.UUID(stored))
        baseline = await snapshot(conn)
    finally:
        await conn.close()
    ledger = Ledger(stats_available=True, stats_accepted=[stored, lost])
    check = {c.name: c for c in (await run_audit(fresh_db, baseline, ledger)).checks}[
        "stats-events-stored"
    ]
    assert check.status == "failed"
    assert check.data["missing"] == [lost]


async def test_missing_tables_are_not_available_never_passed(fresh_db: str) -> None:
    conn = await setup(fresh_db, PRODUCTS)
    try:
        baseline = await snapshot(conn)
    finally:
        await conn.close()
    ledger = Ledger(
        callback_prefixes=["evt"],
        callbacks_available=True,
        stats_available=True,
        stats_accepted=[str(uuid.uuid4())],
    )
    result = await run_audit(fresh_db, baseline, ledger)
    status = by_name(result)
    for name in (
        "stock-invariant",
        "sold-within-on-sale",
        "no-double-charge",
        "callbacks-applied-once",
        "stats-events-stored",
    ):
        assert status[name] == "not-available", name
    assert not result.failed


async def test_negative_stock_fails_even_without_orders_table(fresh_db: str) -> None:
    conn = await setup(fresh_db, PRODUCTS)
    try:
        baseline = await snapshot(conn)
        await conn.execute("UPDATE products SET stock = -1 WHERE id = 1")
    finally:
        await conn.close()
    assert by_name(await run_audit(fresh_db, baseline, Ledger()))["stock-invariant"] == "failed"


async def test_no_database_means_not_available() -> None:
    result = await run_audit(None, {}, Ledger())
    assert {c.status for c in result.checks} == {"not-available"}
    assert not result.failed
