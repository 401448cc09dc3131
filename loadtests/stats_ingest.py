"""Sustained event ingestion against the stats service (or the gateway), beside raw COPY.

Three phases, one run, one table (stats_events):
1. raw COPY: the same kind of rows COPYed straight into stats_events, in chunks of
   --copy-chunk rows on one connection: the ceiling Postgres itself allows here.
2. max: --concurrency senders POST batches of --batch events for --duration s as
   fast as they are answered; the figure is events durably in Postgres per second
   (rows whose stored_at falls in the phase, after a warm-up).
3. paced: an open-loop sender at --paced-fraction of the max phase's durable rate;
   the figure is the ingest lag (stored_at - received_at, and the service's
   shopstack_stats_consumer_lag_seconds gauge).
The stats memory is sampled all along (worker RSS, and RSS and PSS of the whole server).

  python loadtests/stats_ingest.py --spawn --dsn postgresql://postgres@127.0.0.1:5432/bench
  python loadtests/stats_ingest.py --url http://127.0.0.1:8000 --dsn ... --pid <stats pid>

--spawn starts `shopstack serve stats` on a free port with the environment given
(SHOPSTACK_REDIS_URL must be set) and stops it at the end. The rows this script
COPYs are deleted again; rows sent through the service stay in the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import psutil

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("event_id", "type", "product_id", "user_id", "ts", "received_at", "stream_id")
TYPES = (b"view",) * 8 + (b"cart",) * 3 + (b"purchase",)


class IdSource:
    """Unique, valid event ids without the cost of uuid4 (a run prefix and a counter)."""

    def __init__(self) -> None:
        self.prefix = os.urandom(4).hex()
        self.counter = 0

    def next(self) -> str:
        self.counter += 1
        high, low = self.counter >> 48 & 0xFFFF, self.counter & 0xFFFFFFFFFFFF
        return f"{self.prefix}-{high:04x}-4000-8000-{low:012x}"


class BodyMaker:
    """Request bodies of `size` events, cheap to build so the CPU goes to what is measured.

    The load generator shares the machine with the service (the raw COPY phase builds
    its rows before its clock starts). So (type, product, user) triples are drawn once,
    POOL of them, from the distributions below, and each event picks one of them at
    random: the same distributions as drawing per event, at about a quarter of the CPU.
    Event ids are unique; ts is the time the body is built.
    """

    POOL = 100_000

    def __init__(self, ids: IdSource, *, size: int, products: int, users: int) -> None:
        self.ids = ids
        self.size = size
        self.pool = [
            b'","type":"%s","product_id":%d,"user_id":"u%d","ts":"'
            % (
                random.choice(TYPES),
                int(random.paretovariate(1.2)) % products + 1,  # a few hot products, a long tail
                random.randrange(users),
            )
            for _ in range(self.POOL)
        ]

    def make(self) -> bytes:
        ts = datetime.now(UTC).isoformat().encode()
        template = b'{"event_id":"' + self.ids.prefix.encode() + b"-%04x-4000-8000-%012x%s" + ts
        first = self.ids.counter + 1
        self.ids.counter += self.size
        items = [
            template % (n >> 48 & 0xFFFF, n & 0xFFFFFFFFFFFF, pick)
            for n, pick in zip(
                range(first, first + self.size), random.choices(self.pool, k=self.size), strict=True
            )
        ]
        return b"[" + b'"},'.join(items) + b'"}]'


@dataclass
class Phase:
    name: str
    seconds: float = 0.0
    sent_events: int = 0
    accepted_events: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    durable_per_s: float = 0.0
    lag_p50_s: float = 0.0
    lag_p99_s: float = 0.0
    lag_max_s: float = 0.0
    gauge_lag_max_s: float = 0.0
    target_per_s: float = 0.0
    cpu_cores: dict[str, float] = field(default_factory=dict)  # cores busy, by component


def cpu_snapshot(stats_pid: int | None) -> dict[int, tuple[str, float]]:
    """CPU seconds used so far per process: (component, seconds) by pid.

    Components: this load generator, the stats server, Postgres, Redis. Postgres and
    Redis are counted whole: on a shared machine they also serve others.
    """
    stats_pids: set[int] = set()
    if stats_pid is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(stats_pid)
            stats_pids = {root.pid, *(c.pid for c in root.children(recursive=True))}
    snapshot: dict[int, tuple[str, float]] = {}
    me = os.getpid()
    for proc in psutil.process_iter(["name", "cpu_times"]):
        cpu, name = proc.info["cpu_times"], proc.info["name"] or ""
        if cpu is None:
            continue
        if proc.pid == me:
            component = "loadgen"
        elif proc.pid in stats_pids:
            component = "stats"
        elif name.startswith("postgres"):
            component = "postgres"
        elif name.startswith("redis-server"):
            component = "redis"
        else:
            continue
        snapshot[proc.pid] = (component, cpu.user + cpu.system)
    return snapshot


def cpu_used(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds per component between two snapshots (processes born meanwhile count whole)."""
    used = {"loadgen": 0.0, "stats": 0.0, "postgres": 0.0, "redis": 0.0}
    for pid, (component, seconds) in after.items():
        used[component] += seconds - before.get(pid, (component, 0.0))[1]
    return used


