"""End to end through real processes started by `shopstack up` (granian, real ports)."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from services.common.launcher import read_stack_file
from services.common.settings import DEV_SECRETS, SERVICES
from services.payment.webhooks import expected_signature
from tests.support.problems import assert_problem
from tests.support.stack import RunningStack, ready


def token_for(stack: RunningStack, username: str, password: str) -> str:
    resp = httpx.post(
        stack.url() + "/api/v1/auth/login",
        json={"username": username, "password": password},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    token: str = resp.json()["access_token"]
    return token


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_is_ready(stack: RunningStack, service: str) -> None:
    assert ready(stack.url(service))
    assert httpx.get(stack.url(service) + "/healthz").json() == {"status": "ok"}
    metrics = httpx.get(stack.url(service) + "/metrics")
    assert metrics.status_code == 200
    assert "shopstack_http_requests_total" in metrics.text


@pytest.mark.parametrize("service", ["catalog", "payment", "stats", "psp_sandbox"])
def test_services_publish_openapi(stack: RunningStack, service: str) -> None:
    schema = httpx.get(stack.url(service) + "/openapi.json").json()
    assert schema["openapi"].startswith("3.")


def test_login_and_read_a_product_through_the_gateway(stack: RunningStack) -> None:
    token = token_for(stack, "demo1", "demo-password-1")
    with httpx.Client(base_url=stack.url(), headers={"Authorization": f"Bearer {token}"}) as c:
        first = c.get("/api/v1/products/1")
        assert first.status_code == 200
        product = first.json()
        assert product["id"] == 1
        assert product["flash_sale"]["per_user_limit"] >= 1
        etag = first.headers["etag"]
        again = c.get("/api/v1/products/1", headers={"If-None-Match": etag})
        assert again.status_code == 304
        page = c.get("/api/v1/products", params={"limit": 5}).json()
        assert [p["id"] for p in page["items"]] == [1, 2, 3, 4, 5]
        assert page["next"] == 5


def test_admin_put_through_the_gateway_is_visible_within_a_second(stack: RunningStack) -> None:
    admin = token_for(stack, "admin", DEV_SECRETS["admin_password"])
    user = token_for(stack, "demo2", "demo-password-2")
    url = stack.url() + "/api/v1/products/15"
    before = httpx.get(url).json()
    body = {k: before[k] for k in ("sku", "name", "description", "price_cents", "currency")}
    body |= {"stock": 77, "flash_sale": None, "name": "Renamed through the gateway"}
    forbidden = httpx.put(
        stack.url() + "/api/v1/admin/products/15",
        json=body,
        headers={"Authorization": f"Bearer {user}"},
    )
    assert_problem(forbidden, 403, "forbidden")
    changed = httpx.put(
        stack.url() + "/api/v1/admin/products/15",
        json=body,
        headers={"Authorization": f"Bearer {admin}"},
    )
    assert changed.status_code == 200, changed.text
    deadline = time.monotonic() + 1.0
    seen = None
    while time.monotonic() < deadline:
        seen = httpx.get(url).json()
        if seen["name"] == "Renamed through the gateway":
            break
        time.sleep(0.05)
    assert seen is not None
    assert seen["name"] == "Renamed through the gateway"
    assert seen["stock"] == 77


def test_errors_through_the_gateway_are_problems(stack: RunningStack) -> None:
    assert_problem(httpx.get(stack.url() + "/api/v1/products/abc"), 422, "validation-error")
    assert_problem(httpx.get(stack.url() + "/api/v1/products/999999"), 404, "not-found")
    assert_problem(httpx.get(stack.url() + "/nope"), 404, "not-found")
    assert_problem(httpx.get(stack.url() + "/api/v1/orders/1"), 401, "unauthorized")


def test_request_id_is_forwarded_and_echoed(stack: RunningStack) -> None:
    resp = httpx.get(stack.url() + "/api/v1/products/2", headers={"X-Request-Id": "trace-me-7"})
    assert resp.headers["x-request-id"] == "trace-me-7"


def raw_request(url: str, head: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head)
        return sock.recv(256)


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_480 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
        + b"\r\n",
    ],
    ids=["20-KiB-header", "1000-headers"],
)
@pytest.mark.parametrize("service", ["gateway", "catalog"])
def test_header_abuse_is_431(stack: RunningStack, service: str, head: bytes) -> None:
    """IN-4: our own header cap, the same on every service."""
    assert raw_request(stack.url(service), head).startswith(b"HTTP/1.1 431")


def test_large_bodies_still_flow(stack: RunningStack) -> None:
    """The header cap is not a body cap: pages far larger than it pass through."""
    admin = token_for(stack, "admin", DEV_SECRETS["admin_password"])
    for pid in (19, 20):
        body = {
            "sku": f"SKU-BIG-{pid}",
            "name": "Big",
            "description": "x" * 9_500,
            "price_cents": 100,
            "currency": "EUR",
            "stock": 1,
        }
        put = httpx.put(
            stack.url() + f"/api/v1/admin/products/{pid}",
            json=body,
            headers={"Authorization": f"Bearer {admin}"},
        )
        assert put.status_code == 200, put.text
    page = httpx.get(stack.url() + "/api/v1/products", params={"after": 18, "limit": 2})
    assert page.status_code == 200
    assert len(page.content) > 16_384
    assert [p["description"] for p in page.json()["items"]] == ["x" * 9_500] * 2


def wait_for_stock(stack: RunningStack, pid: int, expected: int) -> int:
    deadline = time.monotonic() + 1.0
    stock = -1
    while time.monotonic() < deadline:
        stock = httpx.get(stack.url() + f"/api/v1/products/{pid}").json()["stock"]
        if stock == expected:
            break
        time.sleep(0.05)
    return int(stock)


def test_order_flow_through_the_gateway(stack: RunningStack) -> None:
    """Reserve, read, see the stock move in product detail within 1 s, cancel, get it back."""
    owner = {"Authorization": f"Bearer {token_for(stack, 'demo3', 'demo-password-3')}"}
    other = {"Authorization": f"Bearer {token_for(stack, 'demo2', 'demo-password-2')}"}
    before = httpx.get(stack.url() + "/api/v1/products/12").json()["stock"]
    created = httpx.post(
        stack.url() + "/api/v1/orders", json={"product_id": 12, "quantity": 2}, headers=owner
    )
    assert created.status_code == 201, created.text
    order = created.json()
    assert order["status"] == "reserved"
    assert wait_for_stock(stack, 12, before - 2) == before - 2
    mine = httpx.get(stack.url() + f"/api/v1/orders/{order['id']}", headers=owner)
    assert mine.json()["id"] == order["id"]
    assert_problem(
        httpx.get(stack.url() + f"/api/v1/orders/{order['id']}", headers=other), 404, "not-found"
    )
    cancelled = httpx.post(stack.url() + f"/api/v1/orders/{order['id']}/cancel", headers=owner)
    assert cancelled.status_code == 200
    assert wait_for_stock(stack, 12, before) == before


def test_sold_out_through_the_gateway(stack: RunningStack) -> None:
    admin = {"Authorization": f"Bearer {token_for(stack, 'admin', DEV_SECRETS['admin_password'])}"}
    buyer = {"Authorization": f"Bearer {token_for(stack, 'demo1', 'demo-password-1')}"}
    product = {
        "sku": "SKU-LAST-ONE",
        "name": "The last one",
        "price_cents": 500,
        "currency": "EUR",
        "stock": 1,
    }
    put = httpx.put(stack.url() + "/api/v1/admin/products/17", json=product, headers=admin)
    assert put.status_code == 200, put.text
    order = {"product_id": 17, "quantity": 1}
    first = httpx.post(stack.url() + "/api/v1/orders", json=order, headers=buyer)
    assert first.status_code == 201, first.text
    replies = [
        httpx.post(stack.url() + "/api/v1/orders", json=order, headers=buyer) for _ in range(5)
    ]
    for again in replies:  # the first from the catalog, the rest from the gateway's flag
        assert_problem(again, 409, "sold-out")
        assert again.content == replies[0].content
        assert again.headers["x-request-id"]
    keyed = httpx.post(
        stack.url() + "/api/v1/orders",
        json=order,
        headers={**buyer, "Idempotency-Key": "sold-out-replay-1"},
    )
    assert_problem(keyed, 409, "sold-out")
    assert wait_for_stock(stack, 17, 0) == 0


def test_the_launcher_records_where_its_servers_are(stack: RunningStack) -> None:
    """`shopstack loadtest` finds a local stack's database from this file (owner-only)."""
    data_dir = stack.log_path.parent / "data"
    info = read_stack_file(data_dir)
    assert info["gateway_url"] == stack.url()
    assert info["database_url"].startswith("postgresql://")
    assert info["redis_url"].startswith("redis://")
    assert (data_dir / "run" / "stack.json").stat().st_mode & 0o077 == 0


