"""FLT-1: the fault proxy's toxics behave as specified, against a small echo server.

latency adds its delay to the round trip (200 ms measured within +/-10 %, as the
median over several round trips less the median of direct ones, so one slow turn
of a busy machine does not decide) and chunks in flight together are not delayed
one after another; timeout swallows data and keeps the connection open (or closes
it when told); reset_peer gives the client a connection reset; limit_data closes
the connection after exactly N bytes; drop_next_reply loses one answer.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest

from tests.support.faultproxy import FaultProxy

ROUND_TRIPS = 7


@dataclass
class EchoServer:
    port: int
    received: int = 0  # bytes received, all connections together
    closed: int = 0  # connections that ended


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    state = EchoServer(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65_536):
                state.received += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            state.closed += 1
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    server.close()
    await server.wait_closed()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[FaultProxy]:
    async with FaultProxy("127.0.0.1", echo.port) as running:
        yield running


class Clients:
    """Client connections, all closed at the end of the test."""

    def __init__(self) -> None:
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(self, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self.writers.append(writer)
        return reader, writer

    async def median_round_trip(self, port: int) -> float:
        reader, writer = await self.connect(port)
        await round_trip(reader, writer)  # warm up
        return statistics.median([await round_trip(reader, writer) for _ in range(ROUND_TRIPS)])


@pytest.fixture
def clients() -> Iterator[Clients]:
    opened = Clients()
    yield opened
    for writer in opened.writers:
        writer.close()


async def round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> float:
    started = time.perf_counter()
    writer.write(b"ping\n")
    assert await asyncio.wait_for(reader.readexactly(5), timeout=5) == b"ping\n"
    return time.perf_counter() - started


async def assert_open_and_silent(reader: asyncio.StreamReader, wait_s: float = 0.5) -> None:
    """Nothing arrives and the connection is not closed (a read neither returns nor fails)."""
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(100), timeout=wait_s)


async def test_latency_adds_200_ms_to_the_round_trip(
    echo: EchoServer, proxy: FaultProxy, clients: Clients
) -> None:
    direct = await clients.median_round_trip(echo.port)
    proxy.latency(200, direction="downstream")
    added = await clients.median_round_trip(proxy.port) - direct
    assert 0.180 <= added <= 0.220, f"downstream latency added {added * 1000:.1f} ms"
    proxy.latency(100)  # 100 ms each way
    added = await clients.median_round_trip(proxy.port) - direct
    assert 0.180 <= added <= 0.220, f"latency both ways added {added * 1000:.1f} ms"
    proxy.clear()
    assert await clients.median_round_trip(proxy.port) - direct < 0.020


async def test_latency_delays_each_chunk_once_in_order(proxy: FaultProxy, clients: Clients) -> None:
    proxy.latency(200, direction="downstream")
    reader, writer = await clients.connect(proxy.port)
    sent: list[float] = []
    for i in range(5):  # five chunks 30 ms apart, all in flight at once
        writer.write(b"chunk%d" % i)
        sent.append(time.perf_counter())
        await asyncio.sleep(0.03)
    delays = []
    for i in range(5):
        assert await asyncio.wait_for(reader.readexactly(6), timeout=5) == b"chunk%d" % i
        delays.append(time.perf_counter() - sent[i])
    # Each chunk waits its own 200 ms; delayed one after another, the last would wait 1 s.
    assert min(delays) >= 0.19
    assert max(delays) < 0.4, delays


async def test_timeout_swallows_data_and_keeps_the_connection(
    echo: EchoServer, proxy: FaultProxy, clients: Clients
) -> None:
    reader, writer = await clients.connect(proxy.port)
    await round_trip(reader, writer)
    before = echo.received
    proxy.timeout()
    writer.write(b"lost\n")
    await assert_open_and_silent(reader)
    # A connection made during the black hole is accepted, and swallowed too.
    new_reader, new_writer = await clients.connect(proxy.port)
    new_writer.write(b"lost too\n")
    await assert_open_and_silent(new_reader)
    assert echo.received == before
    # Told to close after 300 ms, it does: the client reads the end of the stream.
    proxy.timeout(close_after_ms=300)
    started = time.perf_counter()
    assert await asyncio.wait_for(reader.read(100), timeout=5) == b""
    assert await asyncio.wait_for(new_reader.read(100), timeout=5) == b""
    assert 0.25 <= time.perf_counter() - started < 3
    assert echo.received == before
    proxy.clear()
    assert await clients.median_round_trip(proxy.port) < 0.1


async def test_reset_peer_resets_live_and_new_connections(
    proxy: FaultProxy, clients: Clients
) -> None:
    reader, writer = await clients.connect(proxy.port)
    await round_trip(reader, writer)
    proxy.reset_peer()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), timeout=5)
    reader, writer = await clients.connect(proxy.port)  # accepted, then reset
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), timeout=5)
    # After a delay: the connection works until then.
    proxy.reset_peer(after_ms=300)
    reader, writer = await clients.connect(proxy.port)
    started = time.perf_counter()
    await round_trip(reader, writer)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), timeout=5)
    assert 0.25 <= time.perf_counter() - started < 3
    proxy.clear()
    assert await clients.median_round_trip(proxy.port) < 0.1


async def test_limit_data_closes_after_exactly_n_bytes(
    echo: EchoServer, proxy: FaultProxy, clients: Clients
) -> None:
    proxy.limit_data(10)  # downstream: the client gets 10 bytes of the echo, then the end
    reader, writer = await clients.connect(proxy.port)
    writer.write(b"0123456789abcdefghij")
    assert await asyncio.wait_for(reader.read(), timeout=5) == b"0123456789"
    assert echo.received == 20
    # Upstream: the server gets the first 10 bytes the client sends, then the end.
    proxy.clear()
    proxy.limit_data(10, direction="upstream")
    closed = echo.closed
    reader, writer = await clients.connect(proxy.port)
    writer.write(b"01234")
    assert await asyncio.wait_for(reader.readexactly(5), timeout=5) == b"01234"
    writer.write(b"56789abcdefghij")
    await asyncio.wait_for(reader.read(), timeout=5)  # the client sees the end
    for _ in range(100):
        if echo.closed > closed:
            break
        await asyncio.sleep(0.02)
    assert echo.received == 30


async def test_drop_next_reply_loses_one_answer(
    echo: EchoServer, proxy: FaultProxy, clients: Clients
) -> None:
    reader, writer = await clients.connect(proxy.port)
    proxy.drop_next_reply()
    writer.write(b"ping\n")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(100), timeout=5)
    assert echo.received == 5  # the request arrived; its answer did not
    assert proxy.drops == 1
    assert await clients.median_round_trip(proxy.port) < 0.1  # only the next reply was lost
