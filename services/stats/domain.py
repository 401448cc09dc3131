"""Stats use cases: accept a batch of events, answer window queries."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
from redis.exceptions import RedisError

from services.common.errors import Overloaded, UpstreamUnavailable, ValidationProblem
from services.stats import metrics
from services.stats.aggregates import Aggregates, ProductCounts
from services.stats.buckets import Cover, Tiers
from services.stats.events import encode_event, epoch_us
from services.stats.schemas import (
    EVENT_BATCH,
    ONE_EVENT,
    RAW_BATCH,
    USER_ID_PATTERN,
    UUID_PATTERN,
    EventIn,
    TimeRange,
)
from services.stats.stream import EventStream

log = logging.getLogger("shopstack.stats")

MAX_ERRORS_LISTED = 100


def _first_duplicate(pairs: list[tuple[str, Any]]) -> str | None:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    return None


def _duplicate_keys(body: bytes) -> list[dict[str, Any]]:
    """Events that repeat a member name (JSON parsers silently keep the last one)."""
    duplicated: dict[int, str] = {}

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            duplicated[id(obj)] = _first_duplicate(pairs) or ""
        return obj

    def refuse(constant: str) -> Any:
        raise ValueError(constant)

    try:
        doc = json.loads(body, object_pairs_hook=hook, parse_constant=refuse)
    except (ValueError, RecursionError):
        return []  # not JSON: the validator below names the problem
    if not duplicated or not isinstance(doc, list):
        return []
    return [
        {
            "index": index,
            "loc": [duplicated[id(item)]],
            "msg": "member name appears more than once",
            "type": "duplicate_key",
        }
        for index, item in enumerate(doc)
        if id(item) in duplicated
    ]


_UUID = re.compile(UUID_PATTERN.removeprefix("^").removesuffix("$"))
_USER_ID = re.compile(USER_ID_PATTERN.removeprefix("^").removesuffix("$"))
_NOT_JSON = (msgspec.DecodeError, ValueError, RecursionError)  # bad UTF-8 is a ValueError


def _cannot_repeat_keys(body: bytes, events: int) -> bool:
    """True when a valid batch's bytes leave no room for a repeated member name.

    Each valid event has 5 member names and 4 string values: 18 quote marks. With
    no backslash in the body every quote mark delimits a string, and a repeated
    member adds at least one more string, so exactly 18 per event proves there is
    none. Any other body takes the exact (slower) check.
    """
    return b"\\" not in body and body.count(b'"') == 18 * events


def _no_control_characters(body: bytes) -> bool:
    """True when no string of the body can hold a control character.

    JSON strings cannot hold a raw character below 0x20, only an escaped one (with a
    backslash); DEL (0x7f) may appear raw. A body with neither holds none.
    """
    return b"\\" not in body and b"\x7f" not in body


def _event_problem(event: EventIn, ts_us: int, ts_range: TimeRange) -> dict[str, Any] | None:
    """The first rule (beyond what the decoder checks) an event breaks, or None."""
    if isinstance(event.product_id, float) and not event.product_id.is_integer():
        return {"loc": ["product_id"], "msg": "product_id must be an integer", "type": "int_type"}
    if _UUID.fullmatch(event.event_id) is None:
        return {
            "loc": ["event_id"],
            "msg": "event_id is not a UUID (8-4-4-4-12 hex digits)",
            "type": "string_pattern_mismatch",
        }
    if _USER_ID.fullmatch(event.user_id) is None:
        return {
            "loc": ["user_id"],
            "msg": "user_id must not contain control characters",
            "type": "string_pattern_mismatch",
        }
    problem = ts_range.problem(ts_us)
    if problem:
        return {"loc": ["ts"], "msg": problem, "type": "ts_range"}
    return None


def _decode_error(exc: msgspec.ValidationError) -> dict[str, Any]:
    """loc, msg and type of msgspec's error about one event (it names the first only)."""
    text = str(exc)
    msg, _, where = text.partition(" - at `")
    loc: list[str | int] = [part for part in where.rstrip("`").split(".")[1:] if part]
    if msg.startswith("Object missing required field `"):
        loc, kind = [msg.split("`")[1]], "missing"
    elif msg.startswith("Object contains unknown field `"):
        loc, kind = [msg.split("`")[1]], "extra_forbidden"
    elif msg.startswith("Invalid enum value"):
        kind = "literal_error"
    elif msg.startswith("Invalid RFC3339"):
        kind = "datetime_parsing"
    elif msg.startswith("Expected `") and ", got `" in msg:
        expected = msg.split("`")[1]
        kind = {"str": "string", "object": "model", "int | float": "int"}.get(
            expected, expected
        ) + "_type"
    else:
        kind = "value_error"  # a range, a length, a time zone
    return {"loc": loc, "msg": msg, "type": kind}


