"""What the payment-status scenario sends: its data file, the open-model source, the wrk script.

The closed (wrk) and open (generator) runs of a scenario must send the same requests
from the same data file; the wrk script is checked against a real HTTP server that
records every request it receives.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from loadtests import workload
from loadtests.openloop import build_source
from loadtests.runners import lua_script, run_wrk
from loadtests.tools import CpuPlan

HOST = "127.0.0.1:9"


@dataclass(frozen=True)
class Seen:
    """One request as a server received it (header names lower-cased)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


def parse_request(raw: bytes) -> Seen:
    head, _, body = raw.partition(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, path, version = request_line.split(" ")
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Seen(method, path, headers, body)


def owned_payments(count: int) -> list[workload.OwnedPayment]:
    return [
        workload.OwnedPayment(
            f"tok-{n}.{uuid.uuid4().hex}", str(uuid.uuid4()), workload.client_address(n)
        )
        for n in range(1, count + 1)
    ]


@contextmanager
def recording_server() -> Iterator[tuple[str, list[Seen]]]:
    """A real HTTP/1.1 server answering 200 to everything and keeping what it was sent."""
    seen: list[Seen] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen.append(Seen(self.command, self.path, headers, body))
            reply = b'{"status":"succeeded"}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            if self.close_connection:  # the client asked for it: say so, as granian does
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_owned_payments_file_round_trip(tmp_path: Path) -> None:
    owned = owned_payments(5)
    path = workload.write_owned_payments(tmp_path / "payment_status.tsv", owned)
    assert workload.read_owned_payments(path) == owned
    assert len(path.read_text().splitlines()) == 5


def test_payment_status_request_is_the_owner_reading_their_payment() -> None:
    (owned,) = owned_payments(1)
    request = workload.payment_status_request(owned)
    assert request.method == "GET"
    assert request.path == f"/api/v1/payments/{owned.payment_id}"
    assert request.headers["Authorization"] == f"Bearer {owned.token}"
    assert request.headers["X-Forwarded-For"] == owned.client
    assert request.body == b""


def test_open_model_source_polls_each_payment_as_its_owner(tmp_path: Path) -> None:
    owned = owned_payments(3)
    path = workload.write_owned_payments(tmp_path / "payment_status.tsv", owned)
    spec = {"source": {"kind": "payment-status", "file": str(path)}}
    source = build_source(spec, HOST, close=True)
    sent = [parse_request(source(i)) for i in range(7)]
    for i, request in enumerate(sent):
        expected = owned[i % 3]  # cycles through the payments
        assert request.method == "GET"
        assert request.path == f"/api/v1/payments/{expected.payment_id}"
        assert request.headers["authorization"] == f"Bearer {expected.token}"
        assert request.headers["x-forwarded-for"] == expected.client
        assert request.headers["connection"] == "close"
        assert request.headers["host"] == HOST
        assert "content-length" not in request.headers
        assert request.body == b""
    assert source.wrapped == 0  # polling again is the point, not data running out
    keepalive = parse_request(build_source(spec, HOST, close=False)(0))
    assert keepalive.headers["connection"] == "keep-alive"


def test_wrk_script_sends_what_the_open_model_sends(tmp_path: Path) -> None:
    """Two wrk threads, each with its share of the file: every payment is asked for, each
    with its own owner's token and address, on a new connection each time."""
    owned = owned_payments(6)
    path = workload.write_owned_payments(tmp_path / "payment_status.tsv", owned)
    cpus = tuple(sorted(os.sched_getaffinity(0))[:2])
    with recording_server() as (url, seen):
        run = run_wrk(
            base_url=url,
            script=lua_script("payment_status", tmp_path),
            script_args=[str(path)],
            connections=2,
            duration_s=1,
            close=True,
            plan=CpuPlan(generator=cpus),
        )
    measured = run.measurement.classify([200])
    assert measured.requests > 0
    assert measured.errors == 0
    assert measured.statuses == {"200": measured.requests}
    assert "wrapped" not in measured.marks
    open_model = build_source(
        {"source": {"kind": "payment-status", "file": str(path)}}, HOST, close=True
    )
    expected = {r.path: r for r in (parse_request(open_model(i)) for i in range(len(owned)))}
    assert {r.path for r in seen} == set(expected)
    for request in seen:
        want = expected[request.path]
        assert request.method == want.method == "GET"
        assert request.headers["authorization"] == want.headers["authorization"]
        assert request.headers["x-forwarded-for"] == want.headers["x-forwarded-for"]
        assert request.headers["accept"] == want.headers["accept"]
        assert request.headers["connection"] == "close"
        assert request.body == b""
