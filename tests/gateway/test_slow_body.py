"""IN-6: a body trickling in at 10 B/s, over real sockets, to real granian servers.

The stack here runs with a 2 s body deadline (the default is 30 s). A client that
sends its headers and then ten bytes a second is answered 408 problem+json once the
deadline passes and its connection is closed, on the gateway (RSGI), on payment's
fast lane and on a FastAPI route of the catalog; meanwhile the same workers keep
answering everyone else.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from services.catalog.seed import seed_products
from services.common.embedded import EmbeddedRedis
from tests.support.servers import free_port, free_port_block, migrated_database
from tests.support.stack import RunningStack, start_stack, stop_stack

DEADLINE_S = 2.0


@pytest.fixture(scope="module")
def slow_stack(
    servers: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningStack]:
    # A Redis of its own: the session's stack keeps its gate in the shared test Redis.
    redis = EmbeddedRedis(tmp_path_factory.mktemp("in6-redis"), port=free_port())
    redis_url = redis.start()
    with migrated_database(servers[0]) as dsn:

        async def seed() -> None:
            conn = await asyncpg.connect(dsn)
            try:
                await seed_products(conn, 5)
            finally:
                await conn.close()

        asyncio.run(seed())
        env = {
            "SHOPSTACK_ENV": "test",
            "SHOPSTACK_DATABASE_URL": dsn,
            "SHOPSTACK_REDIS_URL": redis_url,
            "SHOPSTACK_LOG_LEVEL": "WARNING",
            "SHOPSTACK_BODY_READ_TIMEOUT_S": str(DEADLINE_S),
        }
        running = start_stack(
            base_port=free_port_block([0, 1, 2, 3, 9]),
            env=env,
            log_path=tmp_path_factory.mktemp("in6-stack") / "up.log",
        )
        try:
            yield running
        finally:
            leftovers = stop_stack(running)
            redis.stop()
            assert leftovers == []


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
