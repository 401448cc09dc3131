"""IN-7: the request smuggling suite, raw bytes against a real gateway under granian.

The gateway runs as its own process (`shopstack serve gateway`: granian, RSGI, hyper's
HTTP/1 parser) with every upstream pointed at a stub that reads the byte stream itself
and records each request exactly as it was framed on the wire (tests/support/
rawupstream.py): a request hidden inside another's body would reach it as a request of
its own, and a request carrying both Content-Length and Transfer-Encoding would be seen.

Each case is a client request crafted so that two parsers could disagree on where it
ends: CL.TE, TE.CL, obfuscated Transfer-Encoding, duplicate Content-Length, bare LF in
a chunk size line or extension, chunk sizes no parser should take, and a second request
pipelined in the same packet. Pass criterion (RELIABILITY.md IN-7): each gets 400, or
is read by its Transfer-Encoding alone and the connection is then closed; the stub
sees exactly the requests the client sent that should reach it (0 or 1 each, with the
body the chunks gave), every one framed by a single Content-Length and nothing
smuggled. Transfer-Encoding cases of the adapter alone are in test_http.py.

Found here (fixed in the gateway): granian's body iterator turns a chunk framing
error, or a client gone mid-body, into an empty chunk and ends the body, and the
gateway forwarded what it had got (a 200 with an empty body upstream for "1\\nZ", "-1",
"0x1" or an overflowing size); "identity, chunked" and two Transfer-Encoding lines were
taken by their last coding on a kept-alive connection.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import ServiceProcess, start_service
from tests.support.rawupstream import Received, RecordingUpstream, recording_upstream

CALLBACK = "/api/v1/payments/callbacks/psp"  # a POST forwarded without a user
SMUGGLED = "/api/v1/stats/smuggled"  # what a smuggled request would ask for
OPEN_WAIT_S = 0.5  # how long a kept-alive connection is watched for a close


@pytest.fixture(scope="module")
def upstream() -> Iterator[RecordingUpstream]:
    with recording_upstream() as stub:
        yield stub


@pytest.fixture(scope="module")
def gateway(
    seeded: str,
    service_env: dict[str, str],
    upstream: RecordingUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServiceProcess]:
    env = {
        **service_env,
        "SHOPSTACK_CATALOG_URL": upstream.url,
        "SHOPSTACK_PAYMENT_URL": upstream.url,
        "SHOPSTACK_STATS_URL": upstream.url,
    }
    process = start_service(
        "gateway", env=env, log_path=tmp_path_factory.mktemp("in7") / "gateway.log"
    )
    try:
        yield process
    finally:
        process.stop()
    assert "Traceback" not in process.log(), process.log()[-4000:]


@pytest.fixture
def stub(upstream: RecordingUpstream, gateway: ServiceProcess) -> RecordingUpstream:
    upstream.take()  # start each case from a clean record
    return upstream


@dataclass
class Exchange:
    statuses: list[int] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    closed: bool = False


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def fill(self) -> bool:
        try:
            data = self.sock.recv(65_536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def reply(self) -> tuple[int, dict[str, str], bytes] | None:
        while b"\r\n\r\n" not in self.buffer:
            if not self.fill():
                return None
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = int(headers.get("content-length", "0"))
        while len(self.buffer) < size:
            if not self.fill():
                return None
        body, self.buffer = self.buffer[:size], self.buffer[size:]
        return status, headers, body


def exchange(gateway: ServiceProcess, raw: bytes, replies: int = 1) -> Exchange:
    """Send raw bytes on a new connection; read up to `replies` replies, then see
    whether the gateway closes the connection."""
    result = Exchange()
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(raw)
        reader = _Reader(sock)
        for _ in range(replies):
            reply = reader.reply()
            if reply is None:
                break
            result.statuses.append(reply[0])
            result.headers.append(reply[1])
            result.bodies.append(reply[2])
        if not reader.eof:
            sock.settimeout(OPEN_WAIT_S)
            with contextlib.suppress(TimeoutError):
                reader.fill()
        assert reader.buffer == b"", f"bytes past the replies: {reader.buffer[:200]!r}"
        result.closed = reader.eof
    return result


def assert_well_framed(received: list[Received]) -> None:
    """Every forwarded request has one framing: a single Content-Length (or none for an
    empty body) and never Transfer-Encoding."""
    for request in received:
        assert request.values("transfer-encoding") == [], request
        lengths = request.values("content-length")
        assert lengths in ([], [str(len(request.body))]), request
        if request.body:
            assert lengths == [str(len(request.body))], request


def head(*lines: str, path: str = CALLBACK, method: str = "POST") -> bytes:
    start = [f"{method} {path} HTTP/1.1", "Host: gateway", "PSP-Signature: t=1,v1=00"]
    return ("\r\n".join(start + list(lines)) + "\r\n\r\n").encode("latin-1")


def smuggled_request() -> bytes:
    return f"GET {SMUGGLED} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST = b"0\r\n\r\n"


@dataclass(frozen=True)
class Case:
    """A request (maybe two in one packet) and what must come of it."""

    raw: bytes
    statuses: list[int]
    upstream: list[tuple[str, str, bytes]]  # exactly what the stub must receive
    must_close: bool = True  # else the connection may stay open


def refused(raw: bytes) -> Case:
    return Case(raw, [400], [])


def chunks_then_close(raw: bytes, body: bytes) -> Case:
    """Read by its Transfer-Encoding alone, forwarded once, then the connection closes."""
    return Case(raw, [200], [("POST", CALLBACK, body)])


_CL_TE_BODY = LAST + smuggled_request()
_TE_CL_BODY = chunk(smuggled_request()) + LAST

CASES: dict[str, Case] = {
    # CL.TE: a Content-Length reader takes the whole as one body, a chunked reader sees
    # an empty body followed by a GET. Read as chunks; the GET never runs: closed.
    "cl-te": chunks_then_close(
        head(f"Content-Length: {len(_CL_TE_BODY)}", "Transfer-Encoding: chunked") + _CL_TE_BODY,
        b"",
    ),
    # TE.CL: a Content-Length reader stops after the chunk size line and runs the GET; chunks
    # carry the GET as data: forwarded as the body of the one request, never run.
    "te-cl": chunks_then_close(
        head("Transfer-Encoding: chunked", "Content-Length: 4") + _TE_CL_BODY,
        smuggled_request(),
    ),
    "te-cl-lengths-first": chunks_then_close(
        head("Content-Length: 4", "Transfer-Encoding: chunked") + _TE_CL_BODY,
        smuggled_request(),
    ),
    # Obfuscated Transfer-Encoding, each with a Content-Length that would disagree.
    "te-xchunked": refused(
        head("Content-Length: 5", "Transfer-Encoding: xchunked") + chunk(b"Z") + LAST
    ),
    "te-leading-space": chunks_then_close(
        head("Content-Length: 5", "Transfer-Encoding:  chunked") + chunk(b"Z") + LAST, b"Z"
    ),
    "te-tab": chunks_then_close(
        head("Content-Length: 5", "Transfer-Encoding:\tchunked") + chunk(b"Z") + LAST, b"Z"
    ),
    "te-mixed-case": chunks_then_close(
        head("Content-Length: 5", "Transfer-Encoding: ChUnKeD") + chunk(b"Z") + LAST, b"Z"
    ),
    "te-mixed-case-alone": chunks_then_close(
        head("Transfer-Encoding: cHuNkEd") + chunk(b"Z") + LAST, b"Z"
    ),
    "te-space-before-colon": refused(
        head("Content-Length: 5", "Transfer-Encoding : chunked") + chunk(b"Z") + LAST
    ),
    "te-folded-line": refused(
        head("Content-Length: 5", "X-Pad: 1", " Transfer-Encoding: chunked") + chunk(b"Z") + LAST
    ),
    "te-vertical-tab": refused(
        head("Content-Length: 5", "Transfer-Encoding: \x0bchunked") + chunk(b"Z") + LAST
    ),
    "te-chunked-identity": refused(
        head("Content-Length: 5", "Transfer-Encoding: chunked, identity") + chunk(b"Z") + LAST
    ),
    "te-identity-chunked": refused(
        head("Transfer-Encoding: identity, chunked") + chunk(b"Z") + LAST
    ),
    "te-two-lines-chunked-last": refused(
        head("Transfer-Encoding: identity", "Transfer-Encoding: chunked") + chunk(b"Z") + LAST
    ),
    "te-two-lines-chunked-first": refused(
        head("Transfer-Encoding: chunked", "Transfer-Encoding: identity") + chunk(b"Z") + LAST
    ),
    "te-chunked-twice": refused(
        head("Transfer-Encoding: chunked", "Transfer-Encoding: chunked") + chunk(b"Z") + LAST
    ),
    "te-on-http-1.0": refused(
        head("Transfer-Encoding: chunked").replace(b"HTTP/1.1", b"HTTP/1.0", 1) + chunk(b"Z") + LAST
    ),
    # Duplicate Content-Length.
    "cl-two-values": refused(head("Content-Length: 2", "Content-Length: 41") + b"{}" + b"x" * 39),
    "cl-list": refused(head("Content-Length: 2, 41") + b"{}" + b"x" * 39),
    "cl-signed": refused(head("Content-Length: +2") + b"{}"),
    # The same value twice is one length (RFC 9110 8.6): one request, one length.
    "cl-same-twice": Case(
        head("Content-Length: 2", "Content-Length: 2") + b"{}",
        [200],
        [("POST", CALLBACK, b"{}")],
        must_close=False,
    ),
    # Chunk size lines and extensions.
    "chunk-size-bare-lf": refused(head("Transfer-Encoding: chunked") + b"1\nZ\r\n" + LAST),
    "chunk-data-bare-lf": refused(head("Transfer-Encoding: chunked") + b"1\r\nZ\n" + LAST),
    "chunk-extension-bare-lf": refused(head("Transfer-Encoding: chunked") + b"1;ext\nZ\r\n" + LAST),
    "chunk-extension-hides-a-size": refused(
        head("Transfer-Encoding: chunked") + b"1;a=b\n2\r\nZ\r\n" + LAST
    ),
    "chunk-size-hex-overflow": refused(
        head("Transfer-Encoding: chunked") + b"10000000000000001\r\nZ\r\n" + LAST
    ),
    "chunk-size-negative": refused(head("Transfer-Encoding: chunked") + b"-1\r\nZ\r\n" + LAST),
    "chunk-size-0x": refused(head("Transfer-Encoding: chunked") + b"0x1\r\nZ\r\n" + LAST),
    "chunk-size-plus": refused(head("Transfer-Encoding: chunked") + b"+1\r\nZ\r\n" + LAST),
    "chunk-size-too-small": refused(head("Transfer-Encoding: chunked") + b"1\r\nZZ\r\n" + LAST),
    # granian hands trailers to the app exactly as it hands a framing error (an empty
    # chunk, then the end): the gateway cannot tell them apart and forwards neither.
    "chunk-trailer-section": refused(
        head("Transfer-Encoding: chunked") + chunk(b"Z") + b"0\r\nX-Trailer: 1\r\n\r\n"
    ),
    # A well-formed extension is ignored; the connection may stay open.
    "chunk-extension": Case(
        head("Transfer-Encoding: chunked") + b'1;name=value;q="a b"\r\nZ\r\n' + LAST,
        [200],
        [("POST", CALLBACK, b"Z")],
        must_close=False,
    ),
    # A second request in the same packet is a request of its own, never body bytes.
    "pipelined-after-length": Case(
        head("Content-Length: 2") + b"{}" + smuggled_request(),
        [200, 200],
        [("POST", CALLBACK, b"{}"), ("GET", SMUGGLED, b"")],
        must_close=False,
    ),
    "pipelined-after-chunks": Case(
        head("Transfer-Encoding: chunked") + chunk(b"{}") + LAST + smuggled_request(),
        [200, 200],
        [("POST", CALLBACK, b"{}"), ("GET", SMUGGLED, b"")],
        must_close=False,
    ),
    "pipelined-after-bodyless-get": Case(
        head(method="GET", path="/api/v1/stats/first") + smuggled_request(),
        [200, 200],
        [("GET", "/api/v1/stats/first", b""), ("GET", SMUGGLED, b"")],
        must_close=False,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_in7_each_request_is_refused_or_framed_once(
    gateway: ServiceProcess, stub: RecordingUpstream, name: str
) -> None:
    case = CASES[name]
    result = exchange(gateway, case.raw, replies=len(case.statuses))
    received, unframed = stub.take()
    assert result.statuses == case.statuses, (result, received)
    if case.must_close:
        assert result.closed, "the connection stayed open after an ambiguous request"
    if result.statuses[0] == 400:
        assert result.headers[0].get("connection") == "close"
    assert unframed == []
    assert [(r.method, r.target, r.body) for r in received] == case.upstream
    assert_well_framed(received)


def test_in7_an_order_smuggled_past_a_user_route_is_framed_once(
    gateway: ServiceProcess, stub: RecordingUpstream
) -> None:
    """The same CL.TE on a user's write route (rate-limited, with the sold-out fast path)."""
    login = httpx.post(
        f"{gateway.url}/api/v1/auth/login",
        json={"username": "demo1", "password": "demo-password-1"},
        timeout=10,
    )
    assert login.status_code == 200, login.text
    token = login.json()["access_token"]
    body = b'{"product_id": 1, "quantity": 1}'
    chunked = chunk(body) + LAST + smuggled_request()
    raw = (
        "POST /api/v1/orders HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(chunked)}\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode() + chunked
    result = exchange(gateway, raw)
    received, unframed = stub.take()
    assert result.statuses == [200]
    assert result.closed
    assert unframed == []
    assert [(r.method, r.target, r.body) for r in received] == [("POST", "/api/v1/orders", body)]
    assert_well_framed(received)


def _answered(gateway: ServiceProcess, route: str) -> dict[str, float]:
    """The gateway's own count of answered requests on `route`, by status."""
    text = httpx.get(gateway.url + "/metrics", timeout=5).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "shopstack_http_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("route") == route:
                status = sample.labels["status"]
                counts[status] = counts.get(status, 0.0) + sample.value
    return counts


@pytest.mark.parametrize(
    "partial",
    [
        head("Transfer-Encoding: chunked") + b"20\r\n" + b'{"event": "partial"',
        head("Transfer-Encoding: chunked") + chunk(b'{"event": ') + b"10\r\nhalf",
        head("Content-Length: 40") + b'{"event": "partial"',
    ],
    ids=["inside-a-chunk", "after-a-whole-chunk", "declared-length"],
)
def test_in7_a_body_cut_short_by_a_client_gone_is_never_forwarded(
    gateway: ServiceProcess, stub: RecordingUpstream, partial: bytes
) -> None:
    """Before the fix the chunked ones reached the stub as a whole request with what had
    arrived, and the declared one was a 500 with a traceback."""
    before = _answered(gateway, CALLBACK)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(partial)
        time.sleep(0.1)  # the gateway is reading the body when the client goes
    deadline = time.monotonic() + 5.0
    after = before
    while after == before and time.monotonic() < deadline:
        time.sleep(0.05)
        after = _answered(gateway, CALLBACK)
    new = {status: after[status] - before.get(status, 0.0) for status in after}
    assert {s: n for s, n in new.items() if n} == {"400": 1.0}
    received, unframed = stub.take()
    assert received == []
    assert unframed == []
