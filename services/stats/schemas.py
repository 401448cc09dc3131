"""Stats request and response models (the API.md contract)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, Field

# Ids stay within I-JSON's exact integers (RFC 7493: +-(2**53 - 1)), which every JSON
# client, JavaScript's included, reads without rounding (Postgres stores them as bigint).
MAX_ID = 2**53 - 1
MAX_EVENTS = 1000
MAX_USER_ID_CHARS = 128
EventType = Literal["view", "cart", "purchase"]
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
USER_ID_PATTERN = r"^[^\x00-\x1f\x7f]+$"


class Metric(StrEnum):
    VIEWS = "views"
    CARTS = "carts"
    PURCHASES = "purchases"


class EventIn(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """One user-behaviour event. Types are strict: nothing is coerced.

    msgspec checks types, ranges, lengths and the time zone while it decodes. The two
    text patterns (UUID_PATTERN, and no control character in user_id) are checked
    by services.stats.domain, where most batches can skip the second one: their
    shape is documented here (extra_json_schema) and not checked twice.
    """

    event_id: Annotated[
        str,
        msgspec.Meta(
            min_length=36,
            max_length=36,
            description="Client-made UUID (8-4-4-4-12 hex, any case); stored once per id",
            extra_json_schema={"format": "uuid", "pattern": UUID_PATTERN},
        ),
    ]
    type: EventType
    # JSON (and JSON Schema's `integer`) has 4.0 for the integer 4: the decoder takes a
    # float too, services.stats.domain turns an integral one into the int and refuses a
    # fraction, and the documented schema stays `integer` (event_json_schema).
    product_id: (
        Annotated[int, msgspec.Meta(ge=1, le=MAX_ID)]
        | Annotated[float, msgspec.Meta(ge=1, le=MAX_ID)]
    )
    user_id: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=MAX_USER_ID_CHARS,
            description="No control characters (Postgres text has no NUL)",
            extra_json_schema={"pattern": USER_ID_PATTERN},
        ),
    ]
    ts: Annotated[
        datetime,
        msgspec.Meta(
            tz=True,
            description="RFC 3339 with an offset; at most SHOPSTACK_STATS_MAX_FUTURE_S ahead "
            "and SHOPSTACK_STATS_MAX_AGE_S old",
        ),
    ]


EVENT_BATCH = msgspec.json.Decoder(
    Annotated[list[EventIn], msgspec.Meta(min_length=1, max_length=MAX_EVENTS)]
)
"""Decodes and checks a whole batch (all but the two patterns) in one pass."""
RAW_BATCH = msgspec.json.Decoder(
    Annotated[list[msgspec.Raw], msgspec.Meta(min_length=1, max_length=MAX_EVENTS)]
)
"""Splits a batch into its events' raw JSON, to check them one by one (error reports)."""
ONE_EVENT = msgspec.json.Decoder(EventIn)


def event_json_schema() -> dict[str, Any]:
    """The JSON schema of one event (for the OpenAPI document)."""
    (_,), components = msgspec.json.schema_components(
        [EventIn], ref_template="#/components/schemas/{name}"
    )
    schema: dict[str, Any] = components["EventIn"]
    schema["properties"]["product_id"] = {"type": "integer", "minimum": 1, "maximum": MAX_ID}
    return schema


class Accepted(BaseModel):
    accepted: int


class EventError(BaseModel):
    index: int | None = Field(description="Position of the failing event; null: the whole body")
    loc: list[str | int]
    msg: str
    type: str


class ProductStats(BaseModel):
    product_id: int
    window_s: int
    views: int
    unique_visitors: int = Field(description="Distinct user_id over every event type (HLL)")
    carts: int
    purchases: int
    from_: datetime = Field(alias="from", description="Start of the event-time span counted")
    to: datetime = Field(description="End (exclusive) of the event-time span counted")


class TopItem(BaseModel):
    product_id: int
    count: int


class TopStats(BaseModel):
    metric: Metric
    window_s: int
    items: list[TopItem]
    from_: datetime = Field(alias="from")
    to: datetime


class TimeRange:
    """The event times accepted now: at most `max_future_s` ahead, `max_age_s` old."""

    def __init__(self, now_us: int, *, max_future_s: int, max_age_s: int) -> None:
        self.latest_us = now_us + max_future_s * 1_000_000
        self.earliest_us = now_us - max_age_s * 1_000_000
        self.max_future_s = max_future_s
        self.max_age_s = max_age_s

    def problem(self, ts_us: int) -> str | None:
        """Why an event time (epoch microseconds) is refused, or None."""
        if ts_us > self.latest_us:
            return f"ts is more than {self.max_future_s} s in the future"
        if ts_us < self.earliest_us:
            return f"ts is more than {self.max_age_s} s in the past"
        return None
