"""Stats use cases: accept a batch of events, answer window queries."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from redis.exceptions import RedisError

from services.common.errors import Overloaded, UpstreamUnavailable, ValidationProblem
from services.stats import metrics
from services.stats.aggregates import Aggregates, ProductCounts
from services.stats.buckets import Cover, Tiers
from services.stats.events import encode_batch, epoch_us
from services.stats.schemas import EVENT_BATCH, EventIn, TimeRange
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


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    found = []
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = list(err["loc"])
        index = loc.pop(0) if loc and isinstance(loc[0], int) else None
        found.append({"index": index, "loc": loc, "msg": err["msg"], "type": err["type"]})
    return found


def _cannot_repeat_keys(body: bytes, events: int) -> bool:
    """True when a valid batch's bytes leave no room for a repeated member name.

    Each valid event has 5 member names and 4 string values: 18 quote marks. With
    no backslash in the body every quote mark delimits a string, and a repeated
    member adds at least one more string, so exactly 18 per event proves there is
    none. Any other body takes the exact (slower) check.
    """
    return b"\\" not in body and body.count(b'"') == 18 * events


def _range_errors(stamped: list[tuple[EventIn, int]], ts_range: TimeRange) -> list[dict[str, Any]]:
    found = []
    for index, (_, ts_us) in enumerate(stamped):
        problem = ts_range.problem(ts_us)
        if problem:
            found.append({"index": index, "loc": ["ts"], "msg": problem, "type": "ts_range"})
    return found


def _raw_range_errors(body: bytes, ts_range: TimeRange) -> list[dict[str, Any]]:
    """ts range errors of an otherwise invalid batch, so every failing index is named."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(doc, list):
        return []
    found = []
    for index, item in enumerate(doc):
        raw = item.get("ts") if isinstance(item, dict) else None
        try:
            ts = datetime.fromisoformat(raw) if isinstance(raw, str) else None
        except ValueError:
            continue
        aware = ts is not None and ts.tzinfo is not None
        problem = ts_range.problem(epoch_us(ts)) if ts is not None and aware else None
        if problem:
            found.append({"index": index, "loc": ["ts"], "msg": problem, "type": "ts_range"})
    return found


def parse_batch(body: bytes, *, ts_range: TimeRange) -> list[tuple[EventIn, int]]:
    """Validate a whole batch; ValidationProblem naming every failing index otherwise.

    Returns each event with its time in epoch microseconds.
    """
    try:
        events = EVENT_BATCH.validate_json(body)
    except ValidationError as exc:
        errors = _duplicate_keys(body) + _errors(exc)
        known = {(e["index"], "ts") for e in errors if e["loc"] == ["ts"]}
        errors += [e for e in _raw_range_errors(body, ts_range) if (e["index"], "ts") not in known]
    else:
        stamped = [(event, epoch_us(event.ts)) for event in events]
        errors = [] if _cannot_repeat_keys(body, len(events)) else _duplicate_keys(body)
        errors += _range_errors(stamped, ts_range)
        if not errors:
            return stamped
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
        events = parse_batch(body, ts_range=ts_range)
    except ValidationProblem:
        metrics.BATCHES_REFUSED.labels("invalid").inc()
        raise
    try:
        refusal = await stream.admit(encode_batch(events), len(events))
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
    metrics.EVENTS_ACCEPTED.inc(len(events))
    return len(events)


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
