"""An upstream HTTP/1.1 stub that records every request exactly as it was framed on the
wire (IN-7): each header line as received, the body as its framing delimited it.

It parses the byte stream itself, strictly (CRLF only, one framing per request), so a
request smuggled inside another's bytes shows up as a request of its own, and a
request that carried both Content-Length and Transfer-Encoding is recorded as such.
Every request gets a small 200 JSON reply on a kept-alive connection. `/healthz`
(the gateway's readiness probe) is answered but not recorded.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

REPLY_BODY = b'{"ok":true}'
REPLY = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
    len(REPLY_BODY),
    REPLY_BODY,
)
MAX_HEAD = 65_536


class Unframed(Exception):
    """Bytes the stub could not take as a request: recorded, and the connection closed."""


@dataclass(frozen=True)
class Received:
    """One request as the stub read it off the wire."""

    method: str
    target: str
    headers: list[tuple[str, str]]  # as received: names in their case, in their order
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name]


@dataclass
class _Connection:
    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)


class RecordingUpstream:
    """A threaded raw-socket HTTP/1.1 server on 127.0.0.1 (a free port)."""

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.requests: list[Received] = []
        self.unframed: list[bytes] = []  # bytes that were not a well-framed request
        self.connections = 0
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RecordingUpstream:
        self._spawn(self._accept)
        return self

    def stop(self) -> None:
        self._stopping.set()
        for thread in self._threads:
            thread.join(5)
        self._listener.close()
        for sock in self._socks:
            sock.close()

    def take(self) -> tuple[list[Received], list[bytes]]:
        """The requests (and unframed bytes) recorded since the last take."""
        with self._lock:
            taken = (self.requests, self.unframed)
            self.requests, self.unframed = [], []
        return taken

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            sock.settimeout(0.2)
            with self._lock:
                self._socks.append(sock)
                self.connections += 1
            self._spawn(self._serve, _Connection(sock))

    def _serve(self, conn: _Connection) -> None:
        while not self._stopping.is_set():
            try:
                received = self._next_request(conn)
            except Unframed:
                with self._lock:
                    self.unframed.append(bytes(conn.buffer))
                conn.sock.close()
                return
            except (ConnectionError, EOFError, OSError):
                conn.sock.close()
                return
            if received.target != "/healthz":
                with self._lock:
                    self.requests.append(received)
            conn.sock.sendall(REPLY)

    def _fill(self, conn: _Connection) -> None:
        while True:
            if self._stopping.is_set():
                raise EOFError
            try:
                data = conn.sock.recv(65_536)
            except TimeoutError:
                continue
            if not data:
                if conn.buffer:
                    raise Unframed
                raise EOFError
            conn.buffer += data
            return

    def _line(self, conn: _Connection) -> bytes:
        while (end := conn.buffer.find(b"\r\n")) < 0:
            if len(conn.buffer) > MAX_HEAD:
                raise Unframed
            self._fill(conn)
        line = bytes(conn.buffer[:end])
        if b"\n" in line or b"\r" in line:
            raise Unframed  # a bare LF or CR: never sent by a careful client
        del conn.buffer[: end + 2]
        return line

    def _exactly(self, conn: _Connection, size: int) -> bytes:
        while len(conn.buffer) < size:
            self._fill(conn)
        data = bytes(conn.buffer[:size])
        del conn.buffer[:size]
        return data

    def _next_request(self, conn: _Connection) -> Received:
        request_line = self._line(conn).decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or parts[2] != "HTTP/1.1":
            raise Unframed
        headers: list[tuple[str, str]] = []
        while line := self._line(conn):
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or name != name.strip() or not name:
                raise Unframed
            headers.append((name, value.strip(" \t")))
        lengths = [v for k, v in headers if k.lower() == "content-length"]
        codings = [v for k, v in headers if k.lower() == "transfer-encoding"]
        if codings:
            if codings != ["chunked"]:
                raise Unframed
            body = self._chunked(conn)
        elif lengths:
            if len(lengths) != 1 or not lengths[0].isdigit():
                raise Unframed
            body = self._exactly(conn, int(lengths[0]))
        else:
            body = b""
        return Received(parts[0], parts[1], headers, body)

    def _chunked(self, conn: _Connection) -> bytes:
        parts: list[bytes] = []
        while True:
            size_text = self._line(conn).split(b";", 1)[0]
            try:
                size = int(size_text, 16)
            except ValueError:
                raise Unframed from None
            if size == 0:
                while self._line(conn):  # trailers
                    pass
                return b"".join(parts)
            parts.append(self._exactly(conn, size))
            if self._exactly(conn, 2) != b"\r\n":
                raise Unframed


@contextlib.contextmanager
def recording_upstream() -> Iterator[RecordingUpstream]:
    """A started stub, stopped (its sockets closed) on the way out."""
    upstream = RecordingUpstream().start()
    try:
        yield upstream
    finally:
        upstream.stop()
