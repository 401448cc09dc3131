"""Open-model load generator: requests start at a fixed arrival rate, whatever the replies do.

Request i is due at start + i / rate. It is sent on an idle keep-alive
connection, a new connection, or (every connection busy) as soon as one frees
up; its latency is measured from the time it was *due*, so a stalled server
shows up as queueing in the percentiles instead of as fewer requests sent
(wrk and ab wait for a reply before sending again: coordinated omission).

Runs as its own process, pinned like wrk: `python -m loadtests.openloop SPEC OUT`.
The spec names the request source (see `build_source`); the result is JSON
that `loadtests.runners` turns into a Measurement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtests import workload
from loadtests.measurement import latency_summary, percentile, timeline_from_stamps

MAX_IN_FLIGHT = 20_000
SATURATED_LAG_P50_MS = 2.0


class Source:
    """Request i as bytes; data-file sources wrap around (and say so) when exhausted."""

    def __init__(self, requests: list[workload.HttpRequest] | None, host: str, close: bool) -> None:
        self.rendered = [r.render(host, close=close) for r in requests or []]
        self.wrapped = 0
        self.draw: Callable[[int], bytes] | None = None

    def __call__(self, i: int) -> bytes:
        if self.draw is not None:
            return self.draw(i)
        if i >= len(self.rendered):
            self.wrapped += 1
        return self.rendered[i % len(self.rendered)]


def build_source(spec: dict[str, Any], host: str, close: bool) -> Source:
    """A request source from the spec's "source" entry."""
    src = spec["source"]
    kind = src["kind"]
    if kind == "product":
        ids = workload.ZipfIds(int(src.get("count", 10)), float(src.get("s", workload.ZIPF_S)))
        by_id = {
            pid: workload.product_request(pid).render(host, close=close)
            for pid in range(1, int(src.get("count", 10)) + 1)
        }
        source = Source(None, host, close)
        source.draw = lambda _i: by_id[ids.draw()]
        return source
    if kind == "login":
        first, count = int(src.get("first", 1)), int(src.get("count", 100))
        users = [workload.login_request(first + k) for k in range(count)]
        source = Source(users, host, close)
        source.draw = lambda i: source.rendered[i % len(source.rendered)]
        return source
    if kind == "payment":
        pairs = workload.read_pairs(Path(src["file"]))
        return Source([workload.payment_request(p) for p in pairs], host, close)
    if kind == "payment-status":
        # Polling the same payments again and again is the point: cycle, never "wrapped".
        owned = workload.read_owned_payments(Path(src["file"]))
        statuses = Source([workload.payment_status_request(o) for o in owned], host, close)
        statuses.draw = lambda i: statuses.rendered[i % len(statuses.rendered)]
        return statuses
    if kind == "callbacks":
        events = workload.read_events(Path(src["file"]))
        return Source([workload.callback_request(e) for e in events], host, close)
    if kind == "fixed":
        body = Path(src["body_file"]).read_bytes() if src.get("body_file") else b""
        request = workload.HttpRequest(src["method"], src["path"], dict(src["headers"]), body)
        source = Source([request], host, close)
        source.draw = lambda _i: source.rendered[0]
        return source
    raise ValueError(f"unknown source kind {kind!r}")


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool, int]:
    """(status, body, connection reusable, bytes read) of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip().lower()
    reusable = headers.get("connection") != "close" and lines[0].startswith("HTTP/1.1")
    if "chunked" in headers.get("transfer-encoding", ""):
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            parts.append(chunk[:-2])
        body = b"".join(parts)
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif status in (204, 304) or status < 200:
        body = b""
    else:
        body = await reader.read()
        reusable = False
    return status, body, reusable, len(head) + len(body)


@dataclass
class Recorder:
    latencies_ms: list[float] = field(default_factory=list)
    done_at: list[float] = field(default_factory=list)
    connect_ms: list[float] = field(default_factory=list)
    send_lag_ms: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    marks: Counter[str] = field(default_factory=Counter)
    bytes_read: int = 0
    max_in_flight: int = 0


class Generator:
    """Paces requests at `rate`, on at most `max_connections` connections."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.host: str = spec["host"]
        self.port = int(spec["port"])
        self.rate = float(spec["rate"])
        self.duration_s = float(spec["duration_s"])
        self.close = bool(spec.get("close", False))
        self.max_connections = int(spec.get("max_connections", 256))
        self.timeout_s = float(spec.get("timeout_s", 10.0))
        self.sniff = bool(spec.get("sniff_callbacks", False))
        self.source = build_source(spec, f"{self.host}:{self.port}", self.close)
        self.rec = Recorder()
        self.idle: list[Conn] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[Conn | None]] = deque()
        self.in_flight = 0

    async def _connect(self) -> Conn:
        began = time.perf_counter()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), self.timeout_s
        )
        self.rec.connect_ms.append((time.perf_counter() - began) * 1000.0)
        return Conn(reader, writer)

    async def _acquire(self) -> Conn:
        if not self.close and self.idle:
            return self.idle.pop()
        if self.open >= self.max_connections:
            fut: asyncio.Future[Conn | None] = asyncio.get_running_loop().create_future()
            self.waiters.append(fut)
            handed = await fut
            if handed is not None:
                return handed
        else:
            self.open += 1
        try:
            return await self._connect()
        except BaseException:
            self._free_slot()
            raise

    def _free_slot(self) -> None:
        if self.waiters:
            self.waiters.popleft().set_result(None)  # the slot passes to the waiter
        else:
            self.open -= 1

    def _release(self, conn: Conn, reusable: bool) -> None:
        if reusable and not self.close:
            if self.waiters:
                self.waiters.popleft().set_result(conn)
            else:
                self.idle.append(conn)
            return
        conn.close()
        self._free_slot()

    async def _one(self, i: int, due: float, origin: float) -> None:
        self.in_flight += 1
        self.rec.max_in_flight = max(self.rec.max_in_flight, self.in_flight)
        try:
            conn = await self._acquire()
        except (OSError, TimeoutError):
            self.rec.errors["connect"] += 1
            self.in_flight -= 1
            return
        reusable = False
        try:
            conn.writer.write(self.source(i))
            self.rec.marks["sent"] += 1
            status, body, reusable, size = await asyncio.wait_for(
                read_response(conn.reader), self.timeout_s
            )
            now = time.perf_counter()
            self.rec.latencies_ms.append((now - due) * 1000.0)
            self.rec.done_at.append(now - origin)
            self.rec.statuses[str(status)] += 1
            self.rec.bytes_read += size
            if self.sniff and status == 200:
                for word in ("processed", "duplicate"):
                    if f'"{word}"'.encode() in body:
                        self.rec.marks[word] += 1
        except TimeoutError:
            self.rec.errors["timeout"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            self.rec.errors["read"] += 1
        finally:
            self.in_flight -= 1
            self._release(conn, reusable)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        total = int(self.rate * self.duration_s)
        # Latency clock: perf_counter (uvloop's loop.time() ticks in whole milliseconds).
        origin = time.perf_counter() + 0.05
        tasks: set[asyncio.Task[None]] = set()
        not_sent = 0
        for i in range(total):
            due = origin + i / self.rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            self.rec.send_lag_ms.append(max(0.0, (time.perf_counter() - due) * 1000.0))
            if self.in_flight >= MAX_IN_FLIGHT:
                not_sent += 1
                continue
            task = loop.create_task(self._one(i, due, origin))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=self.timeout_s + 1.0)
        for conn in self.idle:
            conn.close()
        return self._result(total, not_sent)

    def _result(self, total: int, not_sent: int) -> dict[str, Any]:
        rec = self.rec
        completed = len(rec.latencies_ms)
        span = max(self.duration_s, max(rec.done_at, default=0.0))
        lag = sorted(rec.send_lag_ms)
        errors = dict(rec.errors)
        if not_sent:
            errors["not_sent"] = not_sent
        opened = len(rec.connect_ms)
        lag_p99 = percentile(lag, 99) if lag else 0.0
        lag_p50 = percentile(lag, 50) if lag else 0.0
        return {
            "tool": "openloop",
            "duration_s": span,
            "requests": completed,
            "rps": completed / span if span else 0.0,
            "latency_ms": latency_summary(rec.latencies_ms),
            "statuses": dict(rec.statuses),
            "socket_errors": errors,
            "kb_per_s": rec.bytes_read / 1024.0 / span if span else 0.0,
            "connect_ms": sum(rec.connect_ms) / opened if opened else None,
            "conn_reuse_rate": max(0.0, 1.0 - opened / completed) if completed else None,
            "timeline": timeline_from_stamps(rec.done_at, 0.0),
            "marks": {
                **dict(rec.marks),
                **({"wrapped": self.source.wrapped} if self.source.wrapped else {}),
            },
            "extra": {
                "rate": self.rate,
                "intended": total,
                "connections_opened": opened,
                "max_in_flight": rec.max_in_flight,
                "send_lag_ms": {
                    "p50": lag_p50,
                    "p99": lag_p99,
                    "max": lag[-1] if lag else 0.0,
                },
                # The generator itself fell behind: a backlog of due requests makes the
                # *median* send lag grow (a busy neighbour only stretches the tail).
                "saturated": lag_p50 > SATURATED_LAG_P50_MS,
            },
        }


async def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return await Generator(spec).run()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m loadtests.openloop SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    try:
        import uvloop

        result = uvloop.run(run_spec(spec))
    except ImportError:
        result = asyncio.run(run_spec(spec))
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
