"""Every SQL statement of the stats service, one function per query."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.db import Connection

STAGING_TABLE = "stats_staging"
STAGING_COLUMNS = (
    "event_id",
    "type",
    "product_id",
    "user_id",
    "ts_us",
    "received_ms",
    "stream_id",
)

# (event_id, type, product_id, user_id, ts in epoch µs, received_at in epoch ms, stream_id):
# services.stats.events.Event is one. Times travel as integers: encoding a datetime
# costs the writer more than the whole rest of a row.
StagedEvent = tuple[str, str, int, str, int, int, str]


async def create_staging(conn: Connection) -> None:
    """The session's staging table: unlogged by nature (temporary), emptied at each commit."""
    await conn.execute(
        f"""
        CREATE TEMP TABLE IF NOT EXISTS {STAGING_TABLE} (
            event_id uuid, type text, product_id bigint, user_id text,
            ts_us bigint, received_ms bigint, stream_id text
        ) ON COMMIT DELETE ROWS
        """
    )


async def stage(conn: Connection, rows: Sequence[StagedEvent]) -> None:
    """Binary COPY of a batch into the staging table (inside the caller's transaction)."""
    await conn.copy_records_to_table(STAGING_TABLE, records=rows, columns=STAGING_COLUMNS)


async def insert_staged(conn: Connection) -> int:
    """Move staged events into stats_events, once per event_id; return how many were new.

    Rows go in event_id order so two writers holding the same ids never deadlock.
    Times travel as epoch micro- and milliseconds and become timestamptz here, exactly.
    """
    status = await conn.execute(
        f"""
        INSERT INTO stats_events
            (event_id, type, product_id, user_id, ts, received_at, stream_id)
        SELECT event_id, type, product_id, user_id,
               timestamptz 'epoch' + ts_us * interval '1 microsecond',
               timestamptz 'epoch' + received_ms * interval '1 millisecond', stream_id
        FROM {STAGING_TABLE}
        ORDER BY event_id
        ON CONFLICT (event_id) DO NOTHING
        """  # noqa: S608 (constant table name)
    )
    return int(status.rsplit(" ", 1)[1])  # "INSERT 0 <rows>"


async def staged_owners(conn: Connection) -> list[tuple[str, str]]:
    """(event_id, entry) pairs of staged events whose row was inserted by that same entry.

    Run after insert_staged when it did not insert every staged row: it finds the rows
    this insert added, rows an earlier, interrupted attempt of the same entry committed,
    and rows another writer committed for the same entry while this insert waited.
    """
    rows = await conn.fetch(
        f"""
        SELECT DISTINCT e.event_id::text, e.stream_id
        FROM {STAGING_TABLE} s
        JOIN stats_events e ON e.event_id = s.event_id AND e.stream_id = s.stream_id
        """  # noqa: S608 (constant table name)
    )
    return [(row[0], row[1]) for row in rows]


async def owned_by_entry(conn: Connection, event_ids: list[str], stream_id: str) -> list[str]:
    """Which of these events are stored with `stream_id` as the entry that inserted them."""
    rows = await conn.fetch(
        """
        SELECT event_id::text FROM stats_events
        WHERE event_id = ANY($1::uuid[]) AND stream_id = $2
        """,
        event_ids,
        stream_id,
    )
    return [row[0] for row in rows]
