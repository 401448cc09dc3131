"""IN-9: SQL injection strings in every string input of the public API, on a real stack.

A private stack (`shopstack up`: granian processes, real PostgreSQL and Redis) runs
with its own database. Every string a client can send through the gateway gets a
fixed list of classic injection strings (quotes, comments, `'; DROP TABLE`,
`' OR '1'='1`, UNION SELECT, stacked queries, NUL, lone surrogates, backslashes,
unicode quotes, `$1`, `%s`, very long strings) and Hypothesis text built around them:

- login: username, password;
- the admin PUT: sku, name, description, currency, the flash sale's times, and the
  product id in its path;
- ids in paths: products, orders (read, cancel), payments, product stats;
- ids in bodies: an order's product_id and quantity, a payment's order_id;
- headers: Idempotency-Key (orders, payments), If-None-Match, X-Request-Id,
  Authorization, X-Forwarded-For, PSP-Signature;
- a signed provider callback: id, type, charge_id, payment_id, currency;
- stats events: event_id, type, user_id, ts;
- query parameters: the product list's limit and after, the stats' window, limit
  and metric, and parameters the API does not have.

The API has no sort or order parameter. The one parameter that picks an ordering is
`metric` of GET /api/v1/stats/top (rank by views, carts or purchases): only those
three names are accepted, anything else is a 422. Unknown parameters (`sort`,
`order`, `order_by`, `filter`, ...) with injection values are ignored: the reply is
the same as without them.

Pass criterion (RELIABILITY.md IN-9): no 5xx; no response carries database error
text (SQLSTATE, asyncpg, "syntax error", relation/column names, ...); where a
request was refused the database is unchanged (row counts of the tables it would
touch, and the row itself for the admin PUT); where a string was accepted it was
stored as sent, byte for byte; and every table still exists afterwards.

Hypothesis examples per input: SHOPSTACK_IN9_EXAMPLES (default 15; login, which
costs an argon2 verify each, takes a third of it).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.embedded import EmbeddedRedis
from services.gateway.seed import demo_password
from services.gateway.settings import GatewaySettings
from tests.support.servers import free_port
from tests.support.stack import RunningStack, private_stack

EXAMPLES = int(os.environ.get("SHOPSTACK_IN9_EXAMPLES", "15"))
WEBHOOK_SECRET = "in9-psp-webhook-secret-0123456789abcdef-0123"
JWT_SECRET = "in9-jwt-secret-0123456789abcdef-0123456789abcdef"
PRODUCT = 90_901  # the admin PUT's target and the orders' product
UNLIMITED = "100000"
STACK_ENV = {
    "SHOPSTACK_PSP_WEBHOOK_SECRET": WEBHOOK_SECRET,
    "SHOPSTACK_JWT_SECRET": JWT_SECRET,
    # Hundreds of requests from one client and one user: the limiters have their own
    # tests (RL-1, SEC-2); here every request must reach the code that queries.
    "SHOPSTACK_WRITE_USER_RATE_PER_S": UNLIMITED,
    "SHOPSTACK_WRITE_USER_BURST": UNLIMITED,
    "SHOPSTACK_WRITE_IP_RATE_PER_S": UNLIMITED,
    "SHOPSTACK_WRITE_IP_BURST": UNLIMITED,
    "SHOPSTACK_LOGIN_IP_RATE_PER_S": UNLIMITED,
    "SHOPSTACK_LOGIN_IP_BURST": UNLIMITED,
    "SHOPSTACK_LOGIN_FAILURE_RATE_PER_S": UNLIMITED,
    "SHOPSTACK_LOGIN_FAILURE_BURST": UNLIMITED,
}
TABLES = (
    "users",
    "products",
    "orders",
    "order_limits",
    "idempotency_keys",
    "payments",
    "payment_idempotency_keys",
    "payment_psp_events",
    "payment_outbox",
    "stats_events",
)

INJECTIONS = [
    "'",
    '"',
    "`",
    "\\",
    "\\'",
    "''",
    "';",
    "'--",
    "' -- ",
    "'/*",
    "*/",
    "#",
    "' OR '1'='1",
    "' OR 1=1--",
    '" OR ""="',
    "admin'--",
    "demo1' --",
    "') OR ('1'='1",
    "1 OR 1=1",
    "'; DROP TABLE users; --",
    "'; DROP TABLE products CASCADE; --",
    "1; DELETE FROM orders",
    "'; UPDATE products SET stock = 0; --",
    "'; INSERT INTO users (username, password_hash, role) VALUES ('x', 'x', 'admin'); --",
    "' UNION SELECT id, username, password_hash, role FROM users --",
    "1 UNION SELECT NULL, NULL, NULL --",
    "'; SELECT pg_sleep(3); --",
    "'||(SELECT version())||'",
    "' AND 1=CAST((SELECT version()) AS int) --",
    "$$; DROP TABLE users; $$",
    "$1",
    "$2::text",
    "%s",
    "%(name)s",
    "{0}",
    "?",
    ":name",
    "E'\\x27'",
    "U&'\\0027'",
    "\x00",
    "a\x00b",
    "%00",
    "\\x00",
    "\\0",
    "\ud800",
    "x\udfffy",
    "\u2019 OR \u20191\u2019=\u20191",
    "\u02bc OR 1=1 --",
    "\uff07; DROP TABLE users; --",
    "\r\n",
    "\t",
    "' OR 'x'='x" * 30,
    "'" * 5_000,
    "A" * 100_000,
]
FRAGMENTS = [
    "'",
    '"',
    "--",
    "/*",
    ";",
    "\\",
    "$1",
    "%s",
    "\x00",
    " OR 1=1",
    " UNION SELECT ",
    "; DROP TABLE users",
]
DB_ERROR_MARKERS = (
    "syntax error",
    "asyncpg",
    "sqlstate",
    "postgres",
    "psycopg",
    'relation "',
    'column "',
    "pg_",
    "violates",
    "invalid input syntax",
    "invalid byte sequence",
    "untranslatable",
    "unterminated",
    "operator does not exist",
    "traceback",
    "unicodeencodeerror",
)


def header_safe(text: str) -> bool:
    """Printable ASCII with no space at either end: what an HTTP client will send."""
    return bool(text) and text == text.strip() and all(0x20 <= ord(c) <= 0x7E for c in text)


def utf8_safe(text: str) -> bool:
    return not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# Hypothesis: injection fragments inside arbitrary text (any code point, lone
# surrogates included: JSON carries them as \\ud800 escapes).
injection_text = st.one_of(
    st.sampled_from(INJECTIONS),
    st.text(max_size=80),
    st.builds(
        lambda a, f, b: a + f + b,
        st.text(max_size=20),
        st.sampled_from(FRAGMENTS),
        st.text(max_size=20),
    ),
)
# What a header can carry at all (an HTTP client sends nothing else).
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=120
).filter(header_safe)
# A path segment: any text that is UTF-8 (percent-encoded on the way).
path_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=80)
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


HEADER_INJECTIONS = [s for s in INJECTIONS if header_safe(s) and len(s) <= 8_000]
PATH_INJECTIONS = [s for s in INJECTIONS if utf8_safe(s) and len(s) <= 6_000]


class Database:
    """Synchronous reads of the stack's database (one connection on a private loop)."""

    def __init__(self, dsn: str) -> None:
        # Its own loop, never made the thread's current one (pytest-asyncio owns that).
        self._runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
        self._conn: asyncpg.Connection = self._runner.run(asyncpg.connect(dsn))

    def close(self) -> None:
        self._runner.run(self._conn.close())
        self._runner.close()

    def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = self._runner.run(self._conn.fetch(sql, *args))
        return rows

    def counts(self, *tables: str) -> dict[str, int]:
        names = tables or TABLES
        counted = (f"(SELECT count(*) FROM {t}) AS {t}" for t in names)  # noqa: S608 (TABLES)
        sql = "SELECT " + ", ".join(counted)
        return dict(self.fetch(sql)[0])

    def missing_tables(self) -> list[str]:
        rows = self.fetch("SELECT t FROM unnest($1::text[]) t WHERE to_regclass(t) IS NULL", TABLES)
        return [row["t"] for row in rows]

    def product(self, product_id: int) -> dict[str, Any] | None:
        rows = self.fetch("SELECT * FROM products WHERE id = $1", product_id)
        return dict(rows[0]) if rows else None


