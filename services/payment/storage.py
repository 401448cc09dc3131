"""Every SQL statement of the payment service, one function per query."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from services.common.db import Connection, Executor

_PAYMENT = """
    id, order_id, user_id, amount_cents, currency, status, provider, charge_id,
    failure_reason, refund_required, created_at, updated_at, last_attempt_at, settled_at
"""

# --- idempotency keys -------------------------------------------------------------


async def insert_key(
    conn: Executor, *, user_id: str, key: str, fingerprint: str, payment_id: uuid.UUID
) -> Any:
    """Claim a new key (locked by this request); None when the key already exists."""
    return await conn.fetchrow(
        """
        INSERT INTO payment_idempotency_keys (user_id, key, fingerprint, payment_id, locked_at)
        VALUES ($1, $2, $3, $4, clock_timestamp())
        ON CONFLICT (user_id, key) DO NOTHING
        RETURNING user_id, key, fingerprint, payment_id
        """,
        user_id,
        key,
        fingerprint,
        payment_id,
    )


async def fetch_key(conn: Executor, *, user_id: str, key: str) -> Any:
    return await conn.fetchrow(
        """
        SELECT user_id, key, fingerprint, payment_id, response_status, response_headers,
               response_body, locked_at, completed_at
        FROM payment_idempotency_keys WHERE user_id = $1 AND key = $2
        """,
        user_id,
        key,
    )


async def take_over_key(conn: Executor, *, user_id: str, key: str, lock_s: float) -> Any:
    """Re-lock an unfinished key whose lock is older than `lock_s` (its worker died)."""
    return await conn.fetchrow(
        """
        UPDATE payment_idempotency_keys SET locked_at = clock_timestamp()
        WHERE user_id = $1 AND key = $2 AND completed_at IS NULL
          AND locked_at < clock_timestamp() - make_interval(secs => $3)
        RETURNING user_id, key, fingerprint, payment_id
        """,
        user_id,
        key,
        lock_s,
    )


async def complete_key(
    conn: Executor, *, user_id: str, key: str, status: int, headers: str, body: bytes
) -> None:
    """Store the first response; later requests with the key get it back."""
    await conn.execute(
        """
        UPDATE payment_idempotency_keys
        SET response_status = $3, response_headers = $4::jsonb, response_body = $5,
            completed_at = clock_timestamp(), locked_at = NULL
        WHERE user_id = $1 AND key = $2 AND completed_at IS NULL
        """,
        user_id,
        key,
        status,
        headers,
        body,
    )


async def delete_unfinished_key(conn: Executor, *, user_id: str, key: str) -> None:
    """Forget a key whose request ended before doing anything worth repeating."""
    await conn.execute(
        "DELETE FROM payment_idempotency_keys "
        "WHERE user_id = $1 AND key = $2 AND completed_at IS NULL",
        user_id,
        key,
    )


async def expire_keys(conn: Executor, *, ttl_s: int, limit: int) -> int:
    """Delete keys older than the TTL (finished or abandoned); return how many went."""
    result = await conn.execute(
        """
        DELETE FROM payment_idempotency_keys WHERE ctid IN (
            SELECT ctid FROM payment_idempotency_keys
            WHERE created_at < clock_timestamp() - make_interval(secs => $1)
            LIMIT $2)
        """,
        float(ttl_s),
        limit,
    )
    return int(result.split()[-1])


# --- payments ---------------------------------------------------------------------


async def insert_payment(
    conn: Executor,
    *,
    payment_id: uuid.UUID,
    order_id: uuid.UUID,
    user_id: str,
    amount_cents: int,
    currency: str,
    provider: str,
    settle_after_s: float,
) -> Any:
    """A new payment in `created`, its charge attempt stamped now.

    None when the order already has a succeeded payment; UniqueViolation when it has
    one in flight.
    """
    return await conn.fetchrow(
        f"""
        INSERT INTO payments (id, order_id, user_id, amount_cents, currency, provider,
                              last_attempt_at, next_settle_at)
        SELECT $1, $2, $3, $4, $5, $6, clock_timestamp(),
               clock_timestamp() + make_interval(secs => $7)
        WHERE NOT EXISTS (
            SELECT 1 FROM payments WHERE order_id = $2 AND status = 'succeeded')
        RETURNING {_PAYMENT}
        """,  # noqa: S608
        payment_id,
        order_id,
        user_id,
        amount_cents,
        currency,
        provider,
        settle_after_s,
    )


async def fetch_payment(conn: Executor, payment_id: uuid.UUID) -> Any:
    return await conn.fetchrow(
        f"SELECT {_PAYMENT} FROM payments WHERE id = $1",  # noqa: S608
        payment_id,
    )


async def fetch_payment_for_update(conn: Connection, payment_id: uuid.UUID) -> Any:
    return await conn.fetchrow(
        f"SELECT {_PAYMENT} FROM payments WHERE id = $1 FOR UPDATE",  # noqa: S608
        payment_id,
    )


async def fetch_user_payment(conn: Executor, *, payment_id: uuid.UUID, user_id: str) -> Any:
    """The payment only when it belongs to the user (anyone else: None)."""
    return await conn.fetchrow(
        f"SELECT {_PAYMENT} FROM payments WHERE id = $1 AND user_id = $2",  # noqa: S608
        payment_id,
        user_id,
    )


_TRANSITION = f"""
    WITH moved AS (
        UPDATE payments SET
            status = $2,
            charge_id = COALESCE($4, charge_id),
            failure_reason = CASE WHEN $2 = 'failed' THEN $5 ELSE NULL END,
            updated_at = clock_timestamp(),
            settled_at = CASE WHEN $2 IN ('succeeded', 'failed')
                              THEN clock_timestamp() ELSE settled_at END
        WHERE id = $1 AND status = ANY($3::text[])
        RETURNING {_PAYMENT}
    ), queued AS (
        INSERT INTO payment_outbox (payment_id, order_id, kind)
        SELECT id, order_id, $6::text FROM moved WHERE $6::text IS NOT NULL
        ON CONFLICT (payment_id, kind) DO NOTHING
    )
