"""INV-8: a Hypothesis state machine over the real order path (Postgres + Redis).

Rules: buy, cancel, pay, expire, restock (admin PUT), crash between gate and
commit, restart (Redis loses the gate; it is rebuilt from Postgres). After every
step: stock >= 0, units_on_sale == stock + units held, the per-user counters
match the orders, the gate agrees with Postgres, and every outcome is the one a
simple model predicts.
"""

from __future__ import annotations

import asyncio
import uuid
from contextlib import AsyncExitStack
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from services.catalog import domain, orders
from services.catalog.gate import now_ms
from services.catalog.inventory import Inventory, ensure_gate, reconcile
from services.catalog.jobs import sweep_once
from services.catalog.schemas import ProductIn
from services.catalog.state import CatalogState
from services.common.errors import LimitExceeded, SoldOut
from services.common.state import open_data_state
from tests.catalog.conftest import assert_consistent, new_product_id, order_settings, product_body

CAP = 3
USERS = ["ann", "bob", "cid"]
SALE = {
    "price_cents": 500,
    "starts_at": "2020-01-01T00:00:00Z",
    "ends_at": "2099-01-01T00:00:00Z",
    "per_user_limit": CAP,
}


class InventoryMachine(RuleBasedStateMachine):
    def __init__(self, settings_kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.stack = AsyncExitStack()
        self.settings = order_settings(
            settings_kwargs, catalog_gate_pending_grace_s=0.001, db_pool_max=4, db_pool_min=1
        )
        self.inv: Inventory = self.run(self._open())
        self.pid = new_product_id()
        self.users = [f"{name}-{uuid.uuid4().hex[:6]}" for name in USERS]
        self.stock = 0
        self.reserved: dict[uuid.UUID, tuple[str, int]] = {}
        self.paid: dict[uuid.UUID, tuple[str, int]] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    async def _open(self) -> Inventory:
        base = await self.stack.enter_async_context(open_data_state(self.settings))
        return CatalogState(base, self.settings).inventory

    def teardown(self) -> None:
        self.run(self.stack.aclose())
        self.loop.close()

    def held_by(self, user: str) -> int:
        return sum(q for u, q in [*self.reserved.values(), *self.paid.values()] if u == user)

    async def _put(self, stock: int) -> None:
        body = product_body(sku=f"SKU-M{self.pid}", stock=stock, flash_sale=SALE)
        await domain.put_product(
            pool=self.inv.pool,
            cache=self.inv.cache,
            product_id=self.pid,
            data=ProductIn.model_validate(body),
            inventory=self.inv,
        )

    @initialize(stock=st.integers(0, 12))
    def create(self, stock: int) -> None:
        self.run(self._put(stock))
        self.stock = stock

    @rule(who=st.integers(0, len(USERS) - 1), qty=st.integers(1, 4))
    def buy(self, who: int, qty: int) -> None:
        user = self.users[who]
        try:
            row = self.run(
                orders.place_order(inv=self.inv, user_id=user, product_id=self.pid, quantity=qty)
            )
        except SoldOut:
            assert self.stock < qty
            return
        except LimitExceeded:
            assert self.stock >= qty
            assert self.held_by(user) + qty > CAP
            return
        assert self.stock >= qty
        assert self.held_by(user) + qty <= CAP
        assert row["amount_cents"] == 500 * qty
        self.stock -= qty
        self.reserved[row["id"]] = (user, qty)

    @precondition(lambda self: self.reserved)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        order_id = data.draw(st.sampled_from(sorted(self.reserved)))
        user, qty = self.reserved.pop(order_id)
        row = self.run(orders.cancel_order(inv=self.inv, user_id=user, order_id=order_id))
        assert row["status"] == "cancelled"
        self.stock += qty
        again = self.run(orders.cancel_order(inv=self.inv, user_id=user, order_id=order_id))
        assert again["status"] == "cancelled"

    @precondition(lambda self: self.reserved)
    @rule(data=st.data())
    def pay(self, data: st.DataObject) -> None:
        order_id = data.draw(st.sampled_from(sorted(self.reserved)))
        row = self.run(
            orders.mark_order_paid(inv=self.inv, order_id=order_id, payment_id=uuid.uuid4())
        )
        assert row["status"] == "paid"
        self.paid[order_id] = self.reserved.pop(order_id)

    @precondition(lambda self: self.reserved)
    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        order_id = data.draw(st.sampled_from(sorted(self.reserved)))

        async def go() -> int:
            async with self.inv.pool.acquire() as conn:
                await conn.execute(
                    "UPDATE orders SET expires_at = now() - interval '1 second' WHERE id = $1",
                    order_id,
                )
            return await sweep_once(self.inv)

        assert self.run(go()) >= 1
        _, qty = self.reserved.pop(order_id)
        self.stock += qty

    @rule(stock=st.integers(0, 12))
    def restock(self, stock: int) -> None:
        self.run(self._put(stock))
        self.stock = stock

    @rule(who=st.integers(0, len(USERS) - 1), qty=st.integers(1, 4))
    def crash_between_gate_and_commit(self, who: int, qty: int) -> None:
        """A worker dies after the Lua gate, before Postgres: the reconciler undoes it."""

        async def go() -> None:
            await self.inv.gate.admit(
                product_id=self.pid,
                rid=str(uuid.uuid4()),
                user_id=self.users[who],
                quantity=qty,
                at_ms=now_ms(),
            )
            await asyncio.sleep(0.002)  # past the (test) grace
            await reconcile(self.inv)

        self.run(go())

    @rule()
    def restart(self) -> None:
        """Redis loses the gate (restart without persistence); a new worker rebuilds it."""

        async def go() -> None:
            keys = [f"gate:{self.pid}:{part}" for part in "purq"]
            await self.inv.redis.delete(*keys, "gate:meta")
            self.inv.flags.clear_all()
            assert await ensure_gate(self.inv)

        self.run(go())

    @invariant()
    def consistent(self) -> None:
        row = self.run(assert_consistent(self.inv, self.pid))
        assert row["stock"] == self.stock
        held = sum(q for _, q in [*self.reserved.values(), *self.paid.values()])
        assert row["held"] == held


@pytest.mark.slow
def test_inv8_stateful_inventory_model(settings_kwargs: dict[str, Any]) -> None:
    """INV-8: buy/cancel/pay/expire/restock/crash/restart keep the invariant after every step."""
    run_state_machine_as_test(
        lambda: InventoryMachine(settings_kwargs),
        settings=settings(
            max_examples=25,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
