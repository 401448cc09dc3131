"""Schemathesis hooks for IN-1 (tests/test_schemathesis.py), loaded by the `st` CLI
through SCHEMATHESIS_HOOKS.

Each hook does for a generated request what any real client has to do and what no
JSON schema can say. None of them touches a request whose generated value is already
invalid, so negative cases stay negative:

- A valid `Idempotency-Key` of an order, payment or charge gets a unique suffix. A real client
  makes a fresh key per logical request; Hypothesis draws keys from a small space
  ("0", "A", ...), so two different bodies would share a key and the documented
  `422 idempotency-mismatch` would count as a rejected schema-valid request.
- A valid-looking `PSP-Signature` on a provider callback is replaced by the real
  HMAC-SHA256 over "<t>.<raw body>" with the configured secret and the current time
  (SHOPSTACK_PSP_WEBHOOK_SECRET), computed over the exact bytes sent. A signature is
  a function of the body and a secret; a generator cannot draw one.
- Event times (`ts`) with an offset are moved to the current time in the same offset:
  stats accepts events at most SHOPSTACK_STATS_MAX_AGE_S old and MAX_FUTURE_S ahead of
  *now*, a window relative to the clock that a static schema cannot express.
- A flash sale whose drawn `ends_at` is not after its `starts_at` gets an ordered
  window (swapped, or one second long when both are equal): the catalog refuses an
  empty or inverted window with 422, a rule across two fields that JSON Schema has no
  keyword for (it is in the FlashSale description).
- About half the drawn `order_id`s of `POST /api/v1/payments` (those whose UUID is
  even) are replaced by an order the same user has just reserved through the gateway
  (product SHOPSTACK_IN1_ORDER_PRODUCT): an order id lives in the catalog, another
  service's document, so no link can carry one here, and without real orders only the
  unknown-order path would ever be reached. The same goes for the `{order_id}` of the
  catalog's internal API (a token of demo1's from SHOPSTACK_IN1_TOKEN reserves them).
- After each `POST /_sandbox/faults` the sandbox's faults are reset, so a drawn
  `latency_ms: 60000` or `timeout_rate: 1` does not stall every later charge.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import time
import uuid
from datetime import datetime, timedelta
from typing import Any

import requests
import requests.auth
import schemathesis

# The keys each operation's schema accepts, short enough (<= 255 - 33) to take the suffix.
_KEYS = {
    "/api/v1/orders": re.compile(r"^[\x21-\x7e]{1,222}$"),
    "/api/v1/payments": re.compile(r"^[\x20-\x7e]{1,222}$"),
    "/v1/charges": re.compile(r"^.{1,222}$", re.S),
}
_SUFFIXED = re.compile(r"-[0-9a-f]{32}$")
PAYMENTS_PATH = "/api/v1/payments"
CALLBACK_PATH = "/api/v1/payments/callbacks/psp"
ADMIN_PRODUCT_PATH = "/api/v1/admin/products/{product_id}"
INTERNAL_ORDER_PATH = "/internal/v1/orders/{order_id}"
SIGNATURE = re.compile(r"^t=[0-9]{1,12}(,v1=[0-9a-f]{64}){1,8}$")
EVENTS_PATH = "/api/v1/events"
FAULTS_PATH = "/_sandbox/faults"


class PspSigner(requests.auth.AuthBase):
    """Signs the prepared request's exact body, as the provider does."""

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        raw = body.encode() if isinstance(body, str) else body
        stamp = str(int(time.time()))
        digest = hmac.new(self.secret, stamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
        request.headers["PSP-Signature"] = f"t={stamp},v1={digest}"
        return request


def _header(case: Any, name: str) -> Any:
    for key, value in (case.headers or {}).items():
        if key.lower() == name.lower():
            return key, value
    return None, None


def _unique_key(case: Any) -> None:
    pattern = _KEYS.get(case.operation.path)
    name, key = _header(case, "Idempotency-Key")
    if pattern is None or not isinstance(key, str) or _SUFFIXED.search(key):
        return  # not ours to change, or already made unique (a case can be sent again)
    if pattern.match(key):
        case.headers[name] = f"{key}-{uuid.uuid4().hex}"


def _sign(case: Any, kwargs: dict[str, Any]) -> None:
    _, value = _header(case, "PSP-Signature")
    if isinstance(value, str) and SIGNATURE.match(value):
        kwargs["auth"] = PspSigner(os.environ["SHOPSTACK_PSP_WEBHOOK_SECRET"])


def _now_in_offset(ts: Any) -> Any:
    parsed = _aware(ts)
    return ts if parsed is None else datetime.now(parsed.tzinfo).isoformat()


def _recent_events(case: Any) -> None:
    if isinstance(case.body, list):
        for event in case.body:
            if isinstance(event, dict) and "ts" in event:
                event["ts"] = _now_in_offset(event["ts"])


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None


def _ordered_sale(case: Any) -> None:
    sale = case.body.get("flash_sale") if isinstance(case.body, dict) else None
    if not isinstance(sale, dict):
        return
    start, end = _aware(sale.get("starts_at")), _aware(sale.get("ends_at"))
    if start is None or end is None or end > start:
        return
    if end < start:
        sale["starts_at"], sale["ends_at"] = sale["ends_at"], sale["starts_at"]
        return
    with contextlib.suppress(OverflowError):
        sale["ends_at"] = (start + timedelta(seconds=1)).isoformat()


def _is_even_uuid(value: Any) -> bool:
    """A drawn (not reserved here) UUID whose number is even: half of them."""
    try:
        return isinstance(value, str) and value not in _RESERVED and uuid.UUID(value).int % 2 == 0
    except ValueError:
        return False


_RESERVED: set[str] = set()  # orders made here: a link may pass one on, keep it then


def _reserve(gateway: str, authorization: str) -> str | None:
    """A fresh reserved order of the token's user, or None."""
    reply = requests.post(
        gateway.rstrip("/") + "/api/v1/orders",
        json={"product_id": int(os.environ["SHOPSTACK_IN1_ORDER_PRODUCT"]), "quantity": 1},
        headers={"Authorization": authorization},
        timeout=10,
    )
    if reply.status_code != 201:
        return None
    order = str(reply.json()["id"])
    _RESERVED.add(order)
    return order


def _real_order(case: Any) -> None:
    body = case.body
    _, token = _header(case, "Authorization")
    if isinstance(body, dict) and _is_even_uuid(body.get("order_id")) and isinstance(token, str):
        order = _reserve(case.operation.schema.get_base_url(), token)
        if order is not None:
            body["order_id"] = order


def _real_internal_order(case: Any) -> None:
    params = case.path_parameters
    if isinstance(params, dict) and _is_even_uuid(params.get("order_id")):
        order = _reserve(
            os.environ["SHOPSTACK_IN1_GATEWAY"], f"Bearer {os.environ['SHOPSTACK_IN1_TOKEN']}"
        )
        if order is not None:
            params["order_id"] = order


@schemathesis.hook
def before_call(context: schemathesis.HookContext, case: Any, kwargs: dict[str, Any]) -> None:
    path = case.operation.path
    if path.startswith(INTERNAL_ORDER_PATH):
        _real_internal_order(case)
    if path == ADMIN_PRODUCT_PATH and case.method.upper() == "PUT":
        _ordered_sale(case)
    if case.method.upper() != "POST":
        return
    if path in _KEYS:
        _unique_key(case)
    if path == PAYMENTS_PATH:
        _real_order(case)
    elif path == CALLBACK_PATH:
        _sign(case, kwargs)
    elif path == EVENTS_PATH:
        _recent_events(case)


@schemathesis.hook
def after_call(context: schemathesis.HookContext, case: Any, response: Any) -> None:
    if case.operation.path == FAULTS_PATH and case.method.upper() == "POST":
        base = case.operation.schema.get_base_url().rstrip("/")
        requests.post(base + FAULTS_PATH, json={"reset": True}, timeout=10).raise_for_status()
