"""Gateway benchmarks beside a bare granian hello, measured in the same run.

Run with the stack up (`make run` in another shell):

    .venv/bin/python tools/bench_gateway.py [--repeats 3] [--duration 10]

The server under test (the gateway's granian processes, and the bare hello) is
pinned to core 0 and wrk to core 1 (`taskset`). Targets alternate within each
repeat, so drift on a shared machine hits every target alike; the report gives
the median of the repeats and each target as a ratio of the hello measured in
the same repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

HELLO = """
async def app(scope, proto):
    proto.response_bytes(200, [("content-type", "text/plain")], b"Hello")
"""
SOLD_OUT_LUA = """
wrk.method = "POST"
wrk.body = '{"product_id": %d, "quantity": 1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def wrk(
    url: str, duration: int, *, close: bool = False, script: str | None = None
) -> dict[str, float]:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{duration}s", "--latency"]
    if close:
        cmd += ["-H", "Connection: close"]
    if script:
        cmd += ["-s", script]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"99%\s+([\d.]+\w+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "rps": rps,
        "p99_ms": p99,
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "socket_errors": float(sum(int(g) for g in errors.groups())) if errors else 0.0,
    }


def _ms(text: str) -> float:
    value, unit = re.match(r"([\d.]+)(\w+)", text).groups()  # type: ignore[union-attr]
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def pin(pattern: str, core: int) -> list[psutil.Process]:
    procs = [
        p for p in psutil.process_iter(["cmdline"]) if pattern in " ".join(p.info["cmdline"] or [])
    ]
    for proc in procs:
        for thread in [proc.pid, *(t.id for t in proc.threads())]:
            subprocess.run(["taskset", "-p", "-c", str(core), str(thread)], capture_output=True)
    return procs


def login(base: str, user: str, password: str) -> str:
    if not base.startswith(("http://", "https://")):
        raise ValueError("the gateway URL must be http(s)")
    req = urllib.request.Request(  # noqa: S310 (scheme checked above)
        base + "/api/v1/auth/login",
        data=json.dumps({"username": user, "password": password}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 (local)
        return str(json.load(resp)["access_token"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gateway", default="http://127.0.0.1:8000")
    parser.add_argument("--catalog", default="http://127.0.0.1:8001")
    parser.add_argument("--product", type=int, default=1)
    parser.add_argument(
        "--sold-out-product",
        type=int,
        default=0,
        help="a sold-out product id: adds the sold-out order storm",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "hello.py").write_text(HELLO)
        hello = subprocess.Popen(
            [
                "taskset",
                "-c",
                "0",
                sys.executable,
                "-m",
                "granian",
                "--interface",
                "rsgi",
                "--port",
                "18089",
                "--no-ws",
                "--log-level",
                "warning",
                "hello:app",
            ],
            cwd=tmp,
        )
        try:
            time.sleep(2)
            gateway_procs = pin("services.cli serve gateway", 0)
            targets: dict[str, tuple[str, dict[str, object]]] = {
                "hello (RSGI, keep-alive)": ("http://127.0.0.1:18089/", {}),
                "gateway product detail (keep-alive)": (
                    f"{args.gateway}/api/v1/products/{args.product}",
                    {},
                ),
                "catalog product detail, direct (keep-alive)": (
                    f"{args.catalog}/api/v1/products/{args.product}",
                    {},
                ),
                "hello (RSGI, Connection: close)": ("http://127.0.0.1:18089/", {"close": True}),
                "gateway product detail (Connection: close)": (
                    f"{args.gateway}/api/v1/products/{args.product}",
                    {"close": True},
                ),
            }
            if args.sold_out_product:
                token = login(args.gateway, "demo1", "demo-password-1")
                lua = Path(tmp, "sold_out.lua")
                lua.write_text(SOLD_OUT_LUA % (args.sold_out_product, token))
                targets["gateway sold-out order storm (keep-alive)"] = (
                    f"{args.gateway}/api/v1/orders",
                    {"script": str(lua)},
                )
            results: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
            for _ in range(args.repeats):
                for name, (url, opts) in targets.items():
                    results[name].append(wrk(url, args.duration, **opts))  # type: ignore[arg-type]
            rss = {
                f"{p.pid} {' '.join(p.cmdline()[-2:])}": p.memory_info().rss // 2**20
                for p in gateway_procs
                if p.is_running()
            }
        finally:
            hello.terminate()
            hello.wait(10)

    base_ka = statistics.median(r["rps"] for r in results["hello (RSGI, keep-alive)"])
    base_close = statistics.median(r["rps"] for r in results["hello (RSGI, Connection: close)"])
    base_p99 = statistics.median(r["p99_ms"] for r in results["hello (RSGI, keep-alive)"])
    print(f"cpu: {_cpu()} · cores: {os.cpu_count()} · repeats: {args.repeats} x {args.duration}s")
    print("| target | req/s (median) | × hello | p99 ms (median) | non-2xx | socket errors |")
    print("|---|---|---|---|---|---|")
    for name, runs in results.items():
        rps = statistics.median(r["rps"] for r in runs)
        base = base_close if "close" in name else base_ka
        p99 = statistics.median(r["p99_ms"] for r in runs)
        non2xx = sum(r["non_2xx"] for r in runs)
        errs = sum(r["socket_errors"] for r in runs)
        print(f"| {name} | {rps:,.0f} | {rps / base:.2f} | {p99:.2f} | {non2xx:.0f} | {errs:.0f} |")
    print(f"\nhello p99 (keep-alive, median): {base_p99:.2f} ms")
    print("gateway RSS (MiB): " + ", ".join(f"{k}: {v}" for k, v in rss.items()))
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


if __name__ == "__main__":
    sys.exit(main())
