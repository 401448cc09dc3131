"""Short-connection benchmark of payment (not a test; run it by hand, a minute or so).

    .venv/bin/python -m tests.payment.bench [--duration 10] [--connections 32]

It starts, as separate processes: a bare granian ASGI hello (the baseline, same
granian options as payment), the catalog stand-in, the PSP sandbox (0 ms latency)
and payment (`shopstack serve payment`) on a fresh database, then measures with
wrk and ab, every request on a new connection (`Connection: close` / HTTP/1.0):

1. hello, wrk; 2. POST /api/v1/payments, wrk, a fresh order per request;
3. hello, ab; 4. the signed callback endpoint, ab, the same event every time (so all
but the first are duplicates). Afterwards it counts double charges.
Needs SHOPSTACK_DATABASE_URL and SHOPSTACK_REDIS_URL (real servers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson

from services.common.migrations import apply_migrations
from services.psp_sandbox.webhooks import signature_header
from tests.psp_sandbox.process import ROOT, WEBHOOK_SECRET, ServiceProcess, start_service
from tests.support.servers import create_database, drop_database, free_port, with_redis_db

BENCH_USER = "bench-user"


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The baseline: the smallest ASGI app granian can serve."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            done = (
                message["type"]
                .replace(".startup", ".startup.complete")
                .replace(".shutdown", ".shutdown.complete")
            )
            await send({"type": done})
            if message["type"] == "lifespan.shutdown":
                return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"5")],
        }
    )
    await send({"type": "http.response.body", "body": b"hello"})


def standin_main(port: int, count: int, out: Path) -> None:
    """Serve the catalog stand-in with `count` reserved orders; their ids go to `out`."""
    from aiohttp import web

    from tests.payment.catalog_standin import CatalogStandIn

    async def run() -> None:
        server = CatalogStandIn(port)
        ids = [str(server.add_order(BENCH_USER, amount_cents=1000).id) for _ in range(count)]
        out.write_text("\n".join(ids) + "\n")
        await server.start()
        await asyncio.Event().wait()

    del web
    asyncio.run(run())


LUA = """
local ids = {}
for line in io.lines(os.getenv("BENCH_ORDERS")) do ids[#ids + 1] = line end
local i = 0
request = function()
  i = i + 1
  local body = '{"order_id":"' .. ids[i] .. '"}'
  return wrk.format("POST", "/api/v1/payments", {["Content-Type"] = "application/json",
    ["X-User-Id"] = "BENCH_USER", ["Connection"] = "close"}, body)
end
""".replace("BENCH_USER", BENCH_USER)


def wrk(
    url: str, *, duration: int, connections: int, script: Path | None, env: dict[str, str]
) -> dict[str, Any]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "-H", "Connection: close"]
    if script is not None:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True, env=env).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {
        "cmd": " ".join([*cmd, url]),
        "rps": rps,
        "requests": total,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "none",
        "latency": re.search(r"Latency\s+(\S+)\s+(\S+)\s+(\S+)", out).groups(),  # type: ignore[union-attr]
    }


def ab(url: str, *, requests: int, connections: int, extra: list[str]) -> dict[str, Any]:
    cmd = ["ab", "-q", "-n", str(requests), "-c", str(connections), *extra, url]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {
        "cmd": " ".join(cmd),
        "rps": float(re.search(r"Requests per second:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "failed": int(re.search(r"Failed requests:\s+(\d+)", out).group(1)),  # type: ignore[union-attr]
        "non_2xx": int(m.group(1)) if (m := re.search(r"Non-2xx responses:\s+(\d+)", out)) else 0,
        "p50_ms": int(re.search(r"\s50%\s+(\d+)", out).group(1)),  # type: ignore[union-attr]
        "p99_ms": int(re.search(r"\s99%\s+(\d+)", out).group(1)),  # type: ignore[union-attr]
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--orders", type=int, default=20_000)
    parser.add_argument("--standin", nargs=3, metavar=("PORT", "COUNT", "OUT"))
    parser.add_argument(
        "--payments-only", action="store_true", help="skip the baselines (for profiling)"
    )
    args = parser.parse_args()
    if args.standin:
        standin_main(int(args.standin[0]), int(args.standin[1]), Path(args.standin[2]))
        return 0

    admin_dsn = os.environ["SHOPSTACK_DATABASE_URL"]
    redis_url = with_redis_db(
        os.environ["SHOPSTACK_REDIS_URL"], int(os.environ.get("SHOPSTACK_TEST_REDIS_DB", "9"))
    )
    dsn = asyncio.run(create_database(admin_dsn))
    asyncio.run(apply_migrations(dsn))
    run_dir = Path(tempfile.mkdtemp(prefix="bench-payments-"))
    procs: list[subprocess.Popen[bytes]] = []
    services: list[ServiceProcess] = []
    try:
        hello_port, standin_port, payment_port = free_port(), free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "granian",
                    "--interface",
                    "asgi",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(hello_port),
                    "--http",
                    "1",
                    "--backlog",
                    "4096",
                    "--no-ws",
                    "--loop",
                    "uvloop",
                    "--log-level",
                    "warning",
                    "tests.payment.bench:hello",
                ],
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        orders_file = run_dir / "orders.txt"
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.payment.bench",
                    "--standin",
                    str(standin_port),
                    str(args.orders),
                    str(orders_file),
                ],
                cwd=ROOT,
            )
        )
        psp = start_service(
            "psp_sandbox",
            port=free_port(),
            env={
                "SHOPSTACK_REDIS_URL": redis_url,
                "SHOPSTACK_PSP_KEY_PREFIX": f"psp-bench-{uuid.uuid4().hex[:6]}:",
                "SHOPSTACK_PSP_CALLBACK_URL": f"http://127.0.0.1:{payment_port}/api/v1/payments/callbacks/psp",
                "SHOPSTACK_LOG_LEVEL": "WARNING",
            },
            run_dir=run_dir,
        )
        services.append(psp)
        payment = start_service(
            "payment",
            port=payment_port,
            env={
                "SHOPSTACK_DATABASE_URL": dsn,
                "SHOPSTACK_REDIS_URL": redis_url,
                "SHOPSTACK_CATALOG_URL": f"http://127.0.0.1:{standin_port}",
                "SHOPSTACK_PSP_URL": psp.url,
                "SHOPSTACK_LOG_LEVEL": "WARNING",
            },
            run_dir=run_dir,
        )
        services.append(payment)
        deadline = time.monotonic() + 30
        while not (
            orders_file.exists() and httpx.get(f"http://127.0.0.1:{hello_port}/").status_code == 200
        ):
            if time.monotonic() > deadline:
                raise TimeoutError("hello or stand-in did not start")
            time.sleep(0.2)
        script = run_dir / "payments.lua"
        script.write_text(LUA)
        env = {**os.environ, "BENCH_ORDERS": str(orders_file)}
        hello_url = f"http://127.0.0.1:{hello_port}/"
        results: dict[str, Any] = {}
        if not args.payments_only:
            results["hello (wrk)"] = wrk(
                hello_url,
                duration=args.duration,
                connections=args.connections,
                script=None,
                env=env,
            )
        watched = {
            "payment": payment.process.pid,
            "psp_sandbox": psp.process.pid,
            "standin": procs[1].pid,
        }
        before = cpu_seconds(watched)
        results["payments (wrk)"] = wrk(
            payment.url,
            duration=args.duration,
            connections=args.connections,
            script=script,
            env=env,
        )
        after = cpu_seconds(watched)
        results["cpu s during payments"] = cpu_delta(before, after)
        event = orjson.dumps(
            {
                "id": "evt_bench_" + uuid.uuid4().hex,
                "type": "charge.succeeded",
                "created": int(time.time()),
                "data": {
                    "charge_id": "ch_bench",
                    "payment_id": str(uuid.uuid4()),
                    "amount_cents": 1000,
                    "currency": "EUR",
                },
            }
        )
        body_file = run_dir / "event.json"
        body_file.write_bytes(event)
        if args.payments_only:
            results["charges"] = asyncio.run(double_charges(dsn, psp.url))
            print(results)
            return 0
        count = max(1000, int(results["hello (wrk)"]["rps"] * args.duration / 4))
        results["hello (ab)"] = ab(
            hello_url, requests=count, connections=args.connections, extra=[]
        )
        results["callbacks (ab)"] = ab(
            payment.url + "/api/v1/payments/callbacks/psp",
            requests=count,
            connections=args.connections,
            extra=[
                "-p",
                str(body_file),
                "-T",
                "application/json",
                "-H",
                "PSP-Signature: " + signature_header(WEBHOOK_SECRET, event),
            ],
        )
        results["charges"] = asyncio.run(double_charges(dsn, psp.url))
        for name, result in results.items():
            print(f"{name}: {result}")
        pay_ratio = results["payments (wrk)"]["rps"] / results["hello (wrk)"]["rps"]
        callback_ratio = results["callbacks (ab)"]["rps"] / results["hello (ab)"]["rps"]
        print(f"ratio payments/hello (wrk): {pay_ratio:.3f}")
        print(f"ratio callbacks/hello (ab): {callback_ratio:.3f}")
    finally:
        for service in services:
            service.stop()
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        asyncio.run(drop_database(admin_dsn, dsn))
    return 0


ProcessTimes = dict[str, dict[tuple[int, float], float]]


def cpu_seconds(pids: dict[str, int]) -> ProcessTimes:
    """CPU time (user + system) per process of each tree, and of Postgres and Redis,
    keyed by (pid, start time) so that cpu_delta() can pair the same processes."""
    import psutil

    def times_of(procs: list[psutil.Process]) -> dict[tuple[int, float], float]:
        out: dict[tuple[int, float], float] = {}
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                times = proc.cpu_times()
                out[(proc.pid, proc.create_time())] = times.user + times.system
        return out

    totals: ProcessTimes = {}
    for name, pid in pids.items():
        root = psutil.Process(pid)
        totals[name] = times_of([root, *root.children(recursive=True)])
    for name, prefix in (("postgres", "postgres"), ("redis", "redis-server")):
        matching = [
            proc
            for proc in psutil.process_iter(["name"])
            if (proc.info["name"] or "").startswith(prefix)
        ]
        totals[name] = times_of(matching)
    return totals


def cpu_delta(before: ProcessTimes, after: ProcessTimes) -> dict[str, float]:
    """CPU seconds spent between the two samples, per group. A process that started in
    between counts from zero; one that ended in between is left out (an undercount,
    never the negative figure a difference of sums gives when a backend exits)."""
    return {
        name: round(sum(t - before.get(name, {}).get(key, 0.0) for key, t in procs.items()), 1)
        for name, procs in after.items()
    }


async def double_charges(dsn: str, psp_url: str) -> dict[str, int]:
    """Payments made, charges the provider created for them, orders charged twice."""
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT id, order_id, status FROM payments")
        twice = await conn.fetchval(
            "SELECT count(*) FROM (SELECT order_id FROM payments WHERE status = 'succeeded' "
            "GROUP BY order_id HAVING count(*) > 1) t"
        )
    finally:
        await conn.close()
    charges = 0
    async with httpx.AsyncClient(base_url=psp_url, timeout=10) as client:
        for row in rows:
            doc = (await client.get("/_sandbox/stats", params={"reference": str(row["id"])})).json()
            charges += doc["charges_created"]
    return {
        "payments": len(rows),
        "succeeded": sum(1 for r in rows if r["status"] == "succeeded"),
        "provider_charges": charges,
        "orders_paid_twice": int(twice),
    }


if __name__ == "__main__":
    sys.exit(main())
