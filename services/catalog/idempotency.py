"""Idempotency-Key handling (Stripe / IETF draft semantics), scoped per user.

The first request with a key records it "in flight" together with the order id
it will use. Its reply (status and body, errors included) is stored when it
finishes; the same key with the same body then gets that reply again, with a
different body a 422, and while the first is still running a 409. A request that
failed with a 5xx leaves the key unlocked, and a request whose worker died
leaves it locked only until `catalog_idempotency_lock_s`: a retry then takes it
over with the same order id, so the order is still made at most once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import orjson

from services.catalog import storage
from services.catalog.settings import CatalogSettings
from services.common.errors import IdempotencyInProgress, IdempotencyMismatch, Problem

SCOPE_CREATE_ORDER = "POST /api/v1/orders"

# (order id, is this a takeover of an abandoned attempt) -> (status, body)
Action = Callable[[UUID, bool], Awaitable[tuple[int, bytes]]]


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    replayed: bool


def request_hash(document: dict[str, Any]) -> bytes:
    """Fingerprint of a parsed request body (key order and spacing do not matter)."""
    return hashlib.sha256(orjson.dumps(document, option=orjson.OPT_SORT_KEYS)).digest()


async def run_once(
    *,
    pool: asyncpg.Pool,
    settings: CatalogSettings,
    user_id: str,
    scope: str,
    key: str,
    fingerprint: bytes,
    action: Action,
) -> Reply:
    """Run `action` at most once per (user, scope, key); replay its stored reply after."""
    ident = {"user_id": user_id, "scope": scope, "key": key}
    order_id = uuid4()
    takeover = False
    for _ in range(3):
        now = datetime.now(UTC)
        lock = now + timedelta(seconds=settings.catalog_idempotency_lock_s)
        if await storage.claim_idempotency_key(
            pool,
            **ident,
            request_hash=fingerprint,
            order_id=order_id,
            now=now,
            locked_until=lock,
            expires_at=now + timedelta(seconds=settings.catalog_idempotency_ttl_s),
        ):
            break
        row = await storage.fetch_idempotency_key(pool, **ident)
        if row is None:
            continue  # deleted in between: claim again
        if row["expires_at"] <= now:
            await storage.delete_idempotency_key(pool, **ident, only_expired_at=now)
            continue
        if bytes(row["request_hash"]) != fingerprint:
            raise IdempotencyMismatch("this Idempotency-Key was used with a different request body")
        if row["response_status"] is not None:
            return Reply(row["response_status"], bytes(row["response_body"]), replayed=True)
        if row["locked_until"] > now or not await storage.take_over_idempotency_key(
            pool, **ident, now=now, locked_until=lock
        ):
            raise IdempotencyInProgress(
                "a request with this Idempotency-Key is still being processed",
                headers={"Retry-After": "1"},
            )
        order_id, takeover = row["order_id"], True
        break
    else:
        raise IdempotencyInProgress(
            "a request with this Idempotency-Key is still being processed",
            headers={"Retry-After": "1"},
        )
    try:
        status, body = await action(order_id, takeover)
    except Problem as problem:
        if problem.status >= 500:
            await _unlock(pool, ident)
        else:
            await storage.store_idempotent_response(
                pool, **ident, status=problem.status, body=orjson.dumps(problem.body())
            )
        raise
    except BaseException:
        await _unlock(pool, ident)
        raise
    await storage.store_idempotent_response(pool, **ident, status=status, body=body)
    return Reply(status, body, replayed=False)


async def _unlock(pool: asyncpg.Pool, ident: dict[str, str]) -> None:
    """Let a retry take the key over at once (same order id, so still at most one order)."""
    try:
        await storage.unlock_idempotency_key(pool, **ident, now=datetime.now(UTC))
    except (asyncpg.PostgresError, OSError, TimeoutError):
        return  # the lock lapses by itself after catalog_idempotency_lock_s
