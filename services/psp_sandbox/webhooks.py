"""Signed provider events, as the sandbox sends them.

`PSP-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`;
every delivery attempt is signed afresh with the time it is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import uuid

import orjson

from services.psp_sandbox.schemas import Charge

SIGNATURE_HEADER = "PSP-Signature"


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 over "<t>.<raw body>"."""
    message = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def signature_header(secret: str, body: bytes, *, timestamp: int | None = None) -> str:
    """The PSP-Signature header value for `body`."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={signature(secret, t, body)}"


def charge_event(charge: Charge, *, status: str, created: int) -> bytes:
    """One event body: charge.succeeded or charge.failed for `charge`."""
    return orjson.dumps(
        {
            "id": "evt_" + uuid.uuid4().hex,
            "type": f"charge.{status}",
            "created": created,
            "data": {
                "charge_id": charge.id,
                "payment_id": charge.reference,
                "amount_cents": charge.amount_cents,
                "currency": charge.currency,
            },
        }
    )
