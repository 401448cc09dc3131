"""The catalog's internal order API (never routed by the gateway).

POST /internal/v1/orders/{id}/hold and .../release with {"payment_id"} (hold also
takes the paying "user_id"), and POST /internal/v1/order-outcomes with a batch of
paid / release outcomes. Each is idempotent for one payment id, so every call here
may be repeated safely.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import aiohttp
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

log = logging.getLogger("shopstack.payment.catalog")

OrderStatus = Literal["reserved", "paid", "expired", "cancelled"]


class Order(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: uuid.UUID
    user_id: str
    status: OrderStatus
    product_id: int
    quantity: int
    amount_cents: int
    currency: str
    expires_at: datetime | None = None
    held_by: uuid.UUID | None = None


@dataclass(frozen=True)
class OutcomeResult:
    """The catalog's answer to one outcome: 200, or 404 / 409 with its problem (`reply`)."""

    status: int
    reply: str


class _OutcomeResultDoc(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: int
    problem: dict[str, Any] | None = None


class _OutcomeResults(BaseModel):
    model_config = ConfigDict(extra="ignore")

    results: list[_OutcomeResultDoc]


class CatalogUnavailable(Exception):
    """The catalog did not answer usefully (connection, timeout, 5xx)."""

    def __init__(self, message: str, *, reply: str = "") -> None:
        super().__init__(message)
        self.reply = reply


class CatalogRefused(Exception):
    """The catalog refused: 404, or 409 order-not-payable, or another 4xx."""

    def __init__(self, status: int, code: str, reply: str) -> None:
        super().__init__(f"catalog answered {status} {code}")
        self.status = status
        self.code = code
        self.reply = reply


class CatalogClient:
    """Pooled calls to the catalog with a timeout each; one resend on a dead pooled socket."""

    def __init__(self, *, base_url: str, timeout_s: float, pool_size: int) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(1.0, timeout_s))
        connector = aiohttp.TCPConnector(
            limit=pool_size, limit_per_host=pool_size, keepalive_timeout=4.0
        )
        self.session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        await self.session.close()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> bytes:
        data = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if body is not None else None
        for attempt in (1, 2):
            try:
                async with self.session.request(
                    method, self.base_url + path, data=data, headers=headers, timeout=self.timeout
                ) as resp:
                    payload = await resp.read()
                    if resp.status == 200:
                        return payload
                    reply = payload[:500].decode("utf-8", "replace")
                    if resp.status >= 500:
                        raise CatalogUnavailable(f"catalog answered {resp.status}", reply=reply)
                    raise CatalogRefused(resp.status, _problem_code(payload), reply)
            except aiohttp.ServerDisconnectedError as exc:
                # Every call here is idempotent, so a socket closed under us may be resent.
                if attempt == 1:
                    continue
                raise CatalogUnavailable("catalog closed the connection", reply=repr(exc)) from exc
            except TimeoutError as exc:
                raise CatalogUnavailable("catalog did not answer in time") from exc
            except aiohttp.ClientError as exc:
                raise CatalogUnavailable("catalog is unreachable", reply=repr(exc)) from exc
        raise AssertionError("unreachable")

    async def _order(self, method: str, path: str, body: dict[str, Any] | None = None) -> Order:
        payload = await self._call(method, path, body)
        try:
            return Order.model_validate_json(payload)
        except ValidationError as exc:
            raise CatalogUnavailable(
                "catalog sent an unreadable order", reply=payload[:500].decode("utf-8", "replace")
            ) from exc

    async def hold(
        self, order_id: uuid.UUID, payment_id: uuid.UUID, *, user_id: str | None = None
    ) -> Order:
        """Keep the order from expiring while this payment's charge is in flight.

        With `user_id`, the catalog answers 404 unless that user owns the order, so one
        call checks the owner, holds the order and returns its amount.
        """
        body = {"payment_id": str(payment_id)}
        if user_id is not None:
            body["user_id"] = user_id
        return await self._order("POST", f"/internal/v1/orders/{order_id}/hold", body)

    async def apply_outcomes(
        self, items: list[tuple[str, uuid.UUID, uuid.UUID]]
    ) -> list[OutcomeResult]:
        """Deliver `(kind, order id, payment id)` outcomes (`paid` / `release`) in one
        request; the catalog answers each as its own call would (200, 404 or 409)."""
        body = {
            "items": [
                {"kind": kind, "order_id": str(order_id), "payment_id": str(payment_id)}
                for kind, order_id, payment_id in items
            ]
        }
        payload = await self._call("POST", "/internal/v1/order-outcomes", body)
        try:
            results = _OutcomeResults.model_validate_json(payload).results
        except ValidationError as exc:
            raise CatalogUnavailable(
                "catalog sent unreadable outcomes", reply=payload[:500].decode("utf-8", "replace")
            ) from exc
        if len(results) != len(items):
            raise CatalogUnavailable(
                f"catalog answered {len(results)} outcomes for {len(items)}",
                reply=payload[:500].decode("utf-8", "replace"),
            )
        return [
            OutcomeResult(
                r.status,
                "" if r.problem is None else orjson.dumps(r.problem).decode()[:500],
            )
            for r in results
        ]

    async def release(self, order_id: uuid.UUID, payment_id: uuid.UUID) -> None:
        await self._call(
            "POST", f"/internal/v1/orders/{order_id}/release", {"payment_id": str(payment_id)}
        )

    async def ping(self) -> None:
        """Raise unless the catalog answers /healthz."""
        await self._call("GET", "/healthz")


def _problem_code(payload: bytes) -> str:
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return "unknown"
    kind = doc.get("type", "") if isinstance(doc, dict) else ""
    return str(kind).rsplit("/", 1)[-1] or "unknown"
