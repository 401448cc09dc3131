"""Errors that mean a backing store did not answer, and the 503 they become.

Postgres or Redis down, restarting, unreachable or too slow is not a bug in the
request: the catch-alls (FastAPI services and the gateway's dispatcher) answer 503
`upstream-unavailable` with Retry-After, logged in one line without a trace, instead
of a 500 (FLT-2, FLT-3).
"""

from __future__ import annotations

import asyncpg
from redis import exceptions as redis_errors

from services.common.db import PG_NOT_AN_OUTAGE, PG_UNAVAILABLE
from services.common.errors import UpstreamUnavailable

REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
)
STORE_UNAVAILABLE: tuple[type[Exception], ...] = PG_UNAVAILABLE + REDIS_UNAVAILABLE


def unavailable_problem(exc: BaseException) -> UpstreamUnavailable | None:
    """The 503 for an error that means Postgres, Redis or the network did not answer."""
    if not isinstance(exc, STORE_UNAVAILABLE) or isinstance(exc, PG_NOT_AN_OUTAGE):
        return None
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        what = "the database is unavailable"
    elif isinstance(exc, REDIS_UNAVAILABLE):
        what = "the cache is unavailable"
    else:  # OSError, TimeoutError: any client's
        what = "a dependency did not answer"
    return UpstreamUnavailable(f"{what}; try again shortly", status=503, retry_after_s=1)
