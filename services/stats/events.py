"""Accepted batches as they travel through the stream: a compact, versioned text form.

One stream entry holds one accepted batch: field `n` is its event count and field
`e` its events, one per line: `1|<event_id>|<v|c|p>|<product_id>|<ts epoch µs>|<user_id>`.
The user id comes last so it may contain `|`; it never contains a line break
(control characters are refused at the door).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from services.stats.schemas import EventIn

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FORMAT_VERSION = "1"
TYPE_CODES = {"view": "v", "cart": "c", "purchase": "p"}
TYPES_BY_CODE = {code: name for name, code in TYPE_CODES.items()}
PAYLOAD_FIELD = b"e"
COUNT_FIELD = b"n"


class CorruptEntry(ValueError):
    """A stream entry that cannot be decoded; retrying cannot help."""


class Event(NamedTuple):
    """One event as the writer reads it: also, field for field, its staging-table row.

    A tuple, so the thousands decoded a second cost little and go to COPY as they are.
    """

    event_id: str  # canonical text form; Postgres parses it (a bad one fails the write)
    type: str  # view, cart or purchase
    product_id: int
    user_id: str
    ts_us: int  # event time, epoch microseconds
    received_ms: int  # when its entry was accepted (the entry id's time), epoch ms
    stream_id: str  # its entry

    @property
    def code(self) -> str:
        return TYPE_CODES[self.type]

    @property
    def ts(self) -> datetime:
        return EPOCH + timedelta(microseconds=self.ts_us)

    @property
    def line(self) -> str:
        """Its line in the stream (kept for the dead-letter stream)."""
        return (
            f"{FORMAT_VERSION}|{self.event_id}|{self.code}|{self.product_id}|{self.ts_us}|"
            f"{self.user_id}"
        )


def epoch_us(moment: datetime) -> int:
    """Exact microseconds since the epoch of an aware datetime.

    The whole seconds come from timestamp() (a correctly rounded float: for any
    date before 2100 the fraction never rounds up into the next second) and the
    microseconds from the datetime itself, so nothing is lost to float rounding.
    """
    return math.floor(moment.timestamp()) * 1_000_000 + moment.microsecond


def encode_event(event: EventIn, ts_us: int) -> str:
    """One event's line (event ids in lower case, as Postgres prints them)."""
    return (
        f"{FORMAT_VERSION}|{event.event_id.lower()}|{TYPE_CODES[event.type]}|{event.product_id}|"
        f"{ts_us}|{event.user_id}"
    )


def decode_batch(payload: bytes | None, *, stream_id: str, received_ms: int) -> list[Event]:
    """Every event of an entry's payload; CorruptEntry when any is not valid."""
    if not payload:
        raise CorruptEntry("entry has no events")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptEntry("entry is not UTF-8") from None
    types, new = TYPES_BY_CODE, tuple.__new__  # Event(...) without its Python-level __new__
    events = []
    for line in text.split("\n"):
        try:
            version, event_id, code, product_id, ts_us, user_id = line.split("|", 5)
            event = new(
                Event,
                (
                    event_id,
                    types[code],
                    int(product_id),
                    user_id,
                    int(ts_us),
                    received_ms,
                    stream_id,
                ),
            )
        except (ValueError, KeyError):
            raise CorruptEntry("undecodable event line, or unknown event type") from None
        if version != FORMAT_VERSION:
            raise CorruptEntry("unknown event format")
        if event.product_id < 1 or not user_id or len(event_id) != 36:
            raise CorruptEntry("event breaks the event rules")
        events.append(event)
    return events
