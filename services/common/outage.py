"""Errors that mean a backing store did not answer, the 503 they become, and their logs.

Postgres or Redis down, restarting, unreachable or too slow is not a bug in the
request: the catch-alls (FastAPI services and the gateway's dispatcher) answer 503
`upstream-unavailable` with Retry-After, logged in one line without a trace, instead
of a 500 (FLT-2, FLT-3). Background jobs log the same errors through `OutageLog`: one
line when an outage begins, a reminder at most every `OUTAGE_LOG_EVERY_S` while it
lasts, one line when the job recovers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg
from redis import exceptions as redis_errors

from services.common.db import PG_NOT_AN_OUTAGE, PG_UNAVAILABLE
from services.common.errors import UpstreamUnavailable

REDIS_UNAVAILABLE: tuple[type[Exception], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
)
STORE_UNAVAILABLE: tuple[type[Exception], ...] = PG_UNAVAILABLE + REDIS_UNAVAILABLE

# While an outage lasts, a job logs it at most this often (with the failures in between).
OUTAGE_LOG_EVERY_S = 30.0


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` means Postgres, Redis or the network did not answer (not a bug)."""
    return isinstance(exc, STORE_UNAVAILABLE) and not isinstance(exc, PG_NOT_AN_OUTAGE)


def unavailable_problem(exc: BaseException) -> UpstreamUnavailable | None:
    """The 503 for an error that means Postgres, Redis or the network did not answer."""
    if not is_outage(exc):
        return None
    if isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError):
        what = "the database is unavailable"
    elif isinstance(exc, REDIS_UNAVAILABLE):
        what = "the cache is unavailable"
    else:  # OSError, TimeoutError: any client's
        what = "a dependency did not answer"
    return UpstreamUnavailable(f"{what}; try again shortly", status=503, retry_after_s=1)


def describe(exc: BaseException) -> str:
    """`Type: message` (the type alone when the message is empty), as the logs show errors."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def log_failure(
    logger: logging.Logger,
    message: str,
    exc: BaseException,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """One failure, logged once: an outage as a WARNING line, anything else with its trace."""
    if is_outage(exc):
        logger.warning(message, extra={**(extra or {}), "error": describe(exc)})
    else:
        logger.error(message, exc_info=exc, extra=dict(extra or {}))


class OutageLog:
    """How one background job logs its failures: an outage in a few lines, a bug every time.

    A store that did not answer (`is_outage`) is one WARNING line without a trace, naming
    the job and the error; while the outage lasts, further failures are counted and
    logged at most once per `every_s`, with how many were `suppressed` since the last
    line. The first success after them is one INFO line (`failures`, `failed_for_s`).
    Any other exception is a bug: an ERROR with its traceback, every time.

    Not thread-safe: each job (one task, or tasks of one event loop) owns its own.
    """

    def __init__(
        self,
        logger: logging.Logger,
        job: str,
        *,
        every_s: float = OUTAGE_LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
        expected: Callable[[BaseException], bool] = is_outage,
    ) -> None:
        self.logger = logger
        self.job = job
        self.expected = expected  # what is an outage for this job (default: is_outage)
        self.every_s = every_s
        self.clock = clock
        self.failures = 0  # outage failures since the last success
        self.suppressed = 0  # of which not logged since the last line
        self._began = 0.0
        self._logged = 0.0

    def failed(
        self, message: str, exc: BaseException, extra: Mapping[str, Any] | None = None
    ) -> None:
        """Log (or count) one failed run of the job."""
        fields = {**(extra or {}), "job": self.job}
        if not self.expected(exc):
            self.logger.error(message, exc_info=exc, extra=fields)
            return
        now = self.clock()
        self.failures += 1
        if self.failures == 1:
            self._began = now
        elif now - self._logged < self.every_s:
            self.suppressed += 1
            return
        fields.update(error=describe(exc), failures=self.failures, suppressed=self.suppressed)
        if self.failures == 1:
            self.logger.warning(f"{message}: a store did not answer", extra=fields)
        else:
            self.logger.warning(f"{message}: a store still does not answer", extra=fields)
        self._logged = now
        self.suppressed = 0

    def succeeded(self) -> None:
        """Note a successful run; after outage failures, log the recovery once."""
        if not self.failures:
            return
        self.logger.info(
            f"{self.job} recovered",
            extra={
                "job": self.job,
                "failures": self.failures,
                "failed_for_s": round(self.clock() - self._began, 3),
            },
        )
        self.failures = 0
        self.suppressed = 0


class OutageTraceFilter(logging.Filter):
    """Drop the traceback from a library's log record when its exception is an outage.

    asyncpg's pool logs "Failed to restore the pool connection floor; retrying" with a
    full trace on every reconnect attempt while Postgres is away (backing off from 1 s
    to 60 s). The line stays; its trace becomes an `error` field, as in our own logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_outage(exc):
            record.exc_info = None
            record.exc_text = None
            record.error = describe(exc)
        return True


QUIETED_LOGGERS = ("asyncpg.pool",)


def quiet_library_outages() -> None:
    """Install OutageTraceFilter on the libraries' loggers that retry on their own (idempotent)."""
    for name in QUIETED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OutageTraceFilter) for f in logger.filters):
            logger.addFilter(OutageTraceFilter())
