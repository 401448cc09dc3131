"""Provider callback signatures: `PSP-Signature: t=<unix s>,v1=<hex>[,v1=<hex>...]`.

v1 = HMAC-SHA256(secret, "<t>.<raw body>"), compared in constant time against
every v1 given (a provider rotating secrets sends one per secret); the timestamp
must be within the tolerance of now in both directions, so a captured request
cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac

from services.common.errors import BadSignature

MAX_SIGNATURES = 8
MAX_HEADER_CHARS = 2048


def expected_signature(secret: str, timestamp: str, body: bytes) -> str:
    return hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def verify_signature(
    header: str | None, body: bytes, *, secret: str, tolerance_s: int, now: float
) -> None:
    """Raise BadSignature unless `header` signs `body` with `secret` at an acceptable time."""
    if not header or len(header) > MAX_HEADER_CHARS:
        raise BadSignature("missing or oversized PSP-Signature header")
    timestamps: list[str] = []
    signatures: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            timestamps.append(value)
        elif name == "v1":
            signatures.append(value)
    if len(timestamps) != 1 or not timestamps[0].isdigit() or len(timestamps[0]) > 12:
        raise BadSignature("PSP-Signature needs exactly one numeric t")
    if not signatures or len(signatures) > MAX_SIGNATURES:
        raise BadSignature("PSP-Signature needs 1 to 8 v1 signatures")
    if abs(now - int(timestamps[0])) > tolerance_s:
        raise BadSignature("PSP-Signature timestamp is outside the tolerance")
    expected = expected_signature(secret, timestamps[0], body).encode()
    matched = False
    for candidate in signatures:
        # Check every candidate (no early exit), each in constant time.
        matched |= hmac.compare_digest(expected, candidate.encode("ascii", "replace"))
    if not matched:
        raise BadSignature("no PSP-Signature v1 matches")
