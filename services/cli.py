"""The `shopstack` command: up, serve, migrate, seed, loadtest."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from pathlib import Path

from services.common.settings import DEFAULT_PORTS, SERVICES, CommonSettings, ConfigError, load

DATA_DIR = Path(os.environ.get("SHOPSTACK_DATA_DIR", ".data"))
APP_FACTORIES = {service: f"services.{service}.app:create_app" for service in SERVICES}


def cmd_serve(args: argparse.Namespace) -> int:
    """Run one service under granian (workers, timeouts and limits from settings)."""
    service: str = args.service
    prom_dir = os.environ.setdefault(
        "PROMETHEUS_MULTIPROC_DIR", str((DATA_DIR / "run" / "prometheus" / service).resolve())
    )
    # Must happen before any worker imports prometheus_client: stale files would be summed.
    shutil.rmtree(prom_dir, ignore_errors=True)
    Path(prom_dir).mkdir(parents=True, exist_ok=True)

    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.server import Server

    settings = _service_settings(service)
    _set_sched_policy(settings.cpu_sched_policy)
    server = Server(
        APP_FACTORIES[service],
        address=settings.host,
        port=settings.listen_port,
        # The gateway speaks RSGI (about 2x ASGI's request rate here); the FastAPI services ASGI.
        interface=Interfaces.RSGI if service == "gateway" else Interfaces.ASGI,
        workers=settings.workers,
        factory=True,
        loop=Loops.uvloop,
        websockets=False,
        http=HTTPModes.http1 if settings.granian_http1_only else HTTPModes.auto,
        backlog=settings.granian_backlog,
        backpressure=settings.granian_backpressure,
        # hyper answers 431 past this buffer (and past 100 headers): our header cap.
        http1_settings=HTTP1Settings(
            header_read_timeout=settings.header_read_timeout_ms,
            keep_alive=settings.granian_keep_alive,
            max_buffer_size=settings.max_header_bytes,
        ),
        workers_kill_timeout=settings.shutdown_timeout_s,
        log_access=False,
    )
    server.serve()
    return 0


def _set_sched_policy(policy: str) -> None:
    """Give this process (and the workers and threads it starts) a scheduling policy.

    SCHED_BATCH turns off wake-up preemption: a service that wakes another (a reply on a
    local socket) keeps the core until it waits itself, instead of being switched out at
    once. Where several services share a saturated core, that cuts the CPU each request
    costs; see docs/benchmarks-payments.md. Lowering the policy needs no privilege.
    """
    if policy != "batch" or not hasattr(os, "SCHED_BATCH"):
        return
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:  # a sandbox (seccomp) may refuse: run with the default policy
        print(f"shopstack: SCHED_BATCH refused ({exc}); default policy kept", file=sys.stderr)


def _service_settings(service: str) -> CommonSettings:
    from importlib import import_module

    classes = {
        "gateway": ("services.gateway.settings", "GatewaySettings"),
        "catalog": ("services.catalog.settings", "CatalogSettings"),
        "payment": ("services.payment.settings", "PaymentSettings"),
        "stats": ("services.stats.settings", "StatsSettings"),
        "psp_sandbox": ("services.psp_sandbox.settings", "SandboxSettings"),
    }
    module, name = classes[service]
    cls: type[CommonSettings] = getattr(import_module(module), name)
    return load(cls)


async def _migrate(dsn: str) -> list[str]:
    from services.common.migrations import apply_migrations

    return await apply_migrations(dsn)


async def _seed(dsn: str, *, products: int, users: int, only_if_empty: bool) -> str:
    import asyncpg

    from services.catalog.seed import seed_products
    from services.gateway.seed import seed_users
    from services.gateway.settings import GatewaySettings

    gateway_settings = load(GatewaySettings)
    assert isinstance(gateway_settings, GatewaySettings)
    conn = await asyncpg.connect(dsn)
    try:
        if only_if_empty:
            has_data = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM products) OR EXISTS (SELECT 1 FROM users)"
            )
            if has_data:
                return "demo data already present"
        added_products = await seed_products(conn, products)
        added_users = await seed_users(conn, gateway_settings, users)
    finally:
        await conn.close()
    return f"seeded {added_products} products and {added_users} users"


def cmd_migrate(_: argparse.Namespace) -> int:
    dsn = load(CommonSettings).require_database_url()
    applied = asyncio.run(_migrate(dsn))
    print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    dsn = load(CommonSettings).require_database_url()
    print(asyncio.run(_seed(dsn, products=args.products, users=args.users, only_if_empty=False)))
    return 0


def _parse_workers(spec: str) -> dict[str, int]:
    workers: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, count = part.partition("=")
        if name not in SERVICES or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"bad --workers entry {part!r} (e.g. gateway=2)")
        workers[name] = int(count)
    return workers


def cmd_up(args: argparse.Namespace) -> int:
    """Start the whole stack in the foreground; Ctrl-C stops it all."""
    from services.common.embedded import EmbeddedPostgres, EmbeddedRedis
    from services.common.launcher import Stack, StackPlan, wait_for_stop_signal, write_stack_file

    settings = load(CommonSettings)
    data_dir = Path(args.data_dir)
    embedded_pg: EmbeddedPostgres | None = None
    embedded_redis: EmbeddedRedis | None = None
    stack: Stack | None = None
    stack_file: Path | None = None
    env: dict[str, str] = {"SHOPSTACK_ENV": settings.env.value}
    try:
        dsn = settings.database_url
        if not dsn:
            embedded_pg = EmbeddedPostgres(data_dir / "postgres")
            dsn = embedded_pg.start()
            print(f"embedded PostgreSQL: {dsn}", flush=True)
        redis_url = settings.redis_url
        if not redis_url:
            embedded_redis = EmbeddedRedis(data_dir / "redis")
            redis_url = embedded_redis.start()
            print(f"embedded Redis: {redis_url}", flush=True)
        env["SHOPSTACK_DATABASE_URL"] = dsn
        env["SHOPSTACK_REDIS_URL"] = redis_url
        os.environ.update(env)

        applied = asyncio.run(_migrate(dsn))
        print("migrations: " + (", ".join(applied) if applied else "up to date"), flush=True)
        if not args.no_seed:
            print(
                asyncio.run(_seed(dsn, products=1000, users=1000, only_if_empty=True)),
                flush=True,
            )

        offset = args.base_port - DEFAULT_PORTS["gateway"]
        ports = {s: p + offset for s, p in DEFAULT_PORTS.items()}
        plan = StackPlan(
            host=args.host, ports=ports, workers=args.workers, env=env, run_dir=data_dir / "run"
        )
        stack = Stack(plan)
        stack.start()
        stack.wait_ready(timeout_s=args.ready_timeout)
        stack_file = write_stack_file(
            plan.run_dir,
            {"database_url": dsn, "redis_url": redis_url, "gateway_url": plan.url("gateway")},
        )
        _print_banner(plan, settings)
        reason = wait_for_stop_signal(stack)
        print(f"stopping ({reason}) ...", flush=True)
        return 0 if reason in ("SIGINT", "SIGTERM") else 1
    except (ConfigError, RuntimeError, TimeoutError, OSError) as exc:
        print(f"shopstack up: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if stack_file is not None:
            stack_file.unlink(missing_ok=True)
        if stack is not None:
            stack.stop()
        if embedded_redis is not None:
            embedded_redis.stop()
        if embedded_pg is not None:
            embedded_pg.stop()
        print("stopped.", flush=True)


def _print_banner(plan: object, settings: CommonSettings) -> None:
    from services.common.launcher import StackPlan

    assert isinstance(plan, StackPlan)
    lines = ["", "shopstack is up:"]
    lines += [f"  {s:<12} {plan.url(s)}" for s in SERVICES]
    lines += [
        "",
        "demo logins: demo1 .. demo1000, password demo-password-<n> (demo1 / demo-password-1)",
        "admin login: admin with SHOPSTACK_ADMIN_PASSWORD"
        + (" (dev default: admin-password)" if settings.is_dev else ""),
        f"try: curl {plan.url('gateway')}/api/v1/products/1",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shopstack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the whole stack in the foreground")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument(
        "--base-port",
        type=int,
        default=DEFAULT_PORTS["gateway"],
        help="gateway port; the other services keep their offsets (8001 ...)",
    )
    up.add_argument(
        "--workers",
        type=_parse_workers,
        default={},
        help="worker processes per service, e.g. gateway=2,catalog=2",
    )
    up.add_argument("--data-dir", default=str(DATA_DIR))
    up.add_argument("--no-seed", action="store_true")
    up.add_argument("--ready-timeout", type=float, default=90.0)
    up.set_defaults(func=cmd_up)

    serve = sub.add_parser("serve", help="run one service under granian")
    serve.add_argument("service", choices=SERVICES)
    serve.set_defaults(func=cmd_serve)

    migrate = sub.add_parser("migrate", help="apply database migrations")
    migrate.set_defaults(func=cmd_migrate)

    seed = sub.add_parser("seed", help="load demo data (idempotent)")
    seed.add_argument("--products", type=int, default=1000)
    seed.add_argument("--users", type=int, default=1000)
    seed.set_defaults(func=cmd_seed)

    # Listed for --help only: main() hands `loadtest ...` to loadtests.cli with its own options.
    sub.add_parser("loadtest", help="run the load-test scenarios (shopstack loadtest --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["loadtest"]:
        from loadtests.cli import main as loadtest_main

        return loadtest_main(raw[1:])
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"shopstack: configuration error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
