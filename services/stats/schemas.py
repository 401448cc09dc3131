"""Stats request and response models (the API.md contract)."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
)

MAX_ID = 2**63 - 1
MAX_EVENTS = 1000
MAX_USER_ID_CHARS = 128
EventType = Literal["view", "cart", "purchase"]
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


class Metric(StrEnum):
    VIEWS = "views"
    CARTS = "carts"
    PURCHASES = "purchases"


class EventIn(BaseModel):
    """One user-behaviour event. Types are strict: nothing is coerced."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    event_id: Annotated[
        str,
        Field(
            pattern=UUID_PATTERN,
            description="Client-made UUID (8-4-4-4-12 hex, any case); stored once per id",
            json_schema_extra={"format": "uuid"},
        ),
    ]
    type: EventType
    product_id: Annotated[int, Field(ge=1, le=MAX_ID)]
    user_id: Annotated[
        str,
        Field(
            min_length=1,
            max_length=MAX_USER_ID_CHARS,
            pattern=r"^[^\x00-\x1f\x7f]+$",  # no control characters (Postgres text has no NUL)
        ),
    ]
    ts: Annotated[
        AwareDatetime,
        Field(
            description="RFC 3339 with an offset; at most SHOPSTACK_STATS_MAX_FUTURE_S ahead "
            "and SHOPSTACK_STATS_MAX_AGE_S old"
        ),
    ]


EventBatch = Annotated[list[EventIn], Field(min_length=1, max_length=MAX_EVENTS)]
EVENT_BATCH: TypeAdapter[list[EventIn]] = TypeAdapter(EventBatch)


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
