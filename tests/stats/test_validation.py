"""The batch validator: one error per failing event (index, loc, msg, type), boundaries."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from services.common.errors import ValidationProblem
from services.stats.domain import parse_batch
from services.stats.schemas import MAX_ID, TimeRange
from tests.stats.conftest import body, event


def _range() -> TimeRange:
    return TimeRange(time.time_ns() // 1000, max_future_s=300, max_age_s=7 * 86_400)


def _refused(raw: bytes) -> dict[str, Any]:
    with pytest.raises(ValidationProblem) as caught:
        parse_batch(raw, ts_range=_range())
    return caught.value.extra


def _one(**changes: Any) -> bytes:
    return body([event(1), {**event(1), **changes}])


ERRORS: dict[str, tuple[bytes, list[str | int], str]] = {
    "missing field": (
        body([event(1), {k: v for k, v in event(1).items() if k != "ts"}]),
        ["ts"],
        "missing",
    ),
    "unknown field": (_one(price_cents=1), ["price_cents"], "extra_forbidden"),
    "string product_id": (_one(product_id="7"), ["product_id"], "int_type"),
    "fractional product_id": (_one(product_id=7.5), ["product_id"], "int_type"),
    "bool product_id": (_one(product_id=True), ["product_id"], "int_type"),
    "zero product_id": (_one(product_id=0), ["product_id"], "value_error"),
    "product_id past MAX_ID": (_one(product_id=MAX_ID + 1), ["product_id"], "value_error"),
    "unknown type": (_one(type="like"), ["type"], "literal_error"),
    "number user_id": (_one(user_id=5), ["user_id"], "string_type"),
    "empty user_id": (_one(user_id=""), ["user_id"], "value_error"),
    "129-char user_id": (_one(user_id="x" * 129), ["user_id"], "value_error"),
    "escaped control in user_id": (_one(user_id="a\nb"), ["user_id"], "string_pattern_mismatch"),
    "raw DEL in user_id": (_one(user_id="a\x7fb"), ["user_id"], "string_pattern_mismatch"),
    "uuid without hyphens": (
        _one(event_id=uuid.uuid4().hex + "abcd"),
        ["event_id"],
        "string_pattern_mismatch",
    ),
    "uuid with a non-hex digit": (
        _one(event_id="0000000g-0000-4000-8000-000000000000"),
        ["event_id"],
        "string_pattern_mismatch",
    ),
    "naive ts": (_one(ts="2026-01-01T00:00:00"), ["ts"], "value_error"),
    "not RFC 3339": (_one(ts="yesterday"), ["ts"], "datetime_parsing"),
    "numeric ts": (_one(ts=1_700_000_000), ["ts"], "datetime_type"),
    "ts too far ahead": (
        _one(ts=(datetime.now(UTC) + timedelta(hours=1)).isoformat()),
        ["ts"],
        "ts_range",
    ),
    "not an object": (body([event(1), 5]), [], "model_type"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_each_failing_event_gets_its_loc_and_type(case: str) -> None:
    raw, loc, kind = ERRORS[case]
    doc = _refused(raw)
    assert doc["failing_indexes"] == [1]
    (error,) = doc["errors"]
    assert error["index"] == 1
    assert error["loc"] == loc
    assert error["msg"]
    assert error["type"] == kind


def test_every_failing_index_is_listed_in_order() -> None:
    events = [event(1, user_id=f"u{i}") for i in range(30)]
    for i in (3, 7, 29):
        events[i]["product_id"] = -1
    events[12]["type"] = "like"
    doc = _refused(body(events))
    assert doc["failing_indexes"] == [3, 7, 12, 29]
    assert [e["index"] for e in doc["errors"]] == [3, 7, 12, 29]


def test_a_repeated_member_name_is_refused_even_when_the_values_agree() -> None:
    good = orjson.dumps(event(1)).decode()
    twice = good[:-1] + ',"type":"view"}'
    doc = _refused(f"[{good},{twice},{good}]".encode())
    assert doc["failing_indexes"] == [1]
    assert doc["errors"][0] == {
        "index": 1,
        "loc": ["type"],
        "msg": "member name appears more than once",
        "type": "duplicate_key",
    }


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (b"[]", "batch_shape"),
        (b"{}", "batch_shape"),
        (body([event(1, user_id=f"u{i}") for i in range(1001)]), "batch_shape"),
        (b"[{", "json_invalid"),
        (b"[" * 10_000 + b"]" * 10_000, "json_invalid"),
    ],
)
def test_a_body_that_is_not_a_batch_has_one_error_without_index(raw: bytes, kind: str) -> None:
    doc = _refused(raw)
    assert doc["failing_indexes"] == []
    assert [(e["index"], e["type"]) for e in doc["errors"]] == [(None, kind)]


def test_boundary_values_are_accepted_and_encoded_exactly() -> None:
    event_id = str(uuid.uuid4()).upper()
    moment = datetime.now(UTC).replace(microsecond=678_901) - timedelta(days=1)
    edge = {
        **event(MAX_ID, user_id="é" * 128, event_id=event_id),
        "ts": moment.astimezone(timezone(timedelta(hours=2))).isoformat(),  # same instant
    }
    others = [event(1, user_id=f'q"{i}\\|x') for i in range(999)]
    payload, count = parse_batch(body([edge, *others]), ts_range=_range())
    assert count == 1000
    first = payload.split("\n")[0]
    expected_us = int(moment.timestamp()) * 1_000_000 + 678_901
    assert first == f"1|{event_id.lower()}|v|{MAX_ID}|{expected_us}|{'é' * 128}"
    assert payload.split("\n")[1].endswith('|q"0\\|x')


def test_an_integral_float_product_id_is_that_integer() -> None:
    """7.0 is the integer 7 in JSON and in the documented schema (`integer`): IN-1 found
    it refused. It is stored as 7, the same line an event with 7 gives."""
    plain, as_float = event(7), {**event(7), "product_id": 7.0}
    payload, count = parse_batch(body([plain, as_float]), ts_range=_range())
    assert count == 2
    first, second = payload.split("\n")
    assert first.split("|")[3] == second.split("|")[3] == "7"
