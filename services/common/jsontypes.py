"""Validators and patterns the services' request models share."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, AwareDatetime, BeforeValidator, Field


def _integral(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


JSON_INTEGER = BeforeValidator(_integral)
"""Last in `Annotated[StrictInt, Field(...), JSON_INTEGER]`: an integer as JSON (and JSON
Schema's `integer`) has it. 4 and 4.0 are the same number, so both are 4; 4.5, "4" and
true are still refused. (Placed after the Field so the schema keeps minimum/maximum.)"""

NO_CONTROL_CHARACTERS = r"^[^\x00-\x1f\x7f]*$"
"""Pattern of a one-line text: no control character (Postgres text cannot even hold NUL)."""
NO_NUL = r"^[^\x00]*$"
"""Pattern of a free text stored in Postgres, whose text type cannot hold NUL."""

_YEAR = "(000[2-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-8][0-9]{3}|9[0-8][0-9]{2}|99[0-8][0-9]|999[0-8])"
RFC3339_PATTERN = (
    f"^{_YEAR}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    "[Tt]([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]([.][0-9]+)?"
    "([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])$"
)
"""RFC 3339 date-time, years 0002 to 9998 (so that any offset stays within Python's and
asyncpg's years 1 to 9999 once in UTC), no leap second."""
_RFC3339 = re.compile(RFC3339_PATTERN)


def _rfc3339(value: Any) -> Any:
    if isinstance(value, datetime) or (isinstance(value, str) and _RFC3339.match(value)):
        return value
    raise ValueError("not an RFC 3339 date-time of the years 0002 to 9998")


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDateTime = Annotated[
    AwareDatetime,
    BeforeValidator(_rfc3339),
    AfterValidator(_utc),
    Field(json_schema_extra={"pattern": RFC3339_PATTERN}),
]
"""An RFC 3339 date-time string (JSON Schema `date-time` and RFC3339_PATTERN), kept in
UTC: not a number of seconds, not a time without seconds."""