class RssSampler:
    """Peak memory of the stats server: its worker's RSS, the RSS of the whole process
    tree, and the tree's PSS (shared pages counted once across the forked processes,
    which the RSS sum counts in each)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.max_worker = 0
        self.max_total = 0
        self.max_total_pss = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        if self.pid is None:
            return
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
            sizes = []
            pss = 0
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    mem = proc.memory_full_info()
                    sizes.append(mem.rss)
                    pss += mem.pss
        except psutil.NoSuchProcess:
            return
        if not sizes:
            return
        self.max_total = max(self.max_total, sum(sizes))
        self.max_total_pss = max(self.max_total_pss, pss)
        self.max_worker = max(self.max_worker, max(sizes[1:] or sizes))

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.25)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.get_running_loop().create_task(self.run())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task:
            self._task.cancel()


async def raw_copy(dsn: str, rows: int, chunk: int, products: int) -> tuple[float, float]:
    """Rows per second, and rows per CPU-second (client + Postgres), of plain binary COPY
    into stats_events; the rows are deleted after."""
    conn = await asyncpg.connect(dsn)
    marker = f"raw-copy-{os.urandom(4).hex()}"
    ids = IdSource()
    now = datetime.now(UTC)
    old = datetime(2000, 1, 1, tzinfo=UTC)
    data = [
        (ids.next(), "view", i % products + 1, f"u{i % 5000}", now, old, marker)
        for i in range(rows)
    ]
    try:
        before = cpu_snapshot(None)
        started = time.perf_counter()
        for first in range(0, rows, chunk):
            await conn.copy_records_to_table(
                "stats_events", records=data[first : first + chunk], columns=COLUMNS
            )
        elapsed = time.perf_counter() - started
        used = cpu_used(before, cpu_snapshot(None))
        await conn.execute("DELETE FROM stats_events WHERE stream_id = $1", marker)
    finally:
        await conn.close()
    busy = used["loadgen"] + used["postgres"]
    return rows / elapsed, rows / busy if busy > 0 else 0.0


async def pg_now(conn: asyncpg.Connection) -> datetime:
    value: datetime = await conn.fetchval("SELECT clock_timestamp()")
    return value


async def gauge_lag(session: aiohttp.ClientSession, metrics_url: str | None) -> float:
    if not metrics_url:
        return 0.0
    try:
        async with session.get(metrics_url) as resp:
            text = await resp.text()
    except aiohttp.ClientError:
        return 0.0
    for line in text.splitlines():
        if line.startswith("shopstack_stats_consumer_lag_seconds"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def send_phase(
    args: argparse.Namespace,
    conn: asyncpg.Connection,
    phase: Phase,
    *,
    rate: float | None,
) -> None:
    """POST batches for args.duration seconds: closed loop (rate None) or open loop at `rate`."""
    bodies = BodyMaker(IdSource(), size=args.batch, products=args.products, users=args.users)
    url = args.url.rstrip("/") + "/api/v1/events"
    headers = {"Content-Type": "application/json"}
    if args.token:
        headers["Authorization"] = f"Bearer {args.token}"
    connector = aiohttp.TCPConnector(limit=args.concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=30)
    lag_samples: list[float] = []
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def post() -> float:
            """Send one batch; return how long the service asked us to back off."""
            body = bodies.make()
            phase.sent_events += args.batch
            backoff = 0.0
            try:
                async with session.post(url, data=body, headers=headers) as resp:
                    await resp.read()
                    key = str(resp.status)
                    if resp.status in (429, 503):
                        backoff = float(resp.headers.get("Retry-After", "1"))
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            phase.statuses[key] = phase.statuses.get(key, 0) + 1
            if key == "202":
                phase.accepted_events += args.batch
            return backoff

        async def watch_lag() -> None:
            while True:
                lag_samples.append(await gauge_lag(session, args.metrics_url))
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch_lag())
        cpu_before = cpu_snapshot(args.pid)
        start_db = await pg_now(conn)
        loop = asyncio.get_running_loop()
        started = loop.time()
        end = started + args.duration
        if rate is None:

            async def sender() -> None:
                while loop.time() < end:
                    backoff = await post()
                    if backoff:  # a polite client: honour Retry-After (bounded by the phase)
                        await asyncio.sleep(min(backoff, max(0.0, end - loop.time())))

            await asyncio.gather(*(sender() for _ in range(args.concurrency)))
        else:
            interval = args.batch / rate
            in_flight: set[asyncio.Task[Any]] = set()
            tick = started
            while tick < end:
                await asyncio.sleep(max(0.0, tick - loop.time()))
                if len(in_flight) < args.concurrency * 4:  # bounded, never unbounded queueing
                    task: asyncio.Task[Any] = asyncio.create_task(post())
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                tick += interval
            await asyncio.gather(*in_flight)
        end_db = await pg_now(conn)
        phase.seconds = loop.time() - started
        used = cpu_used(cpu_before, cpu_snapshot(args.pid))
        phase.cpu_cores = {
            name: round(seconds / phase.seconds, 2) for name, seconds in used.items()
        }
        # Let the writer catch up with what was accepted, then measure from Postgres.
        deadline = loop.time() + 60
        while loop.time() < deadline:
            stored = await conn.fetchval(
                "SELECT count(*) FROM stats_events WHERE received_at >= $1 AND received_at <= $2",
                start_db,
                end_db + timedelta(seconds=1),
            )
            if stored >= phase.accepted_events:
                break
            await asyncio.sleep(0.2)
        watcher.cancel()
        phase.gauge_lag_max_s = max(lag_samples, default=0.0)
    warm = start_db + timedelta(seconds=args.warmup)
    durable = await conn.fetchval(
        "SELECT count(*) FROM stats_events WHERE stored_at >= $1 AND stored_at < $2",
        warm,
        end_db,
    )
    phase.durable_per_s = durable / max(0.001, (end_db - warm).total_seconds())
    lags = await conn.fetchrow(
        """
        SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY lag) AS p50,
               percentile_cont(0.99) WITHIN GROUP (ORDER BY lag) AS p99,
               max(lag) AS max
        FROM (SELECT extract(epoch FROM stored_at - received_at)::float8 AS lag
              FROM stats_events WHERE received_at >= $1 AND received_at <= $2) s
        """,
        warm,
        end_db,
    )
    assert lags is not None  # an aggregate over any set of rows returns one row
    phase.lag_p50_s = float(lags["p50"] or 0)
    phase.lag_p99_s = float(lags["p99"] or 0)
    phase.lag_max_s = float(lags["max"] or 0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn_stats(dsn: str, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "SHOPSTACK_DATABASE_URL": dsn,
        "SHOPSTACK_PORT": str(port),
        "SHOPSTACK_WORKERS": str(workers),
        "SHOPSTACK_LOG_LEVEL": os.environ.get("SHOPSTACK_LOG_LEVEL", "WARNING"),
        "PROMETHEUS_MULTIPROC_DIR": f"/tmp/stats-ingest-prometheus-{port}",
        "PYTHONPATH": str(ROOT),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "stats"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"stats exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return proc, url
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("stats did not start")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    conn = await asyncpg.connect(args.dsn)
    copies: list[float] = []
    batched: list[float] = []

    copy_cpu: list[float] = []

    async def measure_copy() -> None:
        # Chunks of --copy-chunk rows (the ceiling) and of --batch rows (one COPY per request).
        rate, per_cpu_s = await raw_copy(args.dsn, args.copy_rows, args.copy_chunk, args.products)
        copies.append(rate)
        # Rows per CPU-second of client and Postgres: the figure contention moves least.
        copy_cpu.append(per_cpu_s)
        small = await raw_copy(args.dsn, args.copy_rows // 4, args.batch, args.products)
        batched.append(small[0])

    try:
        # Raw COPY before, between and after the service phases: the machine is shared and
        # its load moves, so the baseline is taken three times and its median used.
        await measure_copy()
        with RssSampler(args.pid) as rss:
            best = Phase("max")
            if not args.skip_max:
                await send_phase(args, conn, best, rate=None)
            await measure_copy()
            paced = Phase("paced")
            paced.target_per_s = args.paced_rate or best.durable_per_s * args.paced_fraction
            await send_phase(args, conn, paced, rate=paced.target_per_s)
            rss.sample()
        await measure_copy()
    finally:
        await conn.close()
    copy_rate = statistics.median(copies)

    def per_cpu(phase: Phase) -> float:
        """Durable events per CPU-second of the whole pipeline (client, stats, Postgres, Redis)."""
        cores = sum(phase.cpu_cores.values())
        return phase.durable_per_s / cores if cores > 0 else 0.0

    return {
        "raw_copy_rows_per_s": round(copy_rate),
        "raw_copy_rounds": [round(c) for c in copies],
        "raw_copy_per_batch_rows_per_s": round(statistics.median(batched)),
        "ratio_to_raw_copy": round(best.durable_per_s / copy_rate, 3),
        "ratio_to_best_raw_copy": round(best.durable_per_s / max(copies), 3),
        "raw_copy_rows_per_cpu_s": round(statistics.median(copy_cpu)),
        "service_events_per_cpu_s": round(per_cpu(best)),
        "ratio_per_cpu_s": round(per_cpu(best) / statistics.median(copy_cpu), 3),
        "phases": [asdict(best), asdict(paced)],
        "stats_worker_rss_max_mb": round(rss.max_worker / 2**20, 1),
        "stats_total_rss_max_mb": round(rss.max_total / 2**20, 1),
        "stats_total_pss_max_mb": round(rss.max_total_pss / 2**20, 1),
        "settings": {
            k: str(v) if isinstance(v, Path) else v
            for k, v in vars(args).items()
            if k not in ("dsn", "token")
        },
        "machine": {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--url", help="stats service or gateway base URL")
    parser.add_argument("--dsn", required=True, help="the Postgres the stats service writes to")
    parser.add_argument("--spawn", action="store_true", help="start `shopstack serve stats` here")
    parser.add_argument("--workers", type=int, default=1, help="stats workers with --spawn")
    parser.add_argument("--pid", type=int, help="stats server pid, for RSS (set by --spawn)")
    parser.add_argument("--metrics-url", help="stats /metrics, for the lag gauge (--spawn sets it)")
    parser.add_argument("--token", help="bearer token, when going through the gateway")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--paced-fraction", type=float, default=0.8)
    parser.add_argument(
        "--paced-rate", type=float, help="events/s of the paced phase (else a fraction of max)"
    )
    parser.add_argument(
        "--skip-max", action="store_true", help="only the paced phase (needs --paced-rate)"
    )
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--users", type=int, default=50_000)
    parser.add_argument("--copy-rows", type=int, default=200_000)
    parser.add_argument("--copy-chunk", type=int, default=10_000)
    parser.add_argument("--json", type=Path, help="also write the result here")
    parser.add_argument("--dump-metrics", type=Path, help="save the service's /metrics at the end")
    args = parser.parse_args()
    proc = None
    if args.spawn:
        proc, args.url = spawn_stats(args.dsn, args.workers)
        args.pid = proc.pid
        args.metrics_url = args.metrics_url or args.url + "/metrics"
    if not args.url:
        parser.error("--url or --spawn is required")
    try:
        result = asyncio.run(run(args))
    finally:
        if proc is not None:
            if args.metrics_url and args.dump_metrics:
                import urllib.request

                with urllib.request.urlopen(args.metrics_url, timeout=5) as resp:  # noqa: S310
                    args.dump_metrics.write_bytes(resp.read())
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
