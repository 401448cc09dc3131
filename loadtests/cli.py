"""`shopstack loadtest`: run the scenarios and write the reports; `compare`; `check`.

    shopstack loadtest [--target URL] [--slo FILE] [options]   run, report, audit, gate
    shopstack loadtest compare OLD.json NEW.json                deltas beyond noise
    shopstack loadtest check REPORT.json --slo FILE             gate an existing report

Exit codes: 0 all good; 1 a correctness failure, an SLO miss or a regression;
2 the run could not be made (tools missing, stack unreachable, bad arguments).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from loadtests import audit, calibrate, cpucost, environment, tools
from loadtests.compare import main as compare_main
from loadtests.html import render_html
from loadtests.prepare import PrepareError
from loadtests.processes import Pinning, discover
from loadtests.report import SCHEMA_VERSION, load_json, render_markdown, write_json
from loadtests.results import PROVIDER, SERVICES, ScenarioResult
from loadtests.sampler import Sampler
from loadtests.scenarios import SCENARIOS, execute
from loadtests.session import SCENARIO_NAMES, Options, Session
from loadtests.slo import SloFileError, evaluate, load_slo
from loadtests.statsprobe import StatsProbe
from services.common.launcher import read_stack_file


def _pairs(text: str, kind: type[float] | type[int]) -> dict[str, Any]:
    """ "name=N,other=M" (or a bare N meaning every scenario) -> {name: N}."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.rpartition("=")
        name = name if sep else "*"
        value = value.removesuffix("/s")
        if name != "*" and name not in SCENARIO_NAMES:
            raise argparse.ArgumentTypeError(f"unknown scenario {name!r}")
        try:
            out[name] = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad number in {part!r}") from None
    return out


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="shopstack loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = Options()
    # A stack started here by `make run` records its data servers' URLs.
    running = read_stack_file(Path(os.environ.get("SHOPSTACK_DATA_DIR", ".data")))
    p.add_argument("--target", default=d.target, help="the stack's gateway (default %(default)s)")
    p.add_argument("--slo", type=Path, help="SLO file: exit 1 listing every threshold missed")
    p.add_argument(
        "--scenarios",
        default=",".join(d.scenarios),
        help=f"comma-separated subset of {', '.join(SCENARIO_NAMES)}",
    )
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds per repeat")
    p.add_argument("--warmup", type=float, default=d.warmup_s, help="seconds of discarded warm-up")
    p.add_argument("--repeats", type=int, default=d.repeats, help="closed-loop repeats (median)")
    p.add_argument(
        "--open-duration",
        type=float,
        default=d.open_duration_s,
        help="seconds of the open-model run (0: skip)",
    )
    p.add_argument(
        "--rate",
        type=lambda t: _pairs(t, float),
        default={},
        help="open-model arrival rate: N/s for all, or name=N,...; "
        "default a fraction (--open-fraction) of the closed-loop median",
    )
    p.add_argument("--open-fraction", type=float, default=d.open_fraction)
    p.add_argument(
        "--connections",
        type=lambda t: _pairs(t, int),
        default={},
        help="name=N,... connections per scenario",
    )
    p.add_argument(
        "--users", type=int, default=d.users, help="demo users the login scenario cycles"
    )
    p.add_argument(
        "--token-users",
        type=int,
        default=d.token_users,
        help="demo users whose fresh orders the payment scenario pays",
    )
    p.add_argument(
        "--long-tail",
        action="store_true",
        help="product ids from 1..1000 (Zipf, the flash sale at the head)",
    )
    p.add_argument("--no-calibration", action="store_true", help="skip the hello-app ceiling")
    p.add_argument("--calibration-duration", type=float, default=d.calibration_duration_s)
    p.add_argument(
        "--pin",
        choices=("auto", "provider-inside", "none"),
        default=d.pin,
        help="auto: generator and provider sandbox on the last CPU, the other services on "
        "the others (taskset); provider-inside: the sandbox with the services",
    )
    p.add_argument(
        "--database-url",
        default=os.environ.get("SHOPSTACK_DATABASE_URL") or running.get("database_url"),
        help="the stack's Postgres, for the audit (default $SHOPSTACK_DATABASE_URL, else "
        "what a local `make run` recorded in .data/run/stack.json)",
    )
    p.add_argument(
        "--redis-url",
        default=os.environ.get("SHOPSTACK_REDIS_URL") or running.get("redis_url"),
    )
    p.add_argument("--out", type=Path, default=d.out_dir, help="reports go to OUT/<timestamp>/")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s, 1 repeat, no warm-up, 2 s open model, no calibration",
    )
    return p


