"""Idempotency-Key handling (IETF httpapi-idempotency-key draft, Stripe's semantics).

A key belongs to one user. The first request with it claims it (a row locked by
that request); once execution starts, its response (status, headers, body) is
stored and every later request with the same key and body gets those exact bytes
back with `Idempotent-Replayed: true`. A different body → 422; while the first
is running → 409. Responses are stored for 2xx and 4xx; a 5xx raised before
anything irreversible happened forgets the key so the client can try again. A key
whose request died mid-way is taken over after the lock timeout and resumed with
the same payment id, so it can never charge twice. Keys live at least 24 h.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import asyncpg
import orjson

from services.common.db import Executor
from services.common.errors import IdempotencyInProgress, IdempotencyMismatch
from services.payment import storage

REPLAYED_HEADER = "Idempotent-Replayed"


@dataclass(frozen=True)
class KeyClaim:
    """This request owns the key; the payment it creates (or resumes) has `payment_id`."""

    user_id: str
    key: str
    payment_id: uuid.UUID
    resumed: bool


@dataclass(frozen=True)
class StoredResponse:
    status: int
    headers: dict[str, str]
    body: bytes


def fingerprint(method: str, path: str, body: dict[str, object]) -> str:
    """What makes two requests "the same": method, path and the parsed body, canonically."""
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + canonical).hexdigest()


async def begin(
    pool: asyncpg.Pool, *, user_id: str, key: str, fingerprint: str, lock_s: float
) -> KeyClaim | StoredResponse:
    """Claim the key, or return the stored response; raise 422 / 409 as the draft says."""
    for _ in range(3):
        payment_id = uuid.uuid4()
        row = await storage.insert_key(
            pool, user_id=user_id, key=key, fingerprint=fingerprint, payment_id=payment_id
        )
        if row is not None:
            return KeyClaim(user_id, key, payment_id, resumed=False)
        row = await storage.fetch_key(pool, user_id=user_id, key=key)
        if row is None:  # forgotten between our insert and read: claim it afresh
            continue
        if row["fingerprint"] != fingerprint:
            raise IdempotencyMismatch("this Idempotency-Key was used with a different request body")
        if row["completed_at"] is not None:
            headers = orjson.loads(row["response_headers"] or "{}")
            return StoredResponse(row["response_status"], headers, bytes(row["response_body"]))
        taken = await storage.take_over_key(pool, user_id=user_id, key=key, lock_s=lock_s)
        if taken is not None:
            return KeyClaim(user_id, key, taken["payment_id"], resumed=True)
        raise IdempotencyInProgress(
            "a request with this Idempotency-Key is still being processed",
            headers={"Retry-After": "1"},
        )
    raise IdempotencyInProgress(
        "a request with this Idempotency-Key is still being processed",
        headers={"Retry-After": "1"},
    )


async def complete(conn: Executor, claim: KeyClaim, response: StoredResponse) -> None:
    """Store the first response under the key."""
    await storage.complete_key(
        conn,
        user_id=claim.user_id,
        key=claim.key,
        status=response.status,
        headers=orjson.dumps(response.headers).decode(),
        body=response.body,
    )


async def forget(conn: Executor, claim: KeyClaim) -> None:
    """Drop an unfinished key so the same key can be used again."""
    await storage.delete_unfinished_key(conn, user_id=claim.user_id, key=claim.key)
