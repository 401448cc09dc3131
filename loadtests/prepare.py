"""Everything a scenario needs before the load starts, made through the public API.

Tokens for demo users, a dedicated product with plenty of stock (so a run never
sells out the demo flash sale), fresh reserved orders, payments for callbacks to
name. Every call has a timeout; 429s are waited out as Retry-After says, within a
deadline.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from loadtests import workload
from services.common.settings import CommonSettings, load

TIMEOUT = httpx.Timeout(10.0, connect=3.0)
LOADTEST_PRODUCT_ID = 900_001
LOADTEST_PRODUCT_STOCK = 1_000_000
UNAVAILABLE = (404, 501)


class PrepareError(RuntimeError):
    """The stack did not give what a scenario needs (the message says what and why)."""


class Skip(Exception):
    """A scenario cannot run on this stack as it is (e.g. demo data not seeded)."""


@dataclass(frozen=True)
class Availability:
    """Whether an endpoint exists on this stack: absent only when it answers 404 or 501."""

    path: str
    status: int
    detail: str = ""

    @property
    def available(self) -> bool:
        return self.status not in UNAVAILABLE and self.status != 0

    def reason(self) -> str:
        if self.status == 0:
            return f"{self.path}: no answer ({self.detail})"
        return f"{self.path} answered {self.status}" + (f" ({self.detail})" if self.detail else "")


def client(base_url: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=base_url, timeout=TIMEOUT)


async def probe(
    http: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    json: Any = None,
    headers: dict[str, str] | None = None,
) -> Availability:
    """One side-effect-free request to learn whether the route exists (bodies are invalid)."""
    try:
        resp = await http.request(method, path, json=json, headers=headers)
    except httpx.HTTPError as exc:
        return Availability(path, 0, type(exc).__name__)
    detail = ""
    if resp.headers.get("content-type", "").startswith("application/problem+json"):
        detail = str(resp.json().get("type", ""))
    return Availability(path, resp.status_code, detail)


async def _post_retrying(
    http: httpx.AsyncClient,
    path: str,
    *,
    json: Any,
    headers: dict[str, str],
    deadline: float,
) -> httpx.Response:
    """POST, waiting out 429/503 with Retry-After until `deadline` (monotonic)."""
    while True:
        resp = await http.post(path, json=json, headers=headers)
        if resp.status_code not in (429, 503) or time.monotonic() >= deadline:
            return resp
        wait = float(resp.headers.get("retry-after", "1") or 1)
        await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))


async def login(
    http: httpx.AsyncClient, username: str, password: str, *, client_ip: str, deadline: float
) -> str:
    resp = await _post_retrying(
        http,
        "/api/v1/auth/login",
        json={"username": username, "password": password},
        headers={"X-Forwarded-For": client_ip},
        deadline=deadline,
    )
    if resp.status_code != 200:
        raise PrepareError(f"login as {username} answered {resp.status_code}: {resp.text[:200]}")
    return str(resp.json()["access_token"])


@dataclass
class Users:
    """Tokens of demo users 1..n, with the address each one sends."""

    tokens: dict[int, str] = field(default_factory=dict)

    def pick(self, i: int) -> tuple[str, str]:
        keys = sorted(self.tokens)
        n = keys[i % len(keys)]
        return self.tokens[n], workload.client_address(n)


async def login_users(base_url: str, count: int, *, timeout_s: float = 60.0) -> Users:
    """Log in demo1..demo<count> (a few at a time: argon2 is deliberately slow)."""
    deadline = time.monotonic() + timeout_s
    users = Users()
    sem = asyncio.Semaphore(4)
    async with client(base_url) as http:

        async def one(n: int) -> None:
            creds = workload.demo_credentials(n)
            async with sem:
                users.tokens[n] = await login(
                    http,
                    creds["username"],
                    creds["password"],
                    client_ip=workload.client_address(n),
                    deadline=deadline,
                )

        await asyncio.gather(*(one(n) for n in range(1, count + 1)))
    return users


def admin_password() -> str:
    """SHOPSTACK_ADMIN_PASSWORD, else the documented dev default (dev/test stacks only)."""
    explicit = os.environ.get("SHOPSTACK_ADMIN_PASSWORD")
    if explicit:
        return explicit
    return load(CommonSettings).secret("admin_password")


def webhook_secret() -> str:
    """The provider's signing secret (SHOPSTACK_PSP_WEBHOOK_SECRET, else the dev default)."""
    return load(CommonSettings).secret("psp_webhook_secret")


