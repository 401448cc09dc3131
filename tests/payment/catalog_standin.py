"""A test-only stand-in for the catalog's internal order API (a real HTTP server).

It implements the contract of docs/internal-api.md over an in-memory dict, so
payment's tests control orders (status, holds, outages) directly:

- GET  /internal/v1/orders/{id}            200 order | 404
- POST /internal/v1/orders/{id}/hold       {"payment_id", "user_id"?}: 200 order; 404 when
  user_id is given and does not own it; idempotent for the same payment; 409
  order-not-payable if not reserved or held by another payment (a hold lapses after 10 min)
- POST /internal/v1/orders/{id}/paid       {"payment_id"}: 200 (idempotent); 409 otherwise
- POST /internal/v1/orders/{id}/release    {"payment_id"}: 200, drops that payment's hold
- POST /internal/v1/order-outcomes        {"items": [{kind, order_id, payment_id}]}: 200 with
  each item's answer as its own paid / release call would give it
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


Answer = tuple[int, dict[str, Any]]  # (status, order document or problem document)


def problem_doc(status: int, code: str, detail: str) -> Answer:
    return status, {"type": f"/problems/{code}", "title": code, "status": status, "detail": detail}


def problem(status: int, code: str, detail: str) -> web.Response:
    return respond(problem_doc(status, code, detail))


def respond(answer: Answer) -> web.Response:
    status, body = answer
    kind = "application/json" if status == 200 else "application/problem+json"
    return web.Response(body=orjson.dumps(body), status=status, content_type=kind)


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
        app.router.add_post("/internal/v1/order-outcomes", self._outcomes)
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
            return respond(self._hold(order, payment_id))
        if action == "paid":
            return respond(self._paid(order, payment_id))
        return respond(self._release(order, payment_id))

    async def _outcomes(self, request: web.Request) -> web.Response:
        """The batch: each item answered as its own paid / release call would be."""
        try:
            items = orjson.loads(await request.read())["items"]
            parsed = [
                (item["kind"], uuid.UUID(item["order_id"]), uuid.UUID(item["payment_id"]))
                for item in items
            ]
            if not parsed or any(kind not in ("paid", "release") for kind, _, _ in parsed):
                raise ValueError("bad kind")
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            return problem(422, "validation-error", "body must be {items: [...]}")
        results = []
        for kind, order_id, payment_id in parsed:
            order = self.orders.get(order_id)
            if order is None:
                status, doc = problem_doc(404, "not-found", "order not found")
            else:
                self.calls.append((kind, order.id, payment_id))
                step = self._paid if kind == "paid" else self._release
                status, doc = step(order, payment_id)
            results.append(
                {
                    "order_id": str(order_id),
                    "payment_id": str(payment_id),
                    "kind": kind,
                    "status": status,
                    "order": doc if status == 200 else None,
                    "problem": None if status == 200 else doc,
                }
            )
        return web.json_response({"results": results})

    def _hold(self, order: StandInOrder, payment_id: uuid.UUID) -> Answer:
        if order.status == "paid" and order.paid_by == payment_id:
            return 200, order.document()  # a retried hold after success
        if order.status != "reserved":
            return problem_doc(409, "order-not-payable", f"order is {order.status}")
        if order.hold_active() and order.held_by != payment_id:
            return problem_doc(409, "order-not-payable", "order is held by another payment")
        if order.past_expiry() and order.held_by != payment_id:
            return problem_doc(409, "order-not-payable", "order is about to expire")
        order.held_by = payment_id
        order.held_until = time.monotonic() + HOLD_LAPSE_S
        return 200, order.document()

    def _paid(self, order: StandInOrder, payment_id: uuid.UUID) -> Answer:
        if order.status == "paid" and order.paid_by == payment_id:
            return 200, order.document()
        if order.status != "reserved":
            return problem_doc(409, "order-not-payable", f"order is {order.status}")
        mine = order.held_by == payment_id  # even if the hold lapsed: units still reserved
        unheld = not order.hold_active() and not order.past_expiry()
        if not (mine or unheld):
            return problem_doc(409, "order-not-payable", "order is held by another payment")
        order.status = "paid"
        order.paid_by = payment_id
        order.held_by = None
        return 200, order.document()

    def _release(self, order: StandInOrder, payment_id: uuid.UUID) -> Answer:
        if order.held_by == payment_id:
            order.held_by = None
        return 200, order.document()
