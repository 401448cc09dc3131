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
    """One event as the writer reads it (a tuple: decoding thousands a second is cheap)."""

    event_id: str  # canonical text form; Postgres parses it (a bad one fails the write)
    code: str  # v, c or p
    product_id: int
    user_id: str
    ts_us: int
    line: str  # the encoded form, kept for the dead-letter stream

    @property
    def type(self) -> str:
        return TYPES_BY_CODE[self.code]

    @property
    def ts(self) -> datetime:
        return EPOCH + timedelta(microseconds=self.ts_us)


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


def decode_line(line: str) -> Event:
    """Parse one event line; CorruptEntry when it is not a valid event."""
    try:
        version, event_id, code, product_id, ts_us, user_id = line.split("|", 5)
        event = Event(event_id, code, int(product_id), user_id, int(ts_us), line)
    except ValueError:
        raise CorruptEntry("undecodable event line") from None
    if version != FORMAT_VERSION or code not in TYPES_BY_CODE:
        raise CorruptEntry("unknown event format or type")
    if event.product_id < 1 or not user_id or len(event_id) != 36:
        raise CorruptEntry("event breaks the event rules")
    return event


def decode_batch(payload: bytes | None) -> list[Event]:
    """Every event of an entry's payload; CorruptEntry when any is not valid."""
    if not payload:
        raise CorruptEntry("entry has no events")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptEntry("entry is not UTF-8") from None
    return [decode_line(line) for line in text.split("\n")]
