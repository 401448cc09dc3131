"""Pure ASGI middleware: request id, metrics, body size limit and body-read deadline."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

from starlette.exceptions import HTTPException

from services.common.asgi import ASGIApp, Message, Receive, Scope, Send
from services.common.errors import PROBLEM_CONTENT_TYPE, problem_bytes
from services.common.logs import request_id_var
from services.common.metrics import HTTP_IN_FLIGHT, HTTP_LATENCY, HTTP_REQUESTS

_SANE_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
REQUEST_ID_HEADER = b"x-request-id"


def header_value(scope: Scope, name: bytes) -> bytes | None:
    """First value of a request header (names are lower-case in ASGI)."""
    for key, value in scope["headers"]:
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def new_request_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


def pick_request_id(scope: Scope) -> str:
    """Echo the client's request id when it is sane, else make one."""
    raw = header_value(scope, REQUEST_ID_HEADER)
    if raw is not None and _SANE_REQUEST_ID.match(raw):
        return raw.decode("ascii")
    return new_request_id()


async def send_problem(
    send: Send,
    status: int,
    code: str,
    detail: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = False,
    title: str | None = None,
) -> None:
    """Send a complete problem+json response."""
    body = problem_bytes(status, code, detail, title=title)
    raw_headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    if close:
        raw_headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def route_label(scope: Scope) -> str:
    """The matched route template, never the raw path (bounded label cardinality)."""
    name = scope.get("shopstack.route")
    if isinstance(name, str):
        return name
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class ObservabilityMiddleware:
    """Sets the request id (context, response header) and records request metrics."""

    def __init__(self, app: ASGIApp, *, service: str) -> None:
        self.app = app
        self.service = service
        self.in_flight = HTTP_IN_FLIGHT.labels(service)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = pick_request_id(scope)
        scope["shopstack.request_id"] = request_id
        token = request_id_var.set(request_id)
        rid_header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *(h for h in message.get("headers", ()) if h[0].lower() != REQUEST_ID_HEADER),
                    rid_header,
                ]
            await send(message)

        self.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.in_flight.dec()
            route = route_label(scope)
            method = scope["method"]
            HTTP_REQUESTS.labels(self.service, route, method, str(status)).inc()
            HTTP_LATENCY.labels(self.service, route, method).observe(time.perf_counter() - started)
            request_id_var.reset(token)


class BodyGuardMiddleware:
    """Caps request bodies and the time a client may take to send one.

    Neither granian nor uvicorn limits body size or body-read time. A declared
    Content-Length over the cap is refused before reading; an undeclared
    (chunked) body is counted as it arrives and the read fails with 413 as soon
    as it passes the cap. Reading the whole body must finish within the deadline.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_read_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = scope.get("shopstack.max_body_bytes", self.max_body_bytes)
        declared = header_value(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await send_problem(send, 400, "bad-request", "invalid Content-Length", close=True)
                return
            if int(declared) > limit:
                await send_problem(
                    send,
                    413,
                    "payload-too-large",
                    f"request body exceeds {limit} bytes",
                    close=True,
                )
                return
        await self.app(scope, guarded_receive(receive, limit, self.body_read_timeout_s), send)


def body_timeout() -> HTTPException:
    """The error for a body that arrives too slowly.

    Raised as a framework HTTPException because FastAPI re-raises those from its
    body parsing (any other exception there becomes a generic 400).
    """
    return HTTPException(408, "request body was not received in time")


def guarded_receive(receive: Receive, limit: int, timeout_s: float) -> Receive:
    """Wrap `receive` so the body is capped at `limit` bytes and read within `timeout_s`."""
    received = 0
    deadline: float | None = None
    body_done = False

    async def wrapped() -> Message:
        nonlocal received, deadline, body_done
        if body_done:
            # After the body, receive() only waits for a disconnect: no deadline.
            return await receive()
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + timeout_s
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise body_timeout()
        try:
            async with asyncio.timeout(remaining):
                message = await receive()
        except TimeoutError:
            raise body_timeout() from None
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body exceeds {limit} bytes")
            body_done = not message.get("more_body", False)
        else:
            body_done = True
        return message

    return wrapped


async def read_body(scope: Scope, receive: Receive, *, limit: int, timeout_s: float) -> bytes:
    """Read a whole request body under a size cap and a deadline (HTTPException 400/408/413)."""
    declared = header_value(scope, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(400, "invalid Content-Length")
        if int(declared) > limit:
            raise HTTPException(413, f"request body exceeds {limit} bytes")
    guarded = guarded_receive(receive, limit, timeout_s)
    chunks: list[bytes] = []
    while True:
        message = await guarded()
        if message["type"] == "http.disconnect":
            raise HTTPException(400, "client disconnected")
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
