"""Slow clients over real sockets, against real granian servers (IN-5, IN-6).

The stack here runs with a 2 s body deadline and a 2 s header deadline (the defaults
are 30 s and 10 s). A client that sends its headers and then ten bytes a second is
answered 408 problem+json once the body deadline passes and its connection is closed,
on the gateway (RSGI), on payment's fast lane and on a FastAPI route of the catalog.
Hundreds of connections sending their headers a byte a second are closed at the header
deadline. Meanwhile the same workers keep answering everyone else.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from services.common.embedded import EmbeddedRedis
from tests.support.servers import free_port
from tests.support.stack import RunningStack, private_stack

DEADLINE_S = 2.0
SLOWLORIS_CONNECTIONS = 500


@pytest.fixture(scope="module")
def slow_stack(
    servers: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    # A Redis of its own: the session's stack keeps its gate in the shared test Redis.
    redis = EmbeddedRedis(tmp_path_factory.mktemp("in6-redis"), port=free_port())
    try:
        with private_stack(
            servers[0],
            redis_url=redis.start(),
            log_dir=tmp_path_factory.mktemp("in6-stack"),
            products=5,
            env={
                "SHOPSTACK_BODY_READ_TIMEOUT_S": str(DEADLINE_S),
                "SHOPSTACK_HEADER_READ_TIMEOUT_MS": str(int(DEADLINE_S * 1000)),
            },
        ) as (running, _):
            yield running
    finally:
        redis.stop()


class Trickle(threading.Thread):
    """Send a request's headers, then its body at 10 bytes a second, and read the reply."""

    def __init__(self, url: str, path: str, headers: dict[str, str]) -> None:
        super().__init__(daemon=True)
        host, port = url.removeprefix("http://").split(":")
        self.address = (host, int(port))
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Length: 1000"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.reply = b""
        self.closed = False
        self.sent = 0

    def run(self) -> None:
        with socket.create_connection(self.address, timeout=10) as sock:
            sock.sendall(self.head)
            sock.settimeout(0.1)
            while not self.reply and self.sent < 1000:
                try:
                    sock.sendall(b"{" if self.sent == 0 else b" ")
                    self.sent += 1
                    self.reply = sock.recv(4096)  # waits 0.1 s: 10 B/s
                except TimeoutError:
                    continue
                except OSError:
                    break
            sock.settimeout(5)
            try:
                while chunk := sock.recv(4096):
                    self.reply += chunk
                self.closed = True
            except OSError:
                self.closed = False


@pytest.mark.parametrize(
    ("service", "path", "headers"),
    [
        ("gateway", "/api/v1/payments/callbacks/psp", {"PSP-Signature": "t=1,v1=00"}),
        ("payment", "/api/v1/payments/callbacks/psp", {"PSP-Signature": "t=1,v1=00"}),
        ("catalog", "/api/v1/orders", {"X-User-Id": "in6-buyer"}),
    ],
)
def test_in6_a_slow_body_gets_408_at_the_deadline_and_blocks_nobody(
    slow_stack: RunningStack, service: str, path: str, headers: dict[str, str]
) -> None:
    url = slow_stack.url(service)
    trickle = Trickle(url, path, {"Content-Type": "application/json", **headers})
    started = time.monotonic()
    trickle.start()
    answered = 0
    with httpx.Client(timeout=5.0) as client:
        while trickle.is_alive() and time.monotonic() - started < 3 * DEADLINE_S:
            health = client.get(url + "/healthz")  # the same worker, meanwhile
            assert health.status_code == 200
            answered += 1
            time.sleep(0.05)
    trickle.join(10)
    assert not trickle.is_alive()
    assert trickle.reply.startswith(b"HTTP/1.1 408"), trickle.reply[:200]
    assert b"request-timeout" in trickle.reply
    assert trickle.closed  # the server hung up after answering
    # The deadline counts from the first body read: about 20 bytes had gone at 10 B/s,
    # far from the 1,000 declared.
    assert 5 <= trickle.sent < 100
    assert answered >= 10


def _hung_up(sock: socket.socket) -> bool:
    """True once the server closed the connection (EOF, reset, or a final 408)."""
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return False
    except OSError:
        return True
    return data == b"" or data.startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("service", ["gateway", "catalog"])
def test_in5_slowloris_connections_are_closed_and_block_nobody(
    slow_stack: RunningStack, service: str
) -> None:
    url = slow_stack.url(service)
    host, port = url.removeprefix("http://").split(":")
    head = b"GET /api/v1/products/1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 64
    socks = [
        socket.create_connection((host, int(port)), timeout=5) for _ in range(SLOWLORIS_CONNECTIONS)
    ]
    for sock in socks:
        sock.setblocking(False)
    open_ = set(range(len(socks)))
    legit: list[int] = []
    started = time.monotonic()
    sent = 0
    try:
        with httpx.Client(timeout=5.0) as client:
            while open_ and time.monotonic() - started < 4 * DEADLINE_S:
                for index in list(open_):
                    if _hung_up(socks[index]):
                        open_.discard(index)
                        continue
                    try:
                        socks[index].send(head[sent : sent + 1])  # one byte a second
                    except OSError:
                        open_.discard(index)
                sent += 1
                tick = time.monotonic()
                while time.monotonic() - tick < 1.0:  # everyone else, meanwhile
                    legit.append(client.get(url + "/api/v1/products/1").status_code)
    finally:
        for sock in socks:
            sock.close()
    assert not open_, f"{len(open_)} slow connections still open after {4 * DEADLINE_S} s"
    assert sent < len(head)  # closed while their headers were still incomplete
    assert len(legit) >= 20
    assert set(legit) == {200}
