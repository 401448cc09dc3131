"""The hot route, POST /api/v1/events, answered as pure ASGI in front of FastAPI's routing.

A batch of events is one request, and at full load FastAPI's routing, request and
response objects and the middleware chain cost more CPU per batch than validating
the batch. This middleware sits outermost among the service's own middleware and
answers that one route itself, exactly as the stack behind it would: the request id
(echoed or made, in the log context and the response), the body limits (400 / 408 /
413, a declared oversize with `Connection: close`), problem+json for every refusal,
the same request metrics, and a logged 500 problem for anything unexpected. Every
other request, and the lifespan, goes on to the FastAPI app unchanged.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from prometheus_client import Counter
from starlette.exceptions import HTTPException

from services.common.asgi import ASGIApp, Receive, Scope, Send
from services.common.errors import PROBLEM_CONTENT_TYPE, Problem, code_for_status, problem_body
from services.common.logs import request_id_var
from services.common.metrics import HTTP_IN_FLIGHT, HTTP_LATENCY, HTTP_REQUESTS
from services.common.middleware import REQUEST_ID_HEADER, pick_request_id, read_body
from services.stats import domain
from services.stats.schemas import TimeRange
from services.stats.settings import StatsSettings
from services.stats.state import StatsState

log = logging.getLogger("shopstack.app")

EVENTS_PATH = "/api/v1/events"
_JSON = (b"content-type", b"application/json")
_PROBLEM = (b"content-type", PROBLEM_CONTENT_TYPE.encode())


class EventsIngress:
    """Answers POST /api/v1/events; passes everything else to `app`."""

    def __init__(self, app: ASGIApp, *, settings: StatsSettings) -> None:
        self.app = app
        self.settings = settings
        service = settings.service_name
        self.in_flight = HTTP_IN_FLIGHT.labels(service)
        self.latency = HTTP_LATENCY.labels(service, EVENTS_PATH, "POST")
        self._answered: dict[int, Counter] = {}
        self._service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != EVENTS_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = pick_request_id(scope)
        scope["shopstack.request_id"] = request_id
        token = request_id_var.set(request_id)
        status = 500
        self.in_flight.inc()
        try:
            status = await self._answer(scope, receive, send, request_id.encode("ascii"))
        finally:
            self.in_flight.dec()
            counter = self._answered.get(status)
            if counter is None:
                counter = HTTP_REQUESTS.labels(self._service, EVENTS_PATH, "POST", str(status))
                self._answered[status] = counter
            counter.inc()
            self.latency.observe(time.perf_counter() - started)
            request_id_var.reset(token)

    async def _answer(self, scope: Scope, receive: Receive, send: Send, request_id: bytes) -> int:
        """Read, ingest and answer one batch; returns the status sent."""
        settings = self.settings
        rid = (REQUEST_ID_HEADER, request_id)
        try:
            body = await read_body(
                scope,
                receive,
                limit=settings.max_body_bytes,
                timeout_s=settings.body_read_timeout_s,
            )
            state: StatsState = scope["state"]["app_state"]
            accepted = await domain.ingest(
                stream=state.stream,
                body=body,
                ts_range=TimeRange(
                    time.time_ns() // 1000,
                    max_future_s=settings.stats_max_future_s,
                    max_age_s=settings.stats_max_age_s,
                ),
                retry_after_s=settings.stats_retry_after_s,
            )
        except Problem as exc:
            doc = problem_body(exc.status, exc.code, exc.title, exc.detail, exc.extra)
            extra = [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()
            ]
            return await _reply(send, exc.status, _PROBLEM, doc, [*extra, rid])
        except HTTPException as exc:  # the body limits (read_body)
            doc = problem_body(exc.status_code, code_for_status(exc.status_code), None, exc.detail)
            headers = [rid]
            if exc.status_code in (400, 413) and _declared_too_much(scope, settings.max_body_bytes):
                headers.append((b"connection", b"close"))  # the rest of the body is not read
            return await _reply(send, exc.status_code, _PROBLEM, doc, headers)
        except Exception:
            log.exception("unhandled error", extra={"path": scope.get("path")})
            doc = problem_body(500, "internal-error", None, "an unexpected error occurred")
            return await _reply(send, 500, _PROBLEM, doc, [rid])
        return await _reply(send, 202, _JSON, {"accepted": accepted}, [rid])


def _declared_too_much(scope: Scope, limit: int) -> bool:
    """True when the Content-Length header is invalid or over the limit (nothing was read)."""
    for key, value in scope["headers"]:
        if key == b"content-length":
            return not value.isdigit() or int(value) > limit
    return False


async def _reply(
    send: Send,
    status: int,
    content_type: tuple[bytes, bytes],
    doc: dict[str, Any],
    headers: list[tuple[bytes, bytes]],
) -> int:
    body = orjson.dumps(doc)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [content_type, (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})
    return status
