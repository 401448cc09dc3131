"""The RSGI request adapter: a declared body is read in one go, with every cap kept; a
body granian could not read whole, or odd Transfer-Encoding, is refused (IN-7)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from granian._granian import RSGIProtocolClosed

from services.common.errors import PayloadTooLarge, RequestTimeout
from services.gateway.http import BadRequest, Framing, rsgi_request, transfer_framing


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


@dataclass
class GranianStream:
    """granian's RSGI body iterator as it behaves: a b"" at the end of a body, and a
    b"" in place of an error (after which the body ends), so b"", b"" is a failure."""

    items: list[bytes]

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._items()

    async def _items(self) -> AsyncIterator[bytes]:
        for item in self.items:
            yield item

    async def __call__(self) -> bytes:
        raise RSGIProtocolClosed("RSGI transport is closed")


CHUNKED = {"transfer-encoding": "chunked"}


async def test_a_clean_chunked_body_ends_with_one_empty_read() -> None:
    request = rsgi_request(Scope(CHUNKED), GranianStream([b"ab", b"c", b""]))
    assert await request.body(limit=10, timeout_s=1.0) == b"abc"


@pytest.mark.parametrize(
    "items",
    [
        [b"", b""],  # IN-7: a chunk size line hyper refused ("1\nZ", "-1", "0x1", overflow)
        [b"Z", b"", b""],  # a chunk's data not followed by CRLF; or a client gone mid-body
        [b"Z", b"", b"", b""],
    ],
)
async def test_a_failed_chunked_body_is_refused_not_forwarded_cut_short(
    items: list[bytes],
) -> None:
    """IN-7: granian ended such a body quietly; the gateway forwarded what it had got."""
    with pytest.raises(BadRequest) as refused:
        await rsgi_request(Scope(CHUNKED), GranianStream(items)).body(limit=10, timeout_s=1.0)
    assert refused.value.headers == {"Connection": "close"}


async def test_a_declared_body_cut_short_is_400_not_500() -> None:
    request = rsgi_request(Scope({"content-length": "5"}), GranianStream([]))
    with pytest.raises(BadRequest) as refused:
        await request.body(limit=10, timeout_s=1.0)
    assert refused.value.headers == {"Connection": "close"}


@pytest.mark.parametrize(
    ("codings", "content_length", "framing"),
    [
        (["chunked"], None, Framing.PLAIN),
        (["chunked"], "3", Framing.CLOSE),  # CL.TE / TE.CL: the chunks alone, then close
        (["ChUnKeD"], None, Framing.CLOSE),
        (["identity, chunked"], None, Framing.REFUSE),
        (["identity", "chunked"], None, Framing.REFUSE),
        (["chunked", "chunked"], None, Framing.REFUSE),
        (["chunked, identity"], None, Framing.REFUSE),
        (["xchunked"], None, Framing.REFUSE),
        (["gzip, chunked"], None, Framing.REFUSE),
        (["chunked,"], None, Framing.REFUSE),
        ([""], None, Framing.REFUSE),
    ],
)
def test_in7_transfer_encoding_is_one_chunked_coding_or_refused(
    codings: list[str], content_length: str | None, framing: Framing
) -> None:
    assert transfer_framing(codings, content_length) is framing
