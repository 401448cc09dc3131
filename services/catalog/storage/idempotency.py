"""Idempotency-Key records."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from services.catalog.storage.orders import count_queries
from services.common.db import Executor


async def claim_idempotency_key(
    conn: Executor,
    *,
    user_id: str,
    scope: str,
    key: str,
    request_hash: bytes,
    order_id: UUID,
    now: datetime,
    locked_until: datetime,
    expires_at: datetime,
) -> bool:
    """Insert a new key record (in flight); False when the key already exists."""
    count_queries()
    inserted = await conn.fetchval(
        """
        INSERT INTO idempotency_keys (user_id, scope, key, request_hash, order_id,
                                      locked_until, created_at, expires_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
        ON CONFLICT DO NOTHING
        RETURNING true
        """,
        user_id,
        scope,
        key,
        request_hash,
        order_id,
        locked_until,
        now,
        expires_at,
    )
    return bool(inserted)


async def fetch_idempotency_key(conn: Executor, *, user_id: str, scope: str, key: str) -> Any:
    count_queries()
    return await conn.fetchrow(
        """
        SELECT request_hash, order_id, response_status, response_body, locked_until, expires_at
        FROM idempotency_keys WHERE user_id = $1 AND scope = $2 AND key = $3
        """,
        user_id,
        scope,
        key,
    )


async def take_over_idempotency_key(
    conn: Executor,
    *,
    user_id: str,
    scope: str,
    key: str,
    now: datetime,
    locked_until: datetime,
) -> bool:
    """Take an in-flight key whose lock lapsed (its first worker died)."""
    count_queries()
    taken = await conn.fetchval(
        """
        UPDATE idempotency_keys SET locked_until = $5
        WHERE user_id = $1 AND scope = $2 AND key = $3
          AND response_status IS NULL AND locked_until <= $4 AND expires_at > $4
        RETURNING true
        """,
        user_id,
        scope,
        key,
        now,
        locked_until,
    )
    return bool(taken)


async def unlock_idempotency_key(
    conn: Executor, *, user_id: str, scope: str, key: str, now: datetime
) -> None:
    """Let a retry take an unfinished key over at once (its attempt failed)."""
    count_queries()
    await conn.execute(
        """
        UPDATE idempotency_keys SET locked_until = $4
        WHERE user_id = $1 AND scope = $2 AND key = $3 AND response_status IS NULL
        """,
        user_id,
        scope,
        key,
        now,
    )


async def delete_idempotency_key(
    conn: Executor, *, user_id: str, scope: str, key: str, only_expired_at: datetime | None = None
) -> None:
    """Forget a key (after a failure nobody should replay, or once it expired)."""
    count_queries()
    await conn.execute(
        """
        DELETE FROM idempotency_keys WHERE user_id = $1 AND scope = $2 AND key = $3
          AND ($4::timestamptz IS NULL OR expires_at <= $4)
        """,
        user_id,
        scope,
        key,
        only_expired_at,
    )


async def store_idempotent_response(
    conn: Executor, *, user_id: str, scope: str, key: str, status: int, body: bytes
) -> None:
    count_queries()
    await conn.execute(
        """
        UPDATE idempotency_keys SET response_status = $4, response_body = $5
        WHERE user_id = $1 AND scope = $2 AND key = $3
        """,
        user_id,
        scope,
        key,
        status,
        body,
    )


async def purge_idempotency_keys(conn: Executor, *, now: datetime, limit: int) -> int:
    """Delete up to `limit` expired keys; return how many."""
    result = await conn.fetchval(
        """
        WITH gone AS (
            DELETE FROM idempotency_keys WHERE ctid IN (
                SELECT ctid FROM idempotency_keys WHERE expires_at <= $1 LIMIT $2
            ) RETURNING 1
        ) SELECT count(*) FROM gone
        """,
        now,
        limit,
    )
    return int(result)
