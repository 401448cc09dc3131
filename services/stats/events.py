"""The event as it travels through the stream: a compact, versioned text encoding.

One stream entry holds one event in its `e` field:
`1|<event_id>|<v|c|p>|<product_id>|<ts in epoch microseconds>|<user_id>`.
The user id comes last, so it may contain `|`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from uuid import UUID

from services.stats.schemas import EventIn

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_MICROSECOND = timedelta(microseconds=1)
FORMAT_VERSION = "1"
TYPE_CODES = {"view": "v", "cart": "c", "purchase": "p"}
TYPES_BY_CODE = {code: name for name, code in TYPE_CODES.items()}
FIELD = b"e"


class CorruptEntry(ValueError):
    """A stream entry that cannot be decoded; retrying cannot help."""


@dataclass(frozen=True, slots=True)
class Event:
    event_id: UUID
    type: str
    product_id: int
    user_id: str
    ts_us: int

    @property
    def code(self) -> str:
        return TYPE_CODES[self.type]

    @property
    def ts(self) -> datetime:
        return EPOCH + timedelta(microseconds=self.ts_us)


def epoch_us(moment: datetime) -> int:
    """Exact microseconds since the epoch (no float rounding)."""
    return (moment - EPOCH) // ONE_MICROSECOND


def encode(event: EventIn) -> str:
    """The stream form of a validated event."""
    return (
        f"{FORMAT_VERSION}|{event.event_id}|{TYPE_CODES[event.type]}|{event.product_id}|"
        f"{epoch_us(event.ts)}|{event.user_id}"
    )


def decode(raw: bytes) -> Event:
    """Parse a stream entry's payload; CorruptEntry when it is not a valid event."""
    try:
        text = raw.decode("utf-8")
        version, event_id, code, product_id, ts_us, user_id = text.split("|", 5)
        if version != FORMAT_VERSION:
            raise CorruptEntry(f"unknown format version {version!r}")
        event = Event(
            event_id=UUID(event_id),
            type=TYPES_BY_CODE[code],
            product_id=int(product_id),
            user_id=user_id,
            ts_us=int(ts_us),
        )
    except CorruptEntry:
        raise
    except (UnicodeDecodeError, ValueError, KeyError) as exc:
        raise CorruptEntry(f"undecodable entry: {type(exc).__name__}") from None
    if event.product_id < 1 or not event.user_id:
        raise CorruptEntry("entry breaks the event rules")
    return event
