"""A TCP proxy with faults switched on and off at run time, after Toxiproxy's toxics.

Put it between a client (a pool, a service) and a real server (Postgres, Redis, an
HTTP upstream) and point the client at `proxy.url`. Each toxic applies at once to
the live connections and to new ones, until `clear()`:

- `latency(ms, direction)`: every chunk is delivered `ms` after it arrived (order kept;
  chunks in flight together are not delayed one after another);
- `timeout(close_after_ms=None)`: a black hole: data is swallowed both ways and the
  connection stays open (or is closed after `close_after_ms`);
- `reset_peer(after_ms=0)`: the client's connections are aborted with a TCP RST;
- `limit_data(n, direction)`: a connection is closed once it has carried `n` bytes;
- `drop_next_reply()`: the server's next reply is lost and its client reset: the
  request ran, only the answer did not arrive (INV-5).

"upstream" is client to server, "downstream" server to client (Toxiproxy's words).
FLT-1 (tests/support/test_faultproxy.py) checks each toxic against an echo server.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Literal, Self
from urllib.parse import urlsplit, urlunsplit

Direction = Literal["upstream", "downstream"]
DIRECTIONS: tuple[Direction, ...] = ("upstream", "downstream")
CHUNK = 65_536
SCHEME_PORTS = {"postgres": 5432, "postgresql": 5432, "redis": 6379, "http": 80}


class FaultProxy:
    """A proxy on 127.0.0.1 (a free port) to one server; toxics switch at run time."""

    def __init__(self, target_host: str, target_port: int, *, url: str | None = None) -> None:
        self.target = (target_host, target_port)
        self._target_url = url
        self.port = 0
        self.accepted = 0  # client connections accepted so far
        self.drops = 0  # replies lost to drop_next_reply
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._clear_toxics()

    @classmethod
    def for_url(cls, url: str) -> Self:
        """A proxy to the server of `url` (postgresql://, redis://, http://)."""
        parts = urlsplit(url)
        port = parts.port or SCHEME_PORTS[parts.scheme]
        return cls(parts.hostname or "127.0.0.1", port, url=url)

    @property
    def url(self) -> str:
        """The URL given to `for_url`, with the proxy's address in place of the server's."""
        assert self._target_url is not None, "made by for_url"
        assert self.port, "started"
        parts = urlsplit(self._target_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@" if userinfo else ""
        return urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{self.port}"))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Abort rather than cancel: Python 3.11's start_server reports a cancelled
        # connection handler as an error.
        tasks = [link.task for link in self._links]
        for link in list(self._links):
            link.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.stop()

    # -- toxics ------------------------------------------------------------------------

    def latency(self, ms: float, *, direction: Direction | Literal["both"] = "both") -> None:
        """Deliver each chunk `ms` after it arrived, in `direction` (or both)."""
        for each in DIRECTIONS if direction == "both" else (direction,):
            self._latency_s[each] = ms / 1000

    def timeout(self, close_after_ms: float | None = None) -> None:
        """Black hole: swallow all data; close connections after `close_after_ms` if given."""
        self._black_hole = True
        self._black_hole_close_ms = close_after_ms
        for link in self._links:
            link.on_black_hole(close_after_ms)

    def reset_peer(self, after_ms: float = 0) -> None:
        """Abort client connections with a TCP RST, at once or `after_ms` later."""
        self._reset_after_ms = after_ms
        for link in self._links:
            link.schedule(after_ms, link.reset)

    def limit_data(self, n: int, *, direction: Direction = "downstream") -> None:
        """Close each connection once it has carried `n` more bytes in `direction`."""
        self._limit[direction] = n
        for link in self._links:
            link.left[direction] = n

    def drop_next_reply(self) -> None:
        """Lose the next chunk the server sends, and reset the client that waits for it."""
        self._drop_next = True

    def clear(self) -> None:
        """Remove every toxic (pending closes and resets are called off)."""
        self._clear_toxics()
        for link in self._links:
            link.left = dict(self._limit)
            link.cancel_timers()

    def _clear_toxics(self) -> None:
        self._latency_s: dict[Direction, float] = dict.fromkeys(DIRECTIONS, 0.0)
        self._limit: dict[Direction, int | None] = dict.fromkeys(DIRECTIONS, None)
        self._black_hole = False
        self._black_hole_close_ms: float | None = None
        self._reset_after_ms: float | None = None
        self._drop_next = False

    # -- connections -------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), timeout=5
            )
        except (OSError, TimeoutError):
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        link = _Link(self, writer, up_writer, task)
        self._links.add(link)
        if self._black_hole:
            link.on_black_hole(self._black_hole_close_ms)
        if self._reset_after_ms is not None:
            link.schedule(self._reset_after_ms, link.reset)
        try:
            await link.run(reader, up_reader)
        finally:
            self._links.discard(link)
            link.cancel_timers()


class _Link:
    """One client connection and its connection to the server."""

    def __init__(
        self,
        proxy: FaultProxy,
        client: asyncio.StreamWriter,
        server: asyncio.StreamWriter,
        task: asyncio.Task[None],
    ) -> None:
        self.proxy = proxy
        self.client = client
        self.server = server
        self.task = task
        self.left: dict[Direction, int | None] = dict(proxy._limit)  # bytes still allowed
        self._timers: list[asyncio.TimerHandle] = []

    async def run(self, client: asyncio.StreamReader, server: asyncio.StreamReader) -> None:
        queues: dict[Direction, asyncio.Queue[tuple[float, bytes]]] = {
            d: asyncio.Queue() for d in DIRECTIONS
        }
        readers = [
            asyncio.create_task(self._read(client, "upstream", queues["upstream"])),
            asyncio.create_task(self._read(server, "downstream", queues["downstream"])),
        ]
        senders = [
            asyncio.create_task(self._send(queues["upstream"], self.server, "upstream")),
            asyncio.create_task(self._send(queues["downstream"], self.client, "downstream")),
        ]
        try:
            # Either side ending (after what was in flight was delivered) ends the link.
            await asyncio.wait(senders, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in readers + senders:
                task.cancel()
            await asyncio.gather(*readers, *senders, return_exceptions=True)
            self.close()

    async def _read(
        self,
        reader: asyncio.StreamReader,
        direction: Direction,
        queue: asyncio.Queue[tuple[float, bytes]],
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(CHUNK):
                if not self.proxy._black_hole:
                    queue.put_nowait((loop.time() + self.proxy._latency_s[direction], data))
        except OSError:
            pass
        finally:  # b"" marks the end, delayed like the data before it
            queue.put_nowait((loop.time() + self.proxy._latency_s[direction], b""))

    async def _send(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        direction: Direction,
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await queue.get()
            if (wait := due - loop.time()) > 0:
                await asyncio.sleep(wait)
            if not data:
                return
            if direction == "downstream" and self.proxy._drop_next:
                self.proxy._drop_next = False
                self.proxy.drops += 1
                self.reset()
                return
            left = self.left[direction]
            if left is not None:
                data = data[:left]
                self.left[direction] = left - len(data)
            if data:
                writer.write(data)
                await writer.drain()
            if self.left[direction] == 0:
                return  # limit_data: the link closes after exactly n bytes

    def on_black_hole(self, close_after_ms: float | None) -> None:
        if close_after_ms is not None:
            self.schedule(close_after_ms, self.close)

    def schedule(self, after_ms: float, action: Callable[[], None]) -> None:
        self._timers.append(asyncio.get_running_loop().call_later(after_ms / 1000, action))

    def cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    def reset(self) -> None:
        """Abort the client's connection with an RST (SO_LINGER 0), and drop the server's."""
        sock = self.client.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.abort()

    def abort(self) -> None:
        self.client.transport.abort()
        self.server.transport.abort()

    def close(self) -> None:
        for writer in (self.client, self.server):
            writer.close()
