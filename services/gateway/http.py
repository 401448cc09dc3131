"""A neutral request/reply for the gateway and its two adapters (RSGI and ASGI).

granian serves the gateway over RSGI: about twice the requests per second of
ASGI on this machine for the same handler, which the hot path needs. ASGI stays
for tests (httpx) and for uvicorn.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.asgi import Receive, Scope, Send
from services.common.errors import PayloadTooLarge, Problem, RequestTimeout

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ID_PREFIX = os.urandom(4).hex()
_ID_COUNTER = itertools.count(1)


def request_id_from(client_value: str | None) -> str:
    """Echo a sane client request id, else a cheap unique one (per-process prefix + counter)."""
    if client_value is not None and _SANE_REQUEST_ID.match(client_value):
        return client_value
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


class BadRequest(Problem):
    status, code, title = 400, "bad-request", "Bad Request"


class Headers(Protocol):
    def get(self, key: str, default: Any = None) -> Any: ...
    def items(self) -> list[tuple[str, str]]: ...


@dataclass(slots=True)
class Request:
    method: str
    path: str
    query: str
    headers: Headers  # names lower-case
    client: str
    scheme: str
    chunks: Callable[[], AsyncIterator[bytes]]
    prechecked: bool = False  # the body was read (and judged) by a fast path already
    # The whole body in one read, when the server bounds it by Content-Length (RSGI).
    whole: Callable[[], Awaitable[bytes]] | None = None

    async def body(self, *, limit: int, timeout_s: float) -> bytes:
        """The whole body, refused past `limit` bytes or `timeout_s` seconds (413/408/400)."""
        declared = self.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest("invalid Content-Length")
            if int(declared) > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            if self.whole is not None and self.headers.get("transfer-encoding") is None:
                # The server reads exactly the declared length (at most `limit`): one read.
                # (With Transfer-Encoding the length is the chunks', counted below.)
                try:
                    async with asyncio.timeout(timeout_s):
                        whole = await self.whole()
                except TimeoutError:
                    raise RequestTimeout("request body was not received in time") from None
                if len(whole) > limit:
                    raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                return whole
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(timeout_s):
                async for chunk in self.chunks():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"request body exceeds {limit} bytes")
                    parts.append(chunk)
        except TimeoutError:
            raise RequestTimeout("request body was not received in time") from None
        return b"".join(parts)


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""


Handler = Callable[[Request], Awaitable[Reply]]


class _DictHeaders:
    """ASGI headers as a lower-case mapping (first value wins for `get`)."""

    __slots__ = ("_first", "_items")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._items = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]
        self._first: dict[str, str] = {}
        for key, value in self._items:
            self._first.setdefault(key, value)

    def get(self, key: str, default: Any = None) -> Any:
        return self._first.get(key, default)

    def items(self) -> list[tuple[str, str]]:
        return self._items


def rsgi_request(scope: Any, protocol: Any, body: bytes | None = None) -> Request:
    """Wrap a granian RSGI scope and protocol (`body`: already read from it)."""

    async def chunks() -> AsyncIterator[bytes]:
        if body is not None:
            yield body
            return
        async for chunk in protocol:
            yield chunk

    async def read_all() -> bytes:
        assert body is not None
        return body

    host = scope.client.rsplit(":", 1)[0].strip("[]") if scope.client else ""
    return Request(
        scope.method,
        scope.path,
        scope.query_string,
        scope.headers,
        host,
        scope.scheme,
        chunks,
        prechecked=body is not None,
        whole=protocol if body is None else read_all,
    )


def send_rsgi(protocol: Any, reply: Reply, *, head: bool = False) -> None:
    if reply.body and not head:
        protocol.response_bytes(reply.status, reply.headers, reply.body)
    else:
        protocol.response_empty(reply.status, reply.headers)


def asgi_request(scope: Scope, receive: Receive) -> Request:
    """Wrap an ASGI http scope and its receive channel."""

    async def chunks() -> AsyncIterator[bytes]:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadRequest("client disconnected")
            yield message.get("body", b"")
            if not message.get("more_body", False):
                return

    client = scope.get("client") or ("", 0)
    return Request(
        scope["method"],
        scope["path"],
        scope.get("query_string", b"").decode("latin-1"),
        _DictHeaders(scope["headers"]),
        str(client[0]),
        scope.get("scheme", "http"),
        chunks,
    )


async def send_asgi(send: Send, reply: Reply, *, head: bool = False) -> None:
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    headers.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else reply.body})