def options_from(args: argparse.Namespace) -> Options:
    names = tuple(n.strip() for n in args.scenarios.split(",") if n.strip())
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"shopstack loadtest: unknown scenarios {unknown}; known: {SCENARIO_NAMES}"
        )
    opts = Options(
        target=args.target.rstrip("/"),
        scenarios=names,
        duration_s=args.duration,
        warmup_s=args.warmup,
        repeats=max(1, args.repeats),
        open_duration_s=args.open_duration,
        open_fraction=args.open_fraction,
        rates=args.rate,
        connections=args.connections,
        users=args.users,
        token_users=args.token_users,
        product_ids=1000 if args.long_tail else 10,
        calibration=not args.no_calibration,
        calibration_duration_s=args.calibration_duration,
        pin=args.pin,
        database_url=args.database_url,
        redis_url=args.redis_url,
        out_dir=args.out,
    )
    if args.quick:
        opts.duration_s, opts.warmup_s, opts.repeats = 2.0, 0.0, 1
        opts.open_duration_s, opts.calibration = 2.0, False
    return opts


def _reachable(target: str) -> str | None:
    try:
        resp = httpx.get(target + "/healthz", timeout=3.0)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if resp.status_code == 200 else f"/healthz answered {resp.status_code}"


async def _baseline(database_url: str | None) -> dict[int, dict[str, int]]:
    if not database_url:
        return {}
    import asyncpg

    try:
        conn = await asyncpg.connect(database_url, timeout=10)
    except (OSError, asyncpg.PostgresError):
        return {}
    try:
        return await audit.snapshot(conn)
    finally:
        await conn.close()