def _errors(body: bytes, ts_range: TimeRange) -> list[dict[str, Any]]:
    """Every failing index of a refused batch (one error per event), or the body's error."""
    try:
        raws = RAW_BATCH.decode(body)
    except msgspec.ValidationError as exc:
        return [{"index": None, "loc": [], "msg": str(exc), "type": "batch_shape"}]
    except _NOT_JSON:
        return [
            {"index": None, "loc": [], "msg": "the body is not valid JSON", "type": "json_invalid"}
        ]
    errors = _duplicate_keys(body)
    named = {e["index"] for e in errors}
    for index, raw in enumerate(raws):
        if index in named:
            continue
        try:
            event = ONE_EVENT.decode(raw)
        except msgspec.ValidationError as exc:
            errors.append({"index": index, **_decode_error(exc)})
            continue
        except _NOT_JSON:  # e.g. a string that is not UTF-8
            errors.append(
                {"index": index, "loc": [], "msg": "not valid JSON", "type": "json_invalid"}
            )
            continue
        problem = _event_problem(event, epoch_us(event.ts), ts_range)
        if problem is not None:
            errors.append({"index": index, **problem})
    return errors


def parse_batch(body: bytes, *, ts_range: TimeRange) -> tuple[str, int]:
    """Validate a whole batch; ValidationProblem naming every failing index otherwise.

    Returns the batch's stream payload (services.stats.events) and its event count.
    """
    try:
        events = EVENT_BATCH.decode(body)
    except _NOT_JSON:
        errors = _errors(body, ts_range)
    else:
        errors = [] if _cannot_repeat_keys(body, len(events)) else _duplicate_keys(body)
        check_user = not _no_control_characters(body)
        latest, earliest = ts_range.latest_us, ts_range.earliest_us
        lines = []
        for event in events:
            if event.product_id.__class__ is float:  # 4.0: the integer 4, written as JSON may
                if not event.product_id.is_integer():
                    errors = _errors(body, ts_range)
                    break
                event = msgspec.structs.replace(event, product_id=int(event.product_id))
            ts = event.ts
            ts_us = math.floor(ts.timestamp()) * 1_000_000 + ts.microsecond  # epoch_us, inlined
            if (
                _UUID.fullmatch(event.event_id) is None
                or (check_user and _USER_ID.fullmatch(event.user_id) is None)
                or ts_us > latest
                or ts_us < earliest
            ):
                errors = _errors(body, ts_range)
                break
            lines.append(encode_event(event, ts_us))
        if not errors:
            return "\n".join(lines), len(lines)
    errors.sort(key=lambda e: -1 if e["index"] is None else e["index"])
    indexes = sorted({e["index"] for e in errors if e["index"] is not None})
    if indexes:
        shown = ", ".join(str(i) for i in indexes[:20]) + (" ..." if len(indexes) > 20 else "")
        detail = f"invalid events at index {shown}; nothing of this batch was accepted"
    else:
        detail = "the body must be a JSON array of 1 to 1000 events; nothing was accepted"
    raise ValidationProblem(
        detail, extra={"errors": errors[:MAX_ERRORS_LISTED], "failing_indexes": indexes}
    )


async def ingest(
    *, stream: EventStream, body: bytes, ts_range: TimeRange, retry_after_s: int
) -> int:
    """Validate a batch and append it whole to the stream; return how many were accepted."""
    try:
        payload, count = parse_batch(body, ts_range=ts_range)
    except ValidationProblem:
        metrics.BATCHES_REFUSED.labels("invalid").inc()
        raise
    try:
        refusal = await stream.admit(payload, count)
    except RedisError as exc:
        metrics.BATCHES_REFUSED.labels("unavailable").inc()
        log.warning("event stream unavailable", extra={"error": repr(exc)})
        raise UpstreamUnavailable(
            "the event store is unavailable; nothing was accepted", retry_after_s=retry_after_s
        ) from None
    if refusal is not None:
        metrics.BATCHES_REFUSED.labels("overloaded").inc()
        raise Overloaded(
            f"{refusal.value}; nothing was accepted, retry later", retry_after_s=retry_after_s
        )
    metrics.EVENTS_ACCEPTED.inc(count)
    return count


@dataclass(frozen=True)
class WindowAnswer:
    cover: Cover

    @property
    def span(self) -> dict[str, str]:
        return {"from": _rfc3339(self.cover.start_s), "to": _rfc3339(self.cover.end_s)}


def _rfc3339(second: int) -> str:
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def product_stats(
    *, aggregates: Aggregates, tiers: Tiers, product_id: int, window_s: int, now_s: int
) -> dict[str, Any]:
    """Views, carts, purchases and unique visitors of a product over the window."""
    cover = tiers.cover(window_s, now_s)
    try:
        counts: ProductCounts = await aggregates.product(product_id, cover)
    except RedisError as exc:
        raise _unavailable(exc) from None
    return {
        "product_id": product_id,
        "window_s": window_s,
        "views": counts.views,
        "unique_visitors": counts.unique_visitors,
        "carts": counts.carts,
        "purchases": counts.purchases,
        **WindowAnswer(cover).span,
    }


async def top_products(
    *, aggregates: Aggregates, tiers: Tiers, metric: str, window_s: int, limit: int, now_s: int
) -> dict[str, Any]:
    """The products with the highest count of `metric` over the window."""
    cover = tiers.cover(window_s, now_s)
    try:
        items = await aggregates.top(metric, cover, limit)
    except RedisError as exc:
        raise _unavailable(exc) from None
    return {
        "metric": metric,
        "window_s": window_s,
        "items": [{"product_id": pid, "count": count} for pid, count in items],
        **WindowAnswer(cover).span,
    }


def _unavailable(exc: RedisError) -> UpstreamUnavailable:
    log.warning("aggregates unavailable", extra={"error": repr(exc)})
    return UpstreamUnavailable("the aggregates store is unavailable", retry_after_s=1)
