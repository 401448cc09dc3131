"""The gateway: a pure ASGI app (no framework on the hot path) served by granian.

It answers health, metrics and login itself and forwards everything else to
its upstream over pooled keep-alive connections, after verifying the caller's
token where the route needs a user.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from starlette.exceptions import HTTPException

from services.common import db, redis
from services.common import settings as common_settings
from services.common.app import failing_checks
from services.common.errors import (
    PROBLEM_CONTENT_TYPE,
    Problem,
    Unauthorized,
    code_for_status,
    problem_bytes,
)
from services.common.logs import configure_logging
from services.common.metrics import METRICS_CONTENT_TYPE, render_metrics
from services.common.middleware import (
    ASGIApp,
    ObservabilityMiddleware,
    Receive,
    Scope,
    Send,
    header_value,
    read_body,
)
from services.gateway import domain
from services.gateway.passwords import Passwords
from services.gateway.proxy import IDEMPOTENT_METHODS, Upstream, request_headers
from services.gateway.ratelimit import Bucket, RateLimiter
from services.gateway.routes import Local, Route, build_routes, match
from services.gateway.schemas import LoginIn
from services.gateway.settings import GatewaySettings
from services.gateway.tokens import TokenService, TokenUser

log = logging.getLogger("shopstack.gateway")

JSON = b"application/json"


class GatewayState:
    """Everything the lifespan opens; closed in reverse order by its exit stack."""

    def __init__(
        self,
        settings: GatewaySettings,
        pool: asyncpg.Pool,
        client: Redis,
        upstreams: dict[str, Upstream],
    ) -> None:
        self.settings = settings
        self.db = pool
        self.redis = client
        self.upstreams = upstreams
        self.passwords = Passwords(
            time_cost=settings.argon2_time_cost,
            memory_kib=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            concurrency=settings.gateway_hash_concurrency,
            queue=settings.gateway_hash_queue,
        )
        self.tokens = TokenService(
            secret=settings.secret("jwt_secret"),
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            ttl_s=settings.jwt_ttl_s,
        )
        self.limiter = RateLimiter(client)
        self.ip_bucket = Bucket(settings.login_ip_rate_per_s, settings.login_ip_burst)
        self.failure_bucket = Bucket(
            settings.login_failure_rate_per_s, settings.login_failure_burst
        )


@asynccontextmanager
async def open_state(settings: GatewaySettings) -> AsyncIterator[GatewayState]:
    """Open the users pool, Redis and one keep-alive pool per upstream."""
    async with AsyncExitStack() as stack:
        pool = await stack.enter_async_context(db.open_pool(settings))
        client = await stack.enter_async_context(redis.open_redis(settings))
        upstreams: dict[str, Upstream] = {}
        for name, url in (
            ("catalog", settings.catalog_url),
            ("payment", settings.payment_url),
            ("stats", settings.stats_url),
        ):
            upstream = Upstream(
                name,
                url,
                pool_size=settings.gateway_upstream_pool_size,
                idle_s=settings.gateway_upstream_idle_s,
                connect_timeout_s=settings.gateway_upstream_connect_timeout_s,
            )
            stack.push_async_callback(upstream.close)
            upstreams[name] = upstream
        yield GatewayState(settings, pool, client, upstreams)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    *,
    content_type: bytes = JSON,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a complete response with a body."""
    raw = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    raw.extend(headers or [])
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, exc: Problem | HTTPException) -> None:
    """Render a Problem or framework error as problem+json."""
    if isinstance(exc, Problem):
        status, code, detail, extra_headers = exc.status, exc.code, exc.detail, exc.headers
        body = problem_bytes(status, code, detail, title=exc.title, **exc.extra)
    else:
        status, code, detail = exc.status_code, code_for_status(exc.status_code), str(exc.detail)
        extra_headers = dict(exc.headers or {})
        body = problem_bytes(status, code, detail)
    headers = [(k.lower().encode(), v.encode()) for k, v in extra_headers.items()]
    await send_bytes(
        send, status, body, content_type=PROBLEM_CONTENT_TYPE.encode(), headers=headers
    )


