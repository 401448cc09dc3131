"""Background jobs log a store outage in a few lines, a bug every time (services.common.outage).

The helper is driven with real errors (Postgres and Redis asked on a closed port) and a
clock moved by hand; then the payment service's background loops run against a
Postgres whose link is cut (a fault proxy resetting every connection) and restored.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.common.logs import JsonFormatter, configure_logging
from services.common.outage import (
    OutageLog,
    describe,
    is_outage,
    log_failure,
    unavailable_problem,
)
from services.payment.jobs import Jobs
from services.payment.settings import PaymentSettings
from services.payment.state import open_payment_state
from services.stats.writer import is_transient
from tests.support.faultproxy import FaultProxy
from tests.support.servers import free_port, migrated_database

LOGGER = "shopstack.tests.outage"
WEBHOOK_SECRET = "outage-log-test-webhook-secret-0123456789"


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


async def test_a_job_may_say_what_is_an_outage_for_it(
    records: pytest.LogCaptureFixture, redis_url: str
) -> None:
    """The stats writer's loops count Redis's transient replies (a consumer group lost
    with a restarted Redis: NOGROUP) as an outage, not as a bug."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.xreadgroup("no-such-group", "c1", {"outage-log-test-stream": ">"}, count=1)
    except redis_errors.ResponseError as exc:
        nogroup: BaseException = exc
    else:
        raise AssertionError("read from a consumer group that does not exist")
    finally:
        await client.aclose()
    assert str(nogroup).startswith("NOGROUP")
    errors = OutageLog(logging.getLogger(LOGGER), "stats-consumer", expected=is_transient)
    errors.failed("writer cycle failed", nogroup)
    errors.failed("writer cycle failed", ValueError("bad"))
    outage, bug = ours(records)
    assert (outage.levelno, outage.exc_info) == (logging.WARNING, None)
    assert outage.error.startswith("ResponseError: NOGROUP")  # type: ignore[attr-defined]
    assert bug.levelno == logging.ERROR


# --- a real loop: the payment service's jobs against a Postgres that stops answering ---


@pytest.fixture(scope="module")
def payment_database(servers: tuple[str, str]) -> Iterator[str]:
    """A database of this module's own: the jobs claim every due row they find."""
    with migrated_database(servers[0]) as dsn:
        yield dsn


@pytest.fixture
async def cut_postgres(payment_database: str) -> AsyncIterator[FaultProxy]:
    async with FaultProxy.for_url(payment_database) as proxy:
        yield proxy


async def wait_for(predicate: Any, *, timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_payment_jobs_log_a_postgres_outage_in_one_line_each_and_recover(
    cut_postgres: FaultProxy, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shopstack.payment.jobs")
    proxy = cut_postgres
    closed = f"http://127.0.0.1:{free_port()}"  # no message or payment is due: never called
    settings = PaymentSettings(
        database_url=proxy.url,
        redis_url=redis_url,
        log_level="WARNING",
        catalog_url=closed,
        psp_url=closed,
        psp_webhook_secret=WEBHOOK_SECRET,
        db_pool_min=1,
        db_pool_max=2,
        db_command_timeout_s=1.0,
        db_acquire_timeout_s=1.0,
        payment_settle_interval_s=0.05,
        payment_outbox_poll_s=0.05,
    )

    def jobs_records() -> list[logging.LogRecord]:
        return ours(caplog, "shopstack.payment.jobs")

    async with open_payment_state(settings) as state:
        jobs = Jobs(state)
        jobs.start()
        try:
            await asyncio.sleep(0.3)  # the loops run and find nothing due
            assert jobs_records() == []

            proxy.reset_peer()  # every connection, live or new, is reset
            await wait_for(
                lambda: {getattr(r, "job", None) for r in jobs_records()} >= {"settle", "outbox"}
            )
            # Many more failed rounds (each reconnects through the proxy), no more lines.
            accepted = proxy.accepted
            await wait_for(lambda: proxy.accepted >= accepted + 20)
            during = jobs_records()
            assert sorted(r.job for r in during) == ["outbox", "settle"]  # type: ignore[attr-defined]
            for record in during:
                assert record.levelno == logging.WARNING
                assert record.exc_info is None
                assert record.getMessage() == "job failed: a store did not answer"
                assert record.error  # type: ignore[attr-defined]

            proxy.clear()  # the link is back: each loop's next round succeeds
            await wait_for(lambda: len(jobs_records()) == 4)
            recovered = {r.job: r for r in jobs_records()[2:]}  # type: ignore[attr-defined]
            assert sorted(recovered) == ["outbox", "settle"]
            for job, record in recovered.items():
                assert record.levelno == logging.INFO
                assert record.getMessage() == f"{job} recovered"
                assert record.failures >= 2  # type: ignore[attr-defined]
                assert record.failed_for_s > 0  # type: ignore[attr-defined]
        finally:
            await jobs.stop()

    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # asyncpg's own pool (its min-size upkeep) may log a warning too, without its trace
    # once the services' logging is configured (test below).
    assert not [r for r in caplog.records if r.exc_info and r.name != "asyncpg.pool"]


async def test_a_library_retry_line_keeps_its_message_and_loses_its_trace(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """asyncpg's pool logs each failed reconnect of its floor with a trace; the services'
    logging setup keeps the line and turns an outage's trace into an `error` field."""
    caplog.set_level(logging.DEBUG, logger="asyncpg.pool")
    configure_logging("catalog", level="INFO")
    pool_log = logging.getLogger("asyncpg.pool")
    message = "Failed to restore the pool connection floor; retrying"
    outage = await postgres_refused()
    try:
        raise outage
    except Exception:
        pool_log.warning(message, exc_info=True)
    try:
        raise ValueError("a bug in the library's caller")
    except ValueError:
        pool_log.warning(message, exc_info=True)
    quieted, bug = [r for r in caplog.records if r.name == "asyncpg.pool"]
    assert quieted.getMessage() == message
    assert quieted.exc_info is None
    assert quieted.error == describe(outage)  # type: ignore[attr-defined]
    assert "exc" not in orjson.loads(JsonFormatter("catalog").format(quieted))
    assert bug.exc_info is not None  # anything else keeps its trace
    configure_logging("catalog", level="INFO")  # idempotent: still one filter
    assert len(pool_log.filters) == 1