"""  # noqa: S608

_ANSWERED = """
    , answered AS (
        UPDATE payment_idempotency_keys
        SET response_status = $9, response_headers = $10::jsonb, response_body = $11,
            completed_at = clock_timestamp(), locked_at = NULL
        WHERE user_id = $7 AND key = $8 AND completed_at IS NULL
          AND EXISTS (SELECT 1 FROM moved)
    )
"""


@dataclass(frozen=True)
class KeyAnswer:
    """The response to store under an idempotency key if (and only if) the payment moves."""

    user_id: str
    key: str
    status: int
    headers: str  # JSON object
    body: bytes


async def transition(
    conn: Executor,
    *,
    payment_id: uuid.UUID,
    status: str,
    from_statuses: list[str],
    charge_id: str | None,
    failure_reason: str | None,
    outbox_kind: str | None,
    answer: KeyAnswer | None = None,
) -> Any:
    """Move a payment to `status` if it is in one of `from_statuses`, queueing its outbox
    message (and storing `answer` under its idempotency key) in the same statement, so
    atomically; None when it did not move (then nothing is written)."""
    args: list[Any] = [payment_id, status, from_statuses, charge_id, failure_reason, outbox_kind]
    sql = _TRANSITION
    if answer is not None:
        sql += _ANSWERED
        args += [answer.user_id, answer.key, answer.status, answer.headers, answer.body]
    return await conn.fetchrow(sql + "SELECT * FROM moved", *args)  # noqa: S608


async def note_charge_attempt(
    conn: Executor, *, payment_id: uuid.UUID, settle_after_s: float
) -> None:
    """Record that a charge request is going out; the settle job looks again after a while."""
    await conn.execute(
        """
        UPDATE payments SET last_attempt_at = clock_timestamp(),
            next_settle_at = clock_timestamp() + make_interval(secs => $2)
        WHERE id = $1
        """,
        payment_id,
        settle_after_s,
    )


async def claim_unsettled(conn: Executor, *, limit: int, lease_s: float) -> list[Any]:
    """Due unsettled payments, leased to this caller for `lease_s` (SKIP LOCKED)."""
    return await conn.fetch(
        f"""
        UPDATE payments SET next_settle_at = clock_timestamp() + make_interval(secs => $2)
        WHERE id IN (
            SELECT id FROM payments
            WHERE status IN ('created', 'pending') AND next_settle_at <= clock_timestamp()
            ORDER BY next_settle_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED)
        RETURNING {_PAYMENT}, clock_timestamp() AS now
        """,  # noqa: S608
        limit,
        lease_s,
    )


async def mark_refund_required(conn: Executor, payment_id: uuid.UUID) -> None:
    await conn.execute("UPDATE payments SET refund_required = true WHERE id = $1", payment_id)


# --- provider events --------------------------------------------------------------


async def insert_event(
    conn: Connection,
    *,
    event_id: str,
    type_: str,
    payment_id: uuid.UUID | None,
    charge_id: str | None,
    created: int,
) -> bool:
    """Record an event id; False when it was seen before (waits for a concurrent twin)."""
    inserted = await conn.fetchval(
        """
        INSERT INTO payment_psp_events (event_id, type, payment_id, charge_id, created, applied)
        VALUES ($1, $2, $3, $4, $5, false)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING true
        """,
        event_id,
        type_,
        payment_id,
        charge_id,
        created,
    )
    return bool(inserted)


async def record_settled_event(
    conn: Executor,
    *,
    event_id: str,
    type_: str,
    payment_id: uuid.UUID,
    charge_id: str | None,
    created: int,
    settled: list[str],
    amount_cents: int,
    currency: str,
) -> tuple[bool, bool]:
    """Record an event about a payment that is already in one of `settled` (so the event
    has nothing left to do) with the matching amount, in one statement.

    Returns (settled, fresh): settled False means nothing was written (the payment is
    elsewhere, unknown or mismatched: take the full path); fresh False means the event
    id was recorded before (waits for a concurrent twin's commit).
    """
    row = await conn.fetchrow(
        """
        WITH p AS (
            SELECT 1 FROM payments
            WHERE id = $3 AND status = ANY($6::text[]) AND amount_cents = $7 AND currency = $8
        ), ev AS (
            INSERT INTO payment_psp_events (event_id, type, payment_id, charge_id, created,
                                            applied)
            SELECT $1, $2, $3, $4, $5, false WHERE EXISTS (SELECT 1 FROM p)
            ON CONFLICT (event_id) DO NOTHING
            RETURNING 1
        )
        SELECT EXISTS (SELECT 1 FROM p) AS settled, EXISTS (SELECT 1 FROM ev) AS fresh
        """,
        event_id,
        type_,
        payment_id,
        charge_id,
        created,
        settled,
        amount_cents,
        currency,
    )
    assert row is not None  # a SELECT without FROM always yields its one row
    return bool(row["settled"]), bool(row["fresh"])


async def mark_event_applied(conn: Connection, event_id: str) -> None:
    await conn.execute("UPDATE payment_psp_events SET applied = true WHERE event_id = $1", event_id)


# --- outbox -----------------------------------------------------------------------


async def claim_outbox(conn: Executor, *, limit: int, lease_s: float) -> list[Any]:
    """Due outbox messages in order, leased for `lease_s` (SKIP LOCKED)."""
    return await conn.fetch(
        """
        UPDATE payment_outbox SET
            next_attempt_at = clock_timestamp() + make_interval(secs => $2),
            attempts = attempts + 1
        WHERE id IN (
            SELECT id FROM payment_outbox
            WHERE delivered_at IS NULL AND dead_at IS NULL
              AND next_attempt_at <= clock_timestamp()
            ORDER BY id
            LIMIT $1
            FOR UPDATE SKIP LOCKED)
        RETURNING id, payment_id, order_id, kind, attempts
        """,
        limit,
        lease_s,
    )


async def outbox_delivered(conn: Executor, outbox_ids: list[int]) -> None:
    await conn.execute(
        "UPDATE payment_outbox SET delivered_at = clock_timestamp(), last_error = NULL "
        "WHERE id = ANY($1::bigint[])",
        outbox_ids,
    )


async def outbox_retry_later(conn: Executor, *, outbox_id: int, delay_s: float, error: str) -> None:
    await conn.execute(
        """
        UPDATE payment_outbox
        SET next_attempt_at = clock_timestamp() + make_interval(secs => $2), last_error = $3
        WHERE id = $1
        """,
        outbox_id,
        delay_s,
        error[:1000],
    )


async def outbox_dead(conn: Executor, *, outbox_id: int, error: str) -> None:
    await conn.execute(
        "UPDATE payment_outbox SET dead_at = clock_timestamp(), last_error = $2 WHERE id = $1",
        outbox_id,
        error[:1000],
    )