def client_ip(scope: Scope, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> str:
    """The peer address; X-Forwarded-For is believed only when the peer is a trusted proxy."""
    peer = (scope.get("client") or ("0.0.0.0", 0))[0]  # noqa: S104 (a placeholder, not a bind)
    forwarded = header_value(scope, b"x-forwarded-for")
    if not forwarded or not trusted or not _in(peer, trusted):
        return str(peer)
    hops = [h.strip() for h in forwarded.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):  # the rightmost address no trusted proxy vouches for
        if not _in(hop, trusted):
            return hop
    return str(peer)


def _in(address: str, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def bearer_token(scope: Scope) -> str | None:
    raw = header_value(scope, b"authorization")
    if raw is None:
        return None
    scheme, _, token = raw.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Gateway:
    """The ASGI application (wrapped by ObservabilityMiddleware in create_app)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.routes = build_routes(settings)
        self.trusted = [ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies]
        self.state: GatewayState | None = None
        self._stack: AsyncExitStack | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self._stack = AsyncExitStack()
                    self.state = await self._stack.enter_async_context(open_state(self.settings))
                except Exception as exc:
                    log.exception("gateway failed to start")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                log.info("started", extra={"port": self.settings.listen_port})
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._stack is not None:
                    await self._stack.aclose()
                log.info("stopped")
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = match(self.routes, scope["path"])
        if route is None:
            await send_error(send, HTTPException(404, f"no route for {scope['path']}"))
            return
        scope["shopstack.route"] = route.name
        if scope["method"] not in route.methods:
            allow = ", ".join(sorted(route.methods))
            await send_error(send, HTTPException(405, "method not allowed", {"Allow": allow}))
            return
        try:
            if route.local is not None:
                await self.local(route, scope, receive, send)
            else:
                await self.forward(route, scope, receive, send)
        except (Problem, HTTPException) as exc:
            await send_error(send, exc)
        except Exception:
            log.exception("unhandled error", extra={"path": scope["path"]})
            await send_error(send, HTTPException(500, "an unexpected error occurred"))

    def _state(self) -> GatewayState:
        if self.state is None:
            raise HTTPException(503, "the gateway is starting")
        return self.state

    async def local(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        if route.local is Local.HEALTHZ:
            await send_bytes(send, 200, b'{"status":"ok"}')
        elif route.local is Local.METRICS:
            await send_bytes(
                send, 200, render_metrics(), content_type=METRICS_CONTENT_TYPE.encode()
            )
        elif route.local is Local.READYZ:
            await self.readyz(send)
        elif route.local is Local.LOGIN:
            await self.login(route, scope, receive, send)

    async def readyz(self, send: Send) -> None:
        state = self._state()
        checks = {
            "postgres": lambda: db.ping(state.db),
            "redis": lambda: redis.ping(state.redis),
            **{name: _health_probe(up) for name, up in state.upstreams.items()},
        }
        failed = await failing_checks(checks)
        if failed:
            detail = "not ready: " + ", ".join(sorted(failed))
            status = {name: ("down" if name in failed else "ok") for name in checks}
            raise _NotReady(detail, extra={"checks": status})
        ok = {"status": "ok", "checks": dict.fromkeys(checks, "ok")}
        await send_bytes(send, 200, orjson.dumps(ok))

    async def login(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        state = self._state()
        body = await read_body(
            scope, receive, limit=route.max_body_bytes, timeout_s=self.settings.body_read_timeout_s
        )
        try:
            data = LoginIn.model_validate_json(body)
        except ValidationError as exc:
            errors = [
                {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_input=False)
            ]
            raise _Invalid("the request is not valid", extra={"errors": errors}) from None
        token = await domain.login(
            pool=state.db,
            passwords=state.passwords,
            tokens=state.tokens,
            limiter=state.limiter,
            ip_bucket=state.ip_bucket,
            failure_bucket=state.failure_bucket,
            username=data.username,
            password=data.password,
            client_ip=client_ip(scope, self.trusted),
        )
        reply = {"access_token": token, "token_type": "bearer", "expires_in": state.tokens.ttl_s}
        await send_bytes(send, 200, orjson.dumps(reply), headers=[(b"cache-control", b"no-store")])

    async def forward(self, route: Route, scope: Scope, receive: Receive, send: Send) -> None:
        state = self._state()
        user: TokenUser | None = None
        if route.needs_user:
            token = bearer_token(scope)
            user = state.tokens.verify(token) if token else None
            if user is None:
                raise Unauthorized("a valid bearer token is required")
        body = await read_body(
            scope, receive, limit=route.max_body_bytes, timeout_s=self.settings.body_read_timeout_s
        )
        ip = client_ip(scope, self.trusted)
        extra = {
            "X-Request-Id": scope["shopstack.request_id"],
            "X-Forwarded-For": ip,
            "X-Forwarded-Proto": scope.get("scheme", "http"),
        }
        if user is not None:
            extra["X-User-Id"] = user.user_id
            extra["X-User-Role"] = user.role
        method = scope["method"]
        # aiohttp itself resends an idempotent method once when its connection dies before
        # the answer (RFC 9112 9.3.1); a POST is resent once only with an Idempotency-Key.
        has_key = header_value(scope, b"idempotency-key") is not None
        may_retry = has_key and method not in IDEMPOTENT_METHODS
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path_qs = raw_path.decode("latin-1")
        if scope.get("query_string"):
            path_qs += "?" + scope["query_string"].decode("latin-1")
        assert route.upstream is not None
        reply = await state.upstreams[route.upstream].forward(
            method,
            path_qs,
            request_headers(scope["headers"], extra),
            body,
            timeout_s=route.timeout_s,
            may_retry=may_retry,
        )
        headers = [*reply.headers, (b"content-length", str(len(reply.body)).encode())]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body if method != "HEAD" else b""})


class _NotReady(Problem):
    status, code, title = 503, "not-ready", "Service Not Ready"


class _Invalid(Problem):
    status, code, title = 422, "validation-error", "Validation Error"


def _health_probe(upstream: Upstream) -> Any:
    async def probe() -> None:
        reply = await upstream.forward("GET", "/healthz", [], b"", timeout_s=1.0, may_retry=True)
        if reply.status != 200:
            raise RuntimeError(f"{upstream.name} answered {reply.status}")

    return probe


def create_app(settings: GatewaySettings | None = None) -> ASGIApp:
    """Build the gateway ASGI app; settings come from the environment unless given."""
    resolved = settings or common_settings.load(GatewaySettings)
    assert isinstance(resolved, GatewaySettings)
    resolved.secret("jwt_secret")  # fail fast on a missing or weak secret
    configure_logging("gateway", level=resolved.log_level, json_logs=resolved.json_logs)
    return ObservabilityMiddleware(Gateway(resolved), service="gateway")
