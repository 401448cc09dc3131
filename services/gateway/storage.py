"""Every SQL statement of the gateway (users), one function per query."""

from __future__ import annotations

from typing import Any

from services.common.db import Executor


async def fetch_user(conn: Executor, username: str) -> Any:
    """id, username, password_hash and role of a user, or None."""
    return await conn.fetchrow(
        "SELECT id, username, password_hash, role FROM users WHERE username = $1", username
    )


async def update_password_hash(conn: Executor, user_id: int, password_hash: str) -> None:
    """Store a re-hashed password (parameters were raised since it was set)."""
    await conn.execute("UPDATE users SET password_hash = $2 WHERE id = $1", user_id, password_hash)


async def existing_usernames(conn: Executor, usernames: list[str]) -> set[str]:
    """Which of these usernames already exist."""
    rows = await conn.fetch(
        "SELECT username FROM users WHERE username = ANY($1::text[])", usernames
    )
    return {row["username"] for row in rows}


async def insert_users(conn: Executor, rows: list[tuple[str, str, str]]) -> int:
    """Insert (username, password_hash, role) rows, skipping existing names."""
    inserted = await conn.fetchval(
        """
        WITH ins AS (
            INSERT INTO users (username, password_hash, role)
            SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
            ON CONFLICT (username) DO NOTHING
            RETURNING 1
        )
        SELECT count(*) FROM ins
        """,
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
    )
    return int(inserted)
