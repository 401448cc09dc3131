"""The RSGI request adapter: a declared body is read in one go, with every cap kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from services.common.errors import PayloadTooLarge, RequestTimeout
from services.gateway.http import BadRequest, rsgi_request


@dataclass
class Scope:
    headers: dict[str, str]
    method: str = "POST"
    path: str = "/api/v1/payments"
    query_string: str = ""
    client: str = "[2001:db8::1]:50000"
    scheme: str = "http"


@dataclass
class Protocol:
    """granian's RSGI protocol as the adapter uses it: awaited whole, or iterated."""

    body: bytes
    delay_s: float = 0.0
    reads: list[str] = field(default_factory=list)

    async def __call__(self) -> bytes:
        self.reads.append("whole")
        await asyncio.sleep(self.delay_s)
        return self.body

    def __aiter__(self) -> AsyncIterator[bytes]:
        self.reads.append("chunks")
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        await asyncio.sleep(self.delay_s)
        for start in range(0, len(self.body), 4):
            yield self.body[start : start + 4]


async def test_a_declared_body_is_one_read() -> None:
    protocol = Protocol(b'{"amount": 1}')
    request = rsgi_request(Scope({"content-length": "13"}), protocol)
    assert request.client == "2001:db8::1"
    assert await request.body(limit=100, timeout_s=1.0) == b'{"amount": 1}'
    assert protocol.reads == ["whole"]


async def test_an_undeclared_body_is_read_in_chunks_and_capped() -> None:
    protocol = Protocol(b"x" * 10)
    request = rsgi_request(Scope({}), protocol)
    assert await request.body(limit=10, timeout_s=1.0) == b"x" * 10
    assert protocol.reads == ["chunks"]
    with pytest.raises(PayloadTooLarge):
        await rsgi_request(Scope({}), Protocol(b"x" * 11)).body(limit=10, timeout_s=1.0)


@pytest.mark.parametrize("declared", ["11", "99999999999"])
async def test_a_declared_body_past_the_limit_is_refused_unread(declared: str) -> None:
    protocol = Protocol(b"x" * 11)
    with pytest.raises(PayloadTooLarge):
        await rsgi_request(Scope({"content-length": declared}), protocol).body(
            limit=10, timeout_s=1.0
        )
    assert protocol.reads == []


async def test_a_body_longer_than_the_limit_is_refused_even_if_read_whole() -> None:
    protocol = Protocol(b"x" * 11)  # a server that did not hold the body to its length
    with pytest.raises(PayloadTooLarge):
        await rsgi_request(Scope({"content-length": "5"}), protocol).body(limit=10, timeout_s=1.0)


async def test_bad_length_and_slow_bodies() -> None:
    with pytest.raises(BadRequest):
        await rsgi_request(Scope({"content-length": "-1"}), Protocol(b"")).body(
            limit=10, timeout_s=1.0
        )
    for headers in ({"content-length": "3"}, {}):
        slow = Protocol(b"abc", delay_s=1.0)
        with pytest.raises(RequestTimeout):
            await rsgi_request(Scope(headers), slow).body(limit=10, timeout_s=0.05)


async def test_a_body_read_by_a_fast_path_is_not_read_again() -> None:
    protocol = Protocol(b"never read")
    request = rsgi_request(Scope({"content-length": "3"}), protocol, b"abc")
    assert request.prechecked
    assert await request.body(limit=10, timeout_s=1.0) == b"abc"
    assert protocol.reads == []


async def test_a_chunked_body_is_counted_even_with_a_small_declared_length() -> None:
    # Transfer-Encoding overrides Content-Length (RFC 9112 6.3): the declared length
    # bounds nothing, so the body is read in counted chunks.
    protocol = Protocol(b"x" * 11)
    headers = {"content-length": "3", "transfer-encoding": "chunked"}
    with pytest.raises(PayloadTooLarge):
        await rsgi_request(Scope(headers), protocol).body(limit=10, timeout_s=1.0)
    assert protocol.reads == ["chunks"]