def test_declared_and_chunked_bodies_through_granian(stack: RunningStack) -> None:
    """A declared body is read in one go, a chunked one in parts: the same answer; caps hold."""
    url = stack.url() + "/api/v1/payments/callbacks/psp"
    body = b'{"event": "payment.settled", "id": "x"}'
    now = str(int(time.time()))
    signature = expected_signature(DEV_SECRETS["psp_webhook_secret"], now, body)
    headers = {"Content-Type": "application/json", "PSP-Signature": f"t={now},v1={signature}"}
    declared = httpx.post(url, content=body, headers=headers)
    chunked = httpx.post(url, content=iter([body[:10], body[10:]]), headers=headers)
    assert "content-length" not in chunked.request.headers
    # Both bodies reached the payment service whole: their signature matched, and it
    # judged what they say (no such payment), the same way for both.
    assert declared.status_code == chunked.status_code < 500
    assert declared.json() == chunked.json()
    assert "signature" not in declared.text.lower(), declared.text
    big = b"x" * 70_000
    assert_problem(httpx.post(url, content=big), 413, "payload-too-large")
    chunks = iter([big[:40_000], big[40_000:]])
    assert_problem(httpx.post(url, content=chunks), 413, "payload-too-large")


def test_a_chunked_body_past_the_cap_is_refused_whatever_length_it_declares(
    stack: RunningStack,
) -> None:
    """Transfer-Encoding wins over Content-Length (granian reads the chunks): still capped."""
    chunk = b"x" * 70_000
    head = (
        b"POST /api/v1/payments/callbacks/psp HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        + b"%x\r\n" % len(chunk)
        + chunk
        + b"\r\n0\r\n\r\n"
    )
    assert raw_request(stack.url(), head).startswith(b"HTTP/1.1 413")


def test_a_chunked_order_past_the_cap_is_refused_on_the_sold_out_path(
    stack: RunningStack,
) -> None:
    """A signed-in buyer's order (the sold-out fast path's case: cached token, small
    declared length) that is chunked and past the cap, never finished: 413 at once."""
    token = token_for(stack, "demo2", "demo-password-2")
    headers = {"Authorization": f"Bearer {token}"}
    warm = httpx.post(stack.url() + "/api/v1/orders", json={"product_id": 0}, headers=headers)
    assert warm.status_code == 422  # the token is now verified and cached
    chunks = b"".join(b"%x\r\n" % 10_000 + b"x" * 10_000 + b"\r\n" for _ in range(10))
    head = (
        b"POST /api/v1/orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + token.encode()
        + b"\r\nContent-Type: application/json\r\nContent-Length: 30\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + chunks
    )
    assert raw_request(stack.url(), head).startswith(b"HTTP/1.1 413")
