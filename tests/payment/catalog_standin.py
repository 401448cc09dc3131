"""A test-only stand-in for the catalog's internal order API (a real HTTP server).

It implements the contract of docs/internal-api.md over an in-memory dict, so
payment's tests control orders (status, holds, outages) directly:

- GET  /internal/v1/orders/{id}            200 order | 404
- POST /internal/v1/orders/{id}/hold       {"payment_id", "user_id"?}: 200 order; 404 when
  user_id is given and does not own it; idempotent for the same payment; 409
  order-not-payable if not reserved or held by another payment (a hold lapses after 10 min)
- POST /internal/v1/orders/{id}/paid       {"payment_id"}: 200 (idempotent); 409 otherwise
- POST /internal/v1/orders/{id}/release    {"payment_id"}: 200, drops that payment's hold
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiohttp import web

HOLD_LAPSE_S = 600.0


def problem(status: int, code: str, detail: str) -> web.Response:
    body = {"type": f"/problems/{code}", "title": code, "status": status, "detail": detail}
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/problem+json"
    )


@dataclass
class StandInOrder:
    id: uuid.UUID
    user_id: str
    amount_cents: int
    currency: str = "EUR"
    product_id: int = 1
    quantity: int = 1
    status: str = "reserved"
    held_by: uuid.UUID | None = None
    held_until: float = 0.0
    paid_by: uuid.UUID | None = None
    expires_at: datetime = field(default_factory=lambda: datetime.now(UTC) + timedelta(minutes=15))

    def document(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "user_id": self.user_id,
            "status": self.status,
            "product_id": self.product_id,
            "quantity": self.quantity,
            "amount_cents": self.amount_cents,
            "currency": self.currency,
            "expires_at": self.expires_at.isoformat().replace("+00:00", "Z"),
            "held_by": self._holder(),
        }

    def hold_active(self) -> bool:
        return self.held_by is not None and time.monotonic() < self.held_until

    def past_expiry(self) -> bool:
        return datetime.now(UTC) >= self.expires_at

    def _holder(self) -> str | None:
        if self.status == "paid" and self.paid_by is not None:
            return str(self.paid_by)  # the payment that paid it
        return str(self.held_by) if self.held_by and self.hold_active() else None


class CatalogStandIn:
    """The server, its orders, and counters of the calls it received."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.orders: dict[uuid.UUID, StandInOrder] = {}
        self.calls: list[tuple[str, uuid.UUID, uuid.UUID | None]] = []
        self._runner: web.AppRunner | None = None

    # -- test helpers ---------------------------------------------------------------

    def add_order(
        self,
        user_id: str,
        *,
        amount_cents: int = 1999,
        currency: str = "EUR",
        status: str = "reserved",
    ) -> StandInOrder:
        order = StandInOrder(uuid.uuid4(), user_id, amount_cents, currency, status=status)
        self.orders[order.id] = order
        return order

    def count(self, action: str, order_id: uuid.UUID) -> int:
        return sum(1 for a, o, _ in self.calls if a == action and o == order_id)

    @property
    def is_up(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_get("/internal/v1/orders/{id}", self._get)
        app.router.add_post("/internal/v1/orders/{id}/{action}", self._action)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self._runner = runner

    async def stop(self) -> None:
        """An outage: the port stops answering (connections are refused)."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- handlers -------------------------------------------------------------------

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _order(self, request: web.Request) -> StandInOrder | None:
        try:
            return self.orders.get(uuid.UUID(request.match_info["id"]))
        except ValueError:
            return None

    async def _get(self, request: web.Request) -> web.Response:
        order = self._order(request)
        if order is None:
            return problem(404, "not-found", "order not found")
        self.calls.append(("get", order.id, None))
        return web.json_response(order.document())

    async def _action(self, request: web.Request) -> web.Response:
        action = request.match_info["action"]
        if action not in ("hold", "paid", "release"):
            return problem(404, "not-found", "no such action")
        try:
            doc = orjson.loads(await request.read())
            payment_id = uuid.UUID(doc["payment_id"])
            allowed = {"payment_id", "user_id"} if action == "hold" else {"payment_id"}
            if not set(doc) <= allowed:
                raise ValueError("unknown fields")
            user_id = doc.get("user_id")
            if user_id is not None and not isinstance(user_id, str):
                raise ValueError("user_id must be a string")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return problem(422, "validation-error", 'body must be {"payment_id": uuid}')
        order = self._order(request)
        if order is None or (user_id is not None and order.user_id != user_id):
            return problem(404, "not-found", "order not found")
        self.calls.append((action, order.id, payment_id))
        if action == "hold":
            return self._hold(order, payment_id)
        if action == "paid":
            return self._paid(order, payment_id)
        if order.held_by == payment_id:
            order.held_by = None
        return web.json_response(order.document())

    def _hold(self, order: StandInOrder, payment_id: uuid.UUID) -> web.Response:
        if order.status == "paid" and order.paid_by == payment_id:
            return web.json_response(order.document())  # a retried hold after success
        if order.status != "reserved":
            return problem(409, "order-not-payable", f"order is {order.status}")
        if order.hold_active() and order.held_by != payment_id:
            return problem(409, "order-not-payable", "order is held by another payment")
        if order.past_expiry() and order.held_by != payment_id:
            return problem(409, "order-not-payable", "order is about to expire")
        order.held_by = payment_id
        order.held_until = time.monotonic() + HOLD_LAPSE_S
        return web.json_response(order.document())

    def _paid(self, order: StandInOrder, payment_id: uuid.UUID) -> web.Response:
        if order.status == "paid" and order.paid_by == payment_id:
            return web.json_response(order.document())
        if order.status != "reserved":
            return problem(409, "order-not-payable", f"order is {order.status}")
        mine = order.held_by == payment_id  # even if the hold lapsed: units still reserved
        unheld = not order.hold_active() and not order.past_expiry()
        if not (mine or unheld):
            return problem(409, "order-not-payable", "order is held by another payment")
        order.status = "paid"
        order.paid_by = payment_id
        order.held_by = None
        return web.json_response(order.document())
