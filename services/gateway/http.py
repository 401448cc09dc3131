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
from enum import StrEnum
from typing import Any, Protocol

from granian._granian import RSGIProtocolClosed

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


# The connection cannot be trusted to carry a next request after a framing error.
CLOSE = {"Connection": "close"}


class Framing(StrEnum):
    """How the gateway takes a request that carries Transfer-Encoding."""

    PLAIN = "plain"  # one `chunked`, no Content-Length
    CLOSE = "close"  # the chunks decide the body; the connection closes after the reply
    REFUSE = "refuse"  # 400, and the connection closes


def transfer_framing(codings: list[str], content_length: str | None) -> Framing:
    """Judge the Transfer-Encoding values of a request (RFC 9112 6.1, 6.3, 7).

    The gateway takes exactly one `chunked` coding and nothing else: the server
    (hyper, under granian) frames a body by `chunked` when it is the last coding,
    so "identity, chunked" or a second header line would be read as chunks here and
    perhaps otherwise by a proxy in front. Those are refused. A `chunked` spelt in
    another case, or sent with a Content-Length, is read by its chunks alone and the
    connection is closed after the reply, as RFC 9112 6.1 requires of the latter.
    """
    names = [name.strip().lower() for value in codings for name in value.split(",")]
    if names != ["chunked"]:
        return Framing.REFUSE
    if content_length is not None or codings != ["chunked"]:
        return Framing.CLOSE
    return Framing.PLAIN


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
    refused: Problem | None = None  # its framing was refused before routing (RSGI)

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


async def read_whole(protocol: Any) -> bytes:
    """A granian RSGI body in one read; 400 when it ended early or was malformed."""
    try:
        body: bytes = await protocol()
    except RSGIProtocolClosed:
        raise BadRequest("the request body was cut short", headers=CLOSE) from None
    return body


async def read_chunks(protocol: Any) -> AsyncIterator[bytes]:
    """A granian RSGI body chunk by chunk; 400 when it ended early or was malformed.

    granian's iterator yields b"" once at the end of a body, and yields b"" in place
    of an error too (a chunk size line hyper refuses, a client gone mid-body), after
    which the body ends: so anything after a b"" means the body failed, and what came
    before it must not be forwarded as if it were whole. (A chunked body's trailers
    also arrive as a b""; the gateway forwards none and refuses them with the rest.)
    """
    ended = False
    async for chunk in protocol:
        if ended:
            raise BadRequest("the request body was cut short or malformed", headers=CLOSE)
        if chunk:
            yield chunk
        else:
            ended = True


def rsgi_request(
    scope: Any, protocol: Any, body: bytes | None = None, refused: Problem | None = None
) -> Request:
    """Wrap a granian RSGI scope and protocol (`body`: already read from it)."""

    async def chunks() -> AsyncIterator[bytes]:
        if body is not None:
            yield body
            return
        async for chunk in read_chunks(protocol):
            yield chunk

    async def read_all() -> bytes:
        if body is not None:
            return body
        return await read_whole(protocol)

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
        whole=read_all,
        refused=refused,
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
