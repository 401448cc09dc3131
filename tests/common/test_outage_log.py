"""Background jobs log a store outage in a few lines, a bug every time (services.common.outage).

The helper is driven with real errors (Postgres and Redis asked on a closed port) and a
clock moved by hand.
"""

from __future__ import annotations

import logging

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.logs import JsonFormatter
from services.common.outage import OutageLog, is_outage, log_failure, unavailable_problem
from tests.support.servers import free_port

LOGGER = "shopstack.tests.outage"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


async def postgres_refused() -> BaseException:
    """The error a Postgres client gets from a port nothing listens on."""
    try:
        await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", timeout=5)
    except Exception as exc:
        return exc
    raise AssertionError("connected to a closed port")


async def redis_refused() -> BaseException:
    """The error a Redis client gets from a port nothing listens on."""
    client = aioredis.Redis(
        host="127.0.0.1", port=free_port(), socket_connect_timeout=5, retry=Retry(NoBackoff(), 0)
    )
    try:
        await client.ping()
    except Exception as exc:
        return exc
    finally:
        await client.aclose()
    raise AssertionError("connected to a closed port")


async def postgres_data_error(pg: asyncpg.Connection) -> BaseException:
    """A bug of ours that asyncpg reports as an InterfaceError: a wrong argument type."""
    try:
        await pg.fetchval("SELECT $1::int", "not a number")
    except Exception as exc:
        return exc
    raise AssertionError("the query took a string for an int")


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


def ours(caplog: pytest.LogCaptureFixture, name: str = LOGGER) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == name]


async def test_outages_are_classified_as_the_request_path_does(pg: asyncpg.Connection) -> None:
    outages = [await postgres_refused(), await redis_refused(), TimeoutError()]
    bugs = [await postgres_data_error(pg), ValueError("bad"), redis_errors.ResponseError("ERR x")]
    assert isinstance(outages[0], OSError)
    assert isinstance(outages[1], redis_errors.ConnectionError)
    assert isinstance(bugs[0], asyncpg.DataError)
    for exc in outages + bugs:
        assert is_outage(exc) == (unavailable_problem(exc) is not None), exc
    assert all(is_outage(exc) for exc in outages)
    assert not any(is_outage(exc) for exc in bugs)


async def test_an_outage_is_one_warning_then_a_reminder_then_one_recovery(
    records: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    errors = OutageLog(logging.getLogger(LOGGER), "sweeper", every_s=30.0, clock=clock)
    refused, redis_down = await postgres_refused(), await redis_refused()

    errors.succeeded()  # nothing failed: nothing to say
    errors.failed("sweep failed", refused, {"batch": 7})
    [first] = ours(records)
    assert first.levelno == logging.WARNING
    assert first.exc_info is None
    assert first.getMessage() == "sweep failed: a store did not answer"
    assert first.job == "sweeper"  # type: ignore[attr-defined]
    assert first.error == f"{type(refused).__name__}: {refused}"  # type: ignore[attr-defined]
    assert first.batch == 7  # type: ignore[attr-defined]
    assert first.suppressed == 0  # type: ignore[attr-defined]

    # In the JSON logs: the job and the error as fields, no trace.
    doc = orjson.loads(JsonFormatter("catalog").format(first))
    assert doc["level"] == "warning"
    assert doc["job"] == "sweeper"
    assert doc["error"].startswith(type(refused).__name__ + ": ")
    assert "exc" not in doc

    # The same outage, every half second for just under the window: no more lines.
    for _ in range(59):
        clock.now += 0.5
        errors.failed("sweep failed", redis_down)
    assert len(ours(records)) == 1

    clock.now += 0.5  # 30 s after the first line
    errors.failed("sweep failed", refused)
    assert len(ours(records)) == 2
    reminder = ours(records)[1]
    assert reminder.levelno == logging.WARNING
    assert reminder.exc_info is None
    assert reminder.getMessage() == "sweep failed: a store still does not answer"
    assert reminder.suppressed == 59  # type: ignore[attr-defined]
    assert reminder.failures == 61  # type: ignore[attr-defined]

    clock.now += 5.0
    errors.failed("sweep failed", refused)  # counted, not logged
    clock.now += 1.0
    errors.succeeded()
    errors.succeeded()  # one recovery line, not one per success
    assert len(ours(records)) == 3
    recovered = ours(records)[2]
    assert recovered.levelno == logging.INFO
    assert recovered.exc_info is None
    assert recovered.getMessage() == "sweeper recovered"
    assert recovered.job == "sweeper"  # type: ignore[attr-defined]
    assert recovered.failures == 62  # type: ignore[attr-defined]
    assert recovered.failed_for_s == 36.0  # type: ignore[attr-defined]

    # The next outage starts afresh: its first failure is logged at once.
    clock.now += 1.0
    errors.failed("sweep failed", refused)
    assert len(ours(records)) == 4
    assert ours(records)[3].suppressed == 0  # type: ignore[attr-defined]
    assert ours(records)[3].failures == 1  # type: ignore[attr-defined]


async def test_a_bug_is_an_error_with_its_trace_every_time(
    records: pytest.LogCaptureFixture, pg: asyncpg.Connection
) -> None:
    clock = Clock()
    errors = OutageLog(logging.getLogger(LOGGER), "reconciler", clock=clock)
    bugs = [ValueError("bad"), await postgres_data_error(pg), ValueError("bad")]
    for exc in bugs:
        errors.failed("reconcile failed", exc, {"product_id": 3})
    assert len(ours(records)) == 3
    for record, exc in zip(ours(records), bugs, strict=True):
        assert record.levelno == logging.ERROR
        assert record.getMessage() == "reconcile failed"
        assert record.exc_info is not None
        assert record.exc_info[1] is exc
        assert record.job == "reconciler"  # type: ignore[attr-defined]
        assert "exc" in orjson.loads(JsonFormatter("catalog").format(record))

    # A bug in the middle of an outage is logged too, and the outage stays throttled.
    refused = await redis_refused()
    errors.failed("reconcile failed", refused)
    errors.failed("reconcile failed", ValueError("bad"))
    errors.failed("reconcile failed", refused)
    levels = [r.levelno for r in ours(records)[3:]]
    assert levels == [logging.WARNING, logging.ERROR]
    errors.succeeded()  # bugs are not counted as outage failures
    assert ours(records)[-1].failures == 2  # type: ignore[attr-defined]


async def test_a_single_failure_is_logged_once_with_or_without_a_trace(
    records: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger(LOGGER)
    log_failure(log, "cache invalidation failed", await redis_refused(), {"product_id": 5})
    log_failure(log, "cache invalidation failed", redis_errors.ResponseError("ERR x"))
    outage, bug = ours(records)
    assert (outage.levelno, outage.exc_info) == (logging.WARNING, None)
    assert outage.error.startswith("ConnectionError: ")  # type: ignore[attr-defined]
    assert outage.product_id == 5  # type: ignore[attr-defined]
    assert bug.levelno == logging.ERROR
    assert bug.exc_info is not None