def signed(body: bytes) -> dict[str, str]:
    t = str(int(time.time()))
    mac = hmac.new(WEBHOOK_SECRET.encode(), t.encode() + b"." + body, hashlib.sha256)
    return {"PSP-Signature": f"t={t},v1={mac.hexdigest()}", "Content-Type": "application/json"}


def as_json(doc: Any) -> bytes:
    """JSON as a hostile client may send it: lone surrogates as \\ud800 escapes."""
    return json.dumps(doc).encode()


def assert_clean(resp: httpx.Response, payload: str) -> None:
    """No 5xx, and no database error text (what the client sent is not counted)."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:500], payload[:200])
    text = resp.text
    quoted = quote(payload, safe="") if utf8_safe(payload) else ""
    for echoed in (payload, json.dumps(payload)[1:-1], quoted):
        if echoed:
            text = text.replace(echoed, "")
    lowered = text.lower()
    leaked = [m for m in DB_ERROR_MARKERS if m in lowered]
    assert not leaked, (leaked, resp.status_code, resp.text[:500], payload[:200])


# -- the stack ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_and_db(
    servers: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RunningStack, Database]]:
    # A Redis of its own: the session's stack keeps its stock gate and its event stream
    # in the shared test Redis, and its stats writer would store this stack's events.
    redis = EmbeddedRedis(tmp_path_factory.mktemp("in9-redis"), port=free_port())
    try:
        with private_stack(
            servers[0],
            redis_url=redis.start(),
            log_dir=tmp_path_factory.mktemp("in9-stack"),
            products=5,
            users=2,
            env=STACK_ENV,
        ) as (running, dsn):
            db = Database(dsn)
            try:
                yield running, db
                assert db.missing_tables() == []
            finally:
                db.close()
            log = running.log()
            assert "Traceback" not in log, log[-5000:]
    finally:
        redis.stop()


@pytest.fixture(scope="module")
def gateway(stack_and_db: tuple[RunningStack, Database]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack_and_db[0].url(), timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def db(stack_and_db: tuple[RunningStack, Database]) -> Database:
    return stack_and_db[1]


def _login(client: httpx.Client, username: str, password: str) -> dict[str, str]:
    resp = client.post("/api/v1/auth/login", json={"username": username, "password": password})
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['access_token']}"}


@pytest.fixture(scope="module")
def user(gateway: httpx.Client) -> dict[str, str]:
    return _login(gateway, "demo1", demo_password(1))


@pytest.fixture(scope="module")
def admin(gateway: httpx.Client) -> dict[str, str]:
    return _login(gateway, "admin", GatewaySettings().secret("admin_password"))


PRODUCT_BODY: dict[str, Any] = {
    "sku": "IN9-TARGET",
    "name": "The product IN-9 writes",
    "description": "plain",
    "price_cents": 1234,
    "currency": "EUR",
    "stock": 1_000_000,
    "flash_sale": None,
}
SALE = {
    "price_cents": 500,
    "starts_at": "2020-01-01T00:00:00Z",
    "ends_at": "2099-01-01T00:00:00Z",
    "per_user_limit": 1000,
}


@pytest.fixture(scope="module")
def product(gateway: httpx.Client, admin: dict[str, str]) -> int:
    resp = gateway.put(f"/api/v1/admin/products/{PRODUCT}", json=PRODUCT_BODY, headers=admin)
    assert resp.status_code in (200, 201), resp.text
    return PRODUCT


@pytest.fixture(autouse=True)
def tables_survive(db: Database) -> Iterator[None]:
    yield
    assert db.missing_tables() == []


# -- login -------------------------------------------------------------------------


def _try_login(gateway: httpx.Client, db: Database, username: str, password: str) -> None:
    body = as_json({"username": username, "password": password})
    resp = gateway.post(
        "/api/v1/auth/login", content=body, headers={"Content-Type": "application/json"}
    )
    assert_clean(resp, username)
    assert_clean(resp, password)
    assert resp.status_code in (401, 413, 422), resp.text


def _users(db: Database) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db.fetch("SELECT * FROM users ORDER BY id")]


@pytest.mark.parametrize("field", ["username", "password"])
def test_in9_login_fields(gateway: httpx.Client, db: Database, field: str) -> None:
    """An injection as the username (or demo1's password): 401 or 422, users unchanged."""
    before = _users(db)
    for payload in INJECTIONS:
        if field == "username":
            _try_login(gateway, db, payload, "whatever")
        else:
            _try_login(gateway, db, "demo1", payload)
    assert _users(db) == before


@settings(FUZZ, max_examples=max(3, EXAMPLES // 3))
@given(username=injection_text, password=injection_text)
def test_in9_login_fields_fuzzed(
    gateway: httpx.Client, db: Database, username: str, password: str
) -> None:
    before = db.counts("users")
    _try_login(gateway, db, username, password)
    assert db.counts("users") == before


# -- the admin PUT -----------------------------------------------------------------


def _put_product(
    gateway: httpx.Client, db: Database, admin: dict[str, str], field: str, payload: str
) -> None:
    body = {**PRODUCT_BODY}
    if field in ("starts_at", "ends_at"):
        body["flash_sale"] = {**SALE, field: payload}
    else:
        body[field] = payload
    before = db.product(PRODUCT)
    count = db.counts("products")
    resp = gateway.put(
        f"/api/v1/admin/products/{PRODUCT}",
        content=as_json(body),
        headers={**admin, "Content-Type": "application/json"},
    )
    assert_clean(resp, payload)
    assert db.counts("products") == count
    if resp.status_code in (200, 201):
        stored = db.product(PRODUCT)
        assert stored is not None
        assert field not in ("starts_at", "ends_at"), f"a time {payload!r} was taken"
        assert stored[field] == payload
        assert resp.json()[field] == payload
    else:
        assert resp.status_code in (409, 413, 422), resp.text
        assert db.product(PRODUCT) == before


PRODUCT_FIELDS = ["sku", "name", "description", "currency", "starts_at", "ends_at"]


@pytest.mark.parametrize("field", PRODUCT_FIELDS)
def test_in9_admin_product_fields(
    gateway: httpx.Client, db: Database, admin: dict[str, str], product: int, field: str
) -> None:
    """Each string field of the product: stored exactly as sent, or refused with the
    row unchanged."""
    for payload in INJECTIONS:
        _put_product(gateway, db, admin, field, payload)


@FUZZ
@pytest.mark.parametrize("field", PRODUCT_FIELDS)
@given(payload=injection_text)
def test_in9_admin_product_fields_fuzzed(
    gateway: httpx.Client,
    db: Database,
    admin: dict[str, str],
    product: int,
    field: str,
    payload: str,
) -> None:
    _put_product(gateway, db, admin, field, payload)


# -- ids in paths and bodies ---------------------------------------------------------

PATHS = [
    ("GET", "/api/v1/products/{}"),
    ("PUT", "/api/v1/admin/products/{}"),
    ("GET", "/api/v1/orders/{}"),
    ("POST", "/api/v1/orders/{}/cancel"),
    ("GET", "/api/v1/payments/{}"),
    ("GET", "/api/v1/stats/products/{}"),
]


def _path_probe(
    gateway: httpx.Client, headers: dict[str, str], method: str, template: str, payload: str
) -> None:
    path = template.format(quote(payload, safe=""))
    resp = gateway.request(
        method, path, headers=headers, json=PRODUCT_BODY if method == "PUT" else None
    )
    assert_clean(resp, payload)
    # 307: a path ending in "/" once decoded ("*/"), sent to the path without it.
    assert resp.status_code in (307, 400, 401, 403, 404, 405, 413, 422), (path, resp.text)


@pytest.mark.parametrize(("method", "template"), PATHS)
def test_in9_ids_in_paths(
    gateway: httpx.Client,
    db: Database,
    user: dict[str, str],
    admin: dict[str, str],
    method: str,
    template: str,
) -> None:
    """An injection as the id in a path: 404/422 (never a row read or written)."""
    headers = admin if method == "PUT" else user
    before = db.counts()
    for payload in PATH_INJECTIONS:
        _path_probe(gateway, headers, method, template, payload)
    assert db.counts() == before


@FUZZ
@pytest.mark.parametrize(("method", "template"), PATHS)
@given(payload=path_text)
def test_in9_ids_in_paths_fuzzed(
    gateway: httpx.Client,
    user: dict[str, str],
    admin: dict[str, str],
    method: str,
    template: str,
    payload: str,
) -> None:
    if not payload.strip("/. ") or payload.strip().isdigit():
        return  # another route, or a real id: not an injection
    _path_probe(gateway, admin if method == "PUT" else user, method, template, payload)


BODY_IDS = [
    ("/api/v1/orders", "product_id", {"product_id": PRODUCT, "quantity": 1}),
    ("/api/v1/orders", "quantity", {"product_id": PRODUCT, "quantity": 1}),
    ("/api/v1/payments", "order_id", {"order_id": str(uuid.uuid4())}),
]


@pytest.mark.parametrize(("path", "field", "valid"), BODY_IDS)
def test_in9_ids_in_bodies(
    gateway: httpx.Client,
    db: Database,
    user: dict[str, str],
    product: int,
    path: str,
    field: str,
    valid: dict[str, Any],
) -> None:
    """An injection where an id or a quantity belongs: 422, nothing written."""
    before = db.counts()
    for payload in INJECTIONS:
        resp = gateway.post(
            path,
            content=as_json({**valid, field: payload}),
            headers={**user, "Content-Type": "application/json"},
        )
        assert_clean(resp, payload)
        assert resp.status_code in (413, 422), (payload[:100], resp.text)
    assert db.counts() == before


# -- headers -----------------------------------------------------------------------


def _order_with_key(
    gateway: httpx.Client, db: Database, user: dict[str, str], key: str
) -> tuple[int, bool]:
    """(status, replayed) of an order with Idempotency-Key `key`."""
    before = db.counts("orders", "idempotency_keys")
    resp = gateway.post(
        "/api/v1/orders",
        json={"product_id": PRODUCT, "quantity": 1},
        headers={**user, "Idempotency-Key": key},
    )
    assert_clean(resp, key)
    after = db.counts("orders", "idempotency_keys")
    replayed = resp.headers.get("idempotent-replayed") == "true"
    if resp.status_code == 201 and not replayed:
        assert after == {k: v + 1 for k, v in before.items()}
        rows = db.fetch("SELECT key FROM idempotency_keys WHERE order_id = $1", resp.json()["id"])
        assert [r["key"] for r in rows] == [key]  # stored as sent
    else:
        assert resp.status_code in (201, 422), resp.text
        assert after == before
    return resp.status_code, replayed


def test_in9_order_idempotency_keys(
    gateway: httpx.Client, db: Database, user: dict[str, str], product: int
) -> None:
    """Each key makes one order, replayed the second time, or is refused (422)."""
    for key in HEADER_INJECTIONS:
        status, replayed = _order_with_key(gateway, db, user, key)
        if status == 201:
            assert not replayed
            assert _order_with_key(gateway, db, user, key) == (201, True)


@FUZZ
@given(key=header_text)
def test_in9_order_idempotency_keys_fuzzed(
    gateway: httpx.Client, db: Database, user: dict[str, str], product: int, key: str
) -> None:
    _order_with_key(gateway, db, user, f"{uuid.uuid4().hex[:8]}{key}"[:255])


def test_in9_payment_idempotency_keys(
    gateway: httpx.Client, db: Database, user: dict[str, str]
) -> None:
    """A payment of an order nobody has, under each key: 404 or 422, no payment made."""
    before = db.counts("payments", "payment_outbox")
    for key in HEADER_INJECTIONS:
        resp = gateway.post(
            "/api/v1/payments",
            json={"order_id": str(uuid.uuid4())},
            headers={**user, "Idempotency-Key": key},
        )
        assert_clean(resp, key)
        assert resp.status_code in (404, 422), resp.text
    assert db.counts("payments", "payment_outbox") == before


HEADER_PROBES = [
    ("GET", "/api/v1/products/1", "If-None-Match"),
    ("GET", "/api/v1/products", "X-Request-Id"),
    ("GET", "/api/v1/orders/00000000-0000-0000-0000-000000000000", "Authorization"),
    ("POST", "/api/v1/auth/login", "X-Forwarded-For"),
    ("POST", "/api/v1/payments/callbacks/psp", "PSP-Signature"),
]


@pytest.mark.parametrize(("method", "path", "header"), HEADER_PROBES)
def test_in9_other_headers(
    gateway: httpx.Client, db: Database, method: str, path: str, header: str
) -> None:
    """Headers that reach a lookup or a log: never a 5xx, nothing written."""
    before = db.counts()
    body = {"username": "demo2", "password": "wrong"} if path.endswith("login") else None
    for payload in HEADER_INJECTIONS:
        value = f"Bearer {payload}" if header == "Authorization" else payload
        resp = gateway.request(method, path, json=body, headers={header: value})
        assert_clean(resp, payload)
        assert resp.status_code in (200, 304, 400, 401, 404, 422), (header, resp.text)
    assert db.counts() == before


# -- the provider callback ----------------------------------------------------------


def _callback(gateway: httpx.Client, db: Database, field: str, payload: str) -> None:
    event: dict[str, Any] = {
        "id": f"evt-{uuid.uuid4()}",
        "type": "charge.succeeded",
        "created": int(time.time()),
        "data": {
            "charge_id": "ch-1",
            "payment_id": str(uuid.uuid4()),
            "amount_cents": 1234,
            "currency": "EUR",
        },
    }
    if field in ("id", "type"):
        event[field] = payload
    else:
        event["data"][field] = payload
    body = as_json(event)
    before = db.counts("payments", "payment_psp_events")
    resp = gateway.post("/api/v1/payments/callbacks/psp", content=body, headers=signed(body))
    assert_clean(resp, payload)
    after = db.counts("payments", "payment_psp_events")
    assert after["payments"] == before["payments"]
    if resp.status_code == 200 and resp.json()["status"] != "duplicate":
        assert after["payment_psp_events"] == before["payment_psp_events"] + 1
        rows = db.fetch(
            "SELECT event_id, type, charge_id FROM payment_psp_events WHERE event_id = $1",
            event["id"],
        )
        assert len(rows) == 1  # stored under the id sent, byte for byte
        assert (rows[0]["type"], rows[0]["charge_id"]) == (
            event["type"],
            event["data"]["charge_id"],
        )
    else:
        assert resp.status_code in (200, 400, 413, 422), resp.text
        assert after == before


CALLBACK_FIELDS = ["id", "type", "charge_id", "payment_id", "currency"]


@pytest.mark.parametrize("field", CALLBACK_FIELDS)
def test_in9_callback_fields(gateway: httpx.Client, db: Database, field: str) -> None:
    """A correctly signed event with an injection in one field: recorded under exactly
    that value, or refused with nothing recorded."""
    for payload in INJECTIONS:
        _callback(gateway, db, field, payload)


@FUZZ
@pytest.mark.parametrize("field", CALLBACK_FIELDS)
@given(payload=injection_text)
def test_in9_callback_fields_fuzzed(
    gateway: httpx.Client, db: Database, field: str, payload: str
) -> None:
    _callback(gateway, db, field, payload)


# -- stats events ------------------------------------------------------------------

EVENT_FIELDS = ["event_id", "type", "user_id", "ts"]


def _event(field: str, payload: str) -> dict[str, Any]:
    doc = {
        "event_id": str(uuid.uuid4()),
        "type": "view",
        "product_id": 1,
        "user_id": "in9-user",
        "ts": (datetime.now(UTC) - timedelta(seconds=5)).isoformat(),
    }
    doc[field] = payload
    return doc


def test_in9_event_fields(gateway: httpx.Client, db: Database) -> None:
    """Events with an injection in one field: each batch of one is stored once, with
    the user id as sent, or refused (422) and never stored."""
    before = db.counts("stats_events")["stats_events"]
    accepted: dict[str, str] = {}  # event id -> user id
    refused: list[str] = []
    for field in EVENT_FIELDS:
        for payload in [*INJECTIONS, "view", "cart"]:
            event = _event(field, payload)
            resp = gateway.post(
                "/api/v1/events",
                content=as_json([event]),
                headers={"Content-Type": "application/json"},
            )
            assert_clean(resp, payload)
            if resp.status_code == 202:
                accepted[event["event_id"].lower()] = event["user_id"]
            else:
                assert resp.status_code == 422, resp.text
                if isinstance(event["event_id"], str) and len(event["event_id"]) == 36:
                    refused.append(event["event_id"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if db.counts("stats_events")["stats_events"] >= before + len(accepted):
            break
        time.sleep(0.2)
    assert db.counts("stats_events")["stats_events"] == before + len(accepted)
    rows = db.fetch(
        "SELECT event_id::text AS id, user_id FROM stats_events WHERE event_id::text = ANY($1)",
        list(accepted) + [r.lower() for r in refused],
    )
    assert {r["id"]: r["user_id"] for r in rows} == accepted


# -- query parameters --------------------------------------------------------------

QUERY_PROBES = [
    ("/api/v1/products", "limit"),
    ("/api/v1/products", "after"),
    ("/api/v1/stats/top", "window"),
    ("/api/v1/stats/top", "limit"),
    ("/api/v1/stats/products/1", "window"),
]
UNKNOWN_PARAMETERS = ["sort", "order", "order_by", "sort_by", "filter", "q", "where", "id"]


@pytest.mark.parametrize(("path", "name"), QUERY_PROBES)
def test_in9_query_parameters(gateway: httpx.Client, db: Database, path: str, name: str) -> None:
    """Integers given injections: 422, nothing written."""
    before = db.counts()
    for payload in PATH_INJECTIONS:
        resp = gateway.get(path, params={name: payload})
        assert_clean(resp, payload)
        assert resp.status_code == 422, (name, payload[:100], resp.text)
    assert db.counts() == before


METRICS = ["views", "carts", "purchases"]


@FUZZ
@given(metric=st.one_of(st.sampled_from(PATH_INJECTIONS), path_text))
def test_in9_ranking_metric_only_from_the_allowlist(gateway: httpx.Client, metric: str) -> None:
    """`metric` picks the ordering of /stats/top: the only sort-like parameter."""
    resp = gateway.get("/api/v1/stats/top", params={"metric": metric})
    assert_clean(resp, metric)
    if metric in METRICS:
        assert resp.status_code == 200
        assert resp.json()["metric"] == metric
    else:
        assert resp.status_code == 422, (metric, resp.text)


def test_in9_ranking_metric_allowlist_fixed(gateway: httpx.Client) -> None:
    for metric in METRICS:
        resp = gateway.get("/api/v1/stats/top", params={"metric": metric})
        assert resp.status_code == 200
    for metric in [*PATH_INJECTIONS, "VIEWS", "views ", "views;", "count", "product_id"]:
        resp = gateway.get("/api/v1/stats/top", params={"metric": metric})
        assert_clean(resp, metric)
        assert resp.status_code == 422, (metric, resp.text)


@pytest.mark.parametrize("path", ["/api/v1/products", "/api/v1/stats/top"])
def test_in9_unknown_parameters_such_as_sort_are_ignored(
    gateway: httpx.Client, db: Database, path: str
) -> None:
    """The API has no sort parameter: sort=... and the like change nothing."""
    plain = gateway.get(path)
    assert plain.status_code == 200
    before = db.counts()
    for name in UNKNOWN_PARAMETERS:
        for payload in PATH_INJECTIONS:
            resp = gateway.get(path, params={name: payload})
            assert_clean(resp, payload)
            assert resp.status_code == 200, (name, payload[:100], resp.text)
            if path == "/api/v1/products":
                assert resp.json() == plain.json()
    assert db.counts() == before