async def ensure_product(
    base_url: str, *, product_id: int = LOADTEST_PRODUCT_ID, stock: int = LOADTEST_PRODUCT_STOCK
) -> dict[str, Any]:
    """Create or replace the load-test product (no flash sale, so no per-user limit)."""
    deadline = time.monotonic() + 30
    async with client(base_url) as http:
        token = await login(
            http, "admin", admin_password(), client_ip="10.255.255.254", deadline=deadline
        )
        body = {
            "sku": f"LOADTEST-{product_id}",
            "name": "Load-test product",
            "description": "Created by `shopstack loadtest`; its stock is reset every run.",
            "price_cents": 1999,
            "currency": "EUR",
            "stock": stock,
            "flash_sale": None,
        }
        resp = await http.put(
            f"/api/v1/admin/products/{product_id}",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
        )
        if resp.status_code not in (200, 201):
            raise PrepareError(
                f"PUT /api/v1/admin/products/{product_id} answered {resp.status_code}: "
                f"{resp.text[:200]}"
            )
        data: dict[str, Any] = resp.json()
        return data


@dataclass
class Batch:
    """Things made for a run, and how the stack answered the attempts that failed."""

    items: list[Any] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)


async def create_orders(
    base_url: str,
    users: Users,
    count: int,
    *,
    product_id: int = LOADTEST_PRODUCT_ID,
    concurrency: int = 16,
    timeout_s: float = 60.0,
) -> Batch:
    """`count` fresh reserved orders (one unit each) as (token, order, address) pairs."""
    deadline = time.monotonic() + timeout_s
    batch = Batch()
    queue = iter(range(count))
    async with client(base_url) as http:

        async def worker() -> None:
            for i in queue:
                if time.monotonic() > deadline:
                    batch.failures["deadline"] += 1
                    return
                token, address = users.pick(i)
                resp = await _post_retrying(
                    http,
                    "/api/v1/orders",
                    json={"product_id": product_id, "quantity": 1},
                    headers={
                        "Authorization": f"Bearer {token}",
                        "Idempotency-Key": f"lt-order-{uuid.uuid4().hex}",
                        "X-Forwarded-For": address,
                    },
                    deadline=deadline,
                )
                if resp.status_code == 201:
                    batch.items.append(workload.PaymentPair(token, resp.json()["id"], address))
                else:
                    batch.failures[str(resp.status_code)] += 1
                    if sum(batch.failures.values()) > max(20, count // 10):
                        return

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return batch


async def create_payments(
    base_url: str,
    pairs: list[workload.PaymentPair],
    *,
    concurrency: int = 16,
    timeout_s: float = 30.0,
) -> Batch:
    """Pay each order once, `concurrency` at a time; the replies (payment id, amount) are
    what callbacks name and what payment-status polls (matched to owners by order id)."""
    deadline = time.monotonic() + timeout_s
    batch = Batch()
    queue = iter(pairs)
    async with client(base_url) as http:

        async def worker() -> None:
            for pair in queue:
                request = workload.payment_request(pair)
                resp = await _post_retrying(
                    http,
                    request.path,
                    json={"order_id": pair.order_id},
                    headers={k: v for k, v in request.headers.items() if k != "Content-Type"},
                    deadline=deadline,
                )
                if resp.status_code == 201:
                    batch.items.append(resp.json())
                else:
                    batch.failures[str(resp.status_code)] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return batch


async def fetch_payment(base_url: str, owned: workload.OwnedPayment) -> tuple[int, str]:
    """Read one payment as its owner would: (status, the start of the body)."""
    request = workload.payment_status_request(owned)
    async with client(base_url) as http:
        resp = await http.get(request.path, headers=request.headers)
        return resp.status_code, resp.text[:200]


async def send_callback(base_url: str, event: workload.SignedEvent) -> tuple[int, str]:
    """Deliver one signed event; (status, the reply's "status" member or body)."""
    async with client(base_url) as http:
        resp = await http.post(
            workload.CALLBACK_PATH,
            content=event.body,
            headers={"Content-Type": "application/json", "PSP-Signature": event.signature},
        )
        try:
            return resp.status_code, str(resp.json().get("status", resp.text))
        except ValueError:
            return resp.status_code, resp.text[:200]