def run(opts: Options, slo_path: Path | None) -> tuple[int, dict[str, Any], Path]:
    """The whole run; returns (exit code, report, report directory)."""
    began = time.monotonic()
    slo = load_slo(slo_path) if slo_path else None
    started = datetime.now(UTC)
    out_dir = opts.out_dir / started.strftime("%Y%m%d-%H%M%S")
    workdir = out_dir / "work"
    workdir.mkdir(parents=True, exist_ok=True)
    plan = tools.plan_cpus(opts.pin)
    groups = discover(opts.gateway_port, opts.database_url, opts.redis_url)
    env = environment.collect(
        groups=groups,
        plan=plan,
        database_url=opts.database_url,
        redis_url=opts.redis_url,
        target=opts.target,
    )
    session = Session(opts, plan, workdir, groups)
    notes: list[str] = []
    if not any(s in groups for s in SERVICES):
        notes.append("no service process found behind the target's ports: RSS/CPU not sampled")
    if {"payment", "payment-status", "callbacks", "callbacks-unique"} & set(opts.scenarios):
        # Before the baseline: the PUT resets the product's units on sale.
        try:
            session.ensure_product()
        except (PrepareError, httpx.HTTPError) as exc:
            notes.append(f"the load-test product could not be created: {exc}")
    baseline = asyncio.run(_baseline(opts.database_url))
    results: list[ScenarioResult] = []
    with Sampler(groups) as sampler:
        session.sampler = sampler
        if opts.calibration:
            shapes = sorted(
                {SCENARIOS[n].shape(session) for n in opts.scenarios}, key=lambda s: s.key
            )
            session.calibration = calibrate.calibrate(
                shapes, duration_s=opts.calibration_duration_s, plan=plan, workdir=workdir
            )
        services = [g for name, g in groups.items() if name in SERVICES and name != PROVIDER]
        provider = [g for name, g in groups.items() if name == PROVIDER]
        with (
            Pinning(services, plan.services),
            Pinning(provider, plan.provider),
            StatsProbe(opts.target) as probe,
        ):
            for name in opts.scenarios:
                results += execute(SCENARIOS[name], session)
        session.ledger.stats_available = probe.available and bool(probe.replies)
        session.ledger.stats_accepted = list(probe.accepted)
    audited = asyncio.run(
        audit.run_audit(opts.database_url, baseline, session.ledger, base_url=opts.target)
    )
    report: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "started_at": started.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "elapsed_s": round(time.monotonic() - began, 1),
        "options": {
            "target": opts.target,
            "scenarios": list(opts.scenarios),
            "duration_s": opts.duration_s,
            "warmup_s": opts.warmup_s,
            "repeats": opts.repeats,
            "open_duration_s": opts.open_duration_s,
            "open_fraction": opts.open_fraction,
            "users": opts.users,
            "token_users": opts.token_users,
            "product_ids": opts.product_ids,
            "pin": opts.pin,
        },
        "environment": env,
        "calibration": session.calibration,
        "scenarios": [r.to_dict() for r in cpucost.annotate(results, env)],
        "audit": audited.to_dict(),
        "stats_probe": {"accepted": len(probe.accepted), "replies": dict(probe.replies)},
        "notes": notes,
        "slo": None,
    }
    misses = evaluate(slo, report) if slo else []
    if slo is not None:
        report["slo"] = {"file": slo.path, "misses": misses}
    errors = [r.key for r in results if r.status == "error"]
    reasons = []
    if audited.failed:
        reasons.append("correctness audit failed")
    if misses:
        reasons.append(f"{len(misses)} SLO miss(es)")
    if errors:
        reasons.append("scenarios in error: " + ", ".join(errors))
    report["verdict"] = "failed" if reasons else "passed"
    report["verdict_reason"] = "; ".join(reasons)
    report["elapsed_s"] = round(time.monotonic() - began, 1)
    write_json(report, out_dir / "report.json")
    (out_dir / "report.md").write_text(render_markdown(report))
    (out_dir / "report.html").write_text(render_html(report))
    return (1 if reasons else 0), report, out_dir


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["compare"]:
        p = argparse.ArgumentParser(prog="shopstack loadtest compare")
        p.add_argument("old", type=Path)
        p.add_argument("new", type=Path)
        p.add_argument("--floor", type=float, default=0.05, help="minimum noise (default 5 %%)")
        ns = p.parse_args(args[1:])
        try:
            return compare_main(ns.old, ns.new, floor=ns.floor)
        except (OSError, ValueError) as exc:
            print(f"shopstack loadtest compare: {exc}", file=sys.stderr)
            return 2
    if args[:1] == ["check"]:
        p = argparse.ArgumentParser(prog="shopstack loadtest check")
        p.add_argument("report", type=Path)
        p.add_argument("--slo", type=Path, required=True)
        ns = p.parse_args(args[1:])
        try:
            misses = evaluate(load_slo(ns.slo), load_json(ns.report))
        except (OSError, ValueError) as exc:
            print(f"shopstack loadtest check: {exc}", file=sys.stderr)
            return 2
        for miss in misses:
            print(f"SLO miss: {miss}")
        print(f"{len(misses)} SLO miss(es) against {ns.slo}")
        return 1 if misses else 0
    ns = run_parser().parse_args(args)
    opts = options_from(ns)
    try:
        tools.require("wrk", "ab")
        if ns.slo is not None:
            load_slo(ns.slo)  # a malformed SLO file fails before minutes of load
    except (tools.ToolMissing, SloFileError, OSError) as exc:
        print(f"shopstack loadtest: {exc}", file=sys.stderr)
        return 2
    problem = _reachable(opts.target)
    if problem:
        print(
            f"shopstack loadtest: the stack is not reachable at {opts.target} ({problem}).\n"
            "Start it in another shell with `make run`, or pass --target URL.",
            file=sys.stderr,
        )
        return 2
    code, report, out_dir = run(opts, ns.slo)
    print(render_markdown(report))
    print(f"reports: {out_dir}/report.md, report.json, report.html")
    if report["verdict"] != "passed":
        print(f"FAILED: {report['verdict_reason']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
