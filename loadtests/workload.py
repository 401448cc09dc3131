"""What the scenarios send: request shapes, skewed product ids, signed callbacks, data files.

The wrk Lua scripts and the open-model generator build the same requests from
the same data files, so the closed and open runs of a scenario differ only in
how requests are paced.
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import json
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path

FLASH_SALE_IDS = 10
LONG_TAIL_IDS = 1000
ZIPF_S = 1.1


@dataclass(frozen=True)
class HttpRequest:
    """One request as the generators send it."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def render(self, host: str, *, close: bool) -> bytes:
        """Serialise as HTTP/1.1 bytes."""
        lines = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        if self.body or self.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close" if close else "Connection: keep-alive")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + self.body


def zipf_weights(count: int, s: float = ZIPF_S) -> list[float]:
    """Zipf-like popularity of ranks 1..count: weight(k) = 1 / k**s, normalised."""
    raw = [1.0 / (k**s) for k in range(1, count + 1)]
    total = sum(raw)
    return [w / total for w in raw]


class ZipfIds:
    """Draws product ids 1..count, id 1 the most popular (the same law as product.lua)."""

    def __init__(self, count: int, s: float = ZIPF_S, seed: int | None = None) -> None:
        self.cdf = list(accumulate(zipf_weights(count, s)))
        self.rng = random.Random(seed)

    def draw(self) -> int:
        return min(bisect.bisect_left(self.cdf, self.rng.random()), len(self.cdf) - 1) + 1


def product_request(product_id: int) -> HttpRequest:
    return HttpRequest("GET", f"/api/v1/products/{product_id}", {"Accept": "application/json"})


def client_address(n: int) -> str:
    """A stable private address per simulated client (sent as X-Forwarded-For)."""
    return f"10.{(n >> 16) & 0xFF}.{(n >> 8) & 0xFF}.{n & 0xFF or 1}"


def demo_credentials(n: int) -> dict[str, str]:
    return {"username": f"demo{n}", "password": f"demo-password-{n}"}


def login_request(n: int) -> HttpRequest:
    body = json.dumps(demo_credentials(n), separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "X-Forwarded-For": client_address(n)}
    return HttpRequest("POST", "/api/v1/auth/login", headers, body)


@dataclass(frozen=True)
class PaymentPair:
    """A logged-in user's token and one fresh reserved order of theirs."""

    token: str
    order_id: str
    client: str  # the user's X-Forwarded-For address


def payment_request(pair: PaymentPair) -> HttpRequest:
    body = json.dumps({"order_id": pair.order_id}, separators=(",", ":")).encode()
    headers = {
        "Authorization": f"Bearer {pair.token}",
        "Content-Type": "application/json",
        "Idempotency-Key": f"lt-{pair.order_id}",
        "X-Forwarded-For": pair.client,
    }
    return HttpRequest("POST", "/api/v1/payments", headers, body)


@dataclass(frozen=True)
class OwnedPayment:
    """A real payment and its owner: the token that may read it and the owner's address."""

    token: str
    payment_id: str
    client: str  # the owner's X-Forwarded-For address


def payment_status_request(owned: OwnedPayment) -> HttpRequest:
    """What a checkout page polls after paying: the owner reading their payment."""
    headers = {
        "Accept": "application/json",
        "Authorization": f"Bearer {owned.token}",
        "X-Forwarded-For": owned.client,
    }
    return HttpRequest("GET", f"/api/v1/payments/{owned.payment_id}", headers)


CALLBACK_PATH = "/api/v1/payments/callbacks/psp"


@dataclass(frozen=True)
class PaymentRef:
    """What a provider callback names: the payment, its charge and amount."""

    payment_id: str
    charge_id: str
    amount_cents: int
    currency: str


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The PSP-Signature header value: t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def callback_body(event_id: str, ref: PaymentRef, created: int | None = None) -> bytes:
    doc = {
        "id": event_id,
        "type": "charge.succeeded",
        "created": int(time.time()) if created is None else created,
        "data": {
            "charge_id": ref.charge_id,
            "payment_id": ref.payment_id,
            "amount_cents": ref.amount_cents,
            "currency": ref.currency,
        },
    }
    return json.dumps(doc, separators=(",", ":")).encode()


@dataclass(frozen=True)
class SignedEvent:
    event_id: str
    signature: str
    body: bytes


def callback_request(event: SignedEvent) -> HttpRequest:
    headers = {"Content-Type": "application/json", "PSP-Signature": event.signature}
    return HttpRequest("POST", CALLBACK_PATH, headers, event.body)


def signed_events(
    secret: str, refs: Sequence[PaymentRef], count: int, prefix: str
) -> list[SignedEvent]:
    """`count` distinct events (ids `<prefix>-<n>`), spread over `refs`, signed now."""
    now = int(time.time())
    events: list[SignedEvent] = []
    for n in range(count):
        event_id = f"{prefix}-{n}"
        body = callback_body(event_id, refs[n % len(refs)], created=now)
        events.append(SignedEvent(event_id, sign(secret, body, now), body))
    return events


def new_event_prefix() -> str:
    return f"evt_lt_{uuid.uuid4().hex[:12]}"


# Data files shared by the Lua scripts and the open-model generator: one record a
# line, tab-separated, nothing that needs escaping (tokens, uuids, compact JSON).


def write_pairs(path: Path, pairs: Sequence[PaymentPair]) -> Path:
    path.write_text("".join(f"{p.token}\t{p.order_id}\t{p.client}\n" for p in pairs))
    return path


def read_pairs(path: Path) -> list[PaymentPair]:
    return [PaymentPair(*line.split("\t")) for line in _lines(path)]


def write_owned_payments(path: Path, owned: Sequence[OwnedPayment]) -> Path:
    path.write_text("".join(f"{o.token}\t{o.payment_id}\t{o.client}\n" for o in owned))
    return path


def read_owned_payments(path: Path) -> list[OwnedPayment]:
    return [OwnedPayment(*line.split("\t")) for line in _lines(path)]


def write_events(path: Path, events: Sequence[SignedEvent]) -> Path:
    path.write_bytes(b"".join(f"{e.signature}\t".encode() + e.body + b"\n" for e in events))
    return path


def read_events(path: Path) -> list[SignedEvent]:
    out: list[SignedEvent] = []
    for line in _lines(path):
        signature, body = line.split("\t", 1)
        event_id = str(json.loads(body)["id"])
        out.append(SignedEvent(event_id, signature, body.encode()))
    return out


def _lines(path: Path) -> Iterator[str]:
    for line in path.read_text().splitlines():
        if line.strip():
            yield line
