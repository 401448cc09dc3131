"""The gateway: served by granian over RSGI (ASGI too, for tests and uvicorn).

It answers health, metrics and login itself, serves product detail from its
micro-cache, refuses orders for products it knows are sold out, sheds load past
a per-worker in-flight limit, rate-limits write routes, and forwards everything
else to its upstream over pooled keep-alive connections after verifying the
caller's token where the route needs a user.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import asyncpg
import orjson
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.common import db, redis
from services.common import settings as common_settings
from services.common.asgi import Receive, Scope, Send
from services.common.errors import (
    PROBLEM_CONTENT_TYPE,
    NotFound,
    Overloaded,
    Problem,
    RateLimited,
    RequestTimeout,
    Unauthorized,
    problem_bytes,
)
from services.common.flags import SoldOutFlags
from services.common.health import failing_checks
from services.common.logs import configure_logging, request_id_var
from services.common.metrics import METRICS_CONTENT_TYPE, RequestStats, render_metrics
from services.common.outage import unavailable_problem
from services.common.tasks import BackgroundTasks
from services.gateway import domain
from services.gateway.clientip import TrustedProxies
from services.gateway.http import (
    CLOSE,
    BadRequest,
    Framing,
    Reply,
    Request,
    asgi_request,
    read_whole,
    request_id_from,
    rsgi_request,
    send_asgi,
    send_rsgi,
    transfer_framing,
)
from services.gateway.microcache import Entry, MicroCache, listen_for_changes
from services.gateway.passwords import Passwords
from services.gateway.proxy import Upstream, request_headers
from services.gateway.ratelimit import Bucket, RateLimiter
from services.gateway.routes import WRITES, Local, Route, build_routes, match
from services.gateway.schemas import LoginIn
from services.gateway.settings import GatewaySettings
from services.gateway.tokens import TokenService, TokenUser

log = logging.getLogger("shopstack.gateway")

JSON = "application/json"
PRODUCT_PREFIX = "/api/v1/products/"
ORDERS_PATH = "/api/v1/orders"
SOLD_OUT_TYPE = b'"type":"/problems/sold-out"'
PROBLEM_HEADERS = (("content-type", PROBLEM_CONTENT_TYPE),)


@functools.lru_cache(maxsize=4096)
def sold_out_body(product_id: int) -> bytes:
    """The catalog's own sold-out problem for a product (built once per product)."""
    return problem_bytes(409, "sold-out", f"product {product_id} is sold out", title="Sold Out")


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
            cache_entries=settings.gateway_token_cache_entries,
        )
        self.limiter = RateLimiter(client, timeout_s=settings.redis_timeout_s)
        self.ip_bucket = Bucket(settings.login_ip_rate_per_s, settings.login_ip_burst)
        self.failure_bucket = Bucket(
            settings.login_failure_rate_per_s, settings.login_failure_burst
        )
        self.write_user_bucket = Bucket(settings.write_user_rate_per_s, settings.write_user_burst)
        self.write_ip_bucket = Bucket(settings.write_ip_rate_per_s, settings.write_ip_burst)


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


def json_reply(status: int, doc: Any, headers: list[tuple[str, str]] | None = None) -> Reply:
    return Reply(status, [("content-type", JSON), *(headers or [])], orjson.dumps(doc))


def problem_reply(exc: Problem) -> Reply:
    body = problem_bytes(exc.status, exc.code, exc.detail, title=exc.title, **exc.extra)
    headers = [("content-type", PROBLEM_CONTENT_TYPE)]
    headers.extend((k.lower(), v) for k, v in exc.headers.items())
    return Reply(exc.status, headers, body)


def etag_matches(if_none_match: str | None, etag: str | None) -> bool:
    """RFC 9110 weak comparison of If-None-Match against a strong tag."""
    if not if_none_match or not etag:
        return False
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in if_none_match.split(","))


def product_key(path: str, query: str) -> int | None:
    """The product id of a plain product-detail path (the only cached shape)."""
    if query or not path.startswith(PRODUCT_PREFIX):
        return None
    tail = path[len(PRODUCT_PREFIX) :]
    if not tail.isdigit() or len(tail) > 18:
        return None
    return int(tail)


def ordered_product(body: bytes) -> int | None:
    """product_id of an order body, when it is plainly there (else the catalog judges)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if isinstance(doc, dict):
        pid = doc.get("product_id")
        if isinstance(pid, int) and not isinstance(pid, bool):
            return pid
    return None


class NotReady(Problem):
    status, code, title = 503, "not-ready", "Service Not Ready"


class Invalid(Problem):
    status, code, title = 422, "validation-error", "Validation Error"


class MethodNotAllowed(Problem):
    status, code, title = 405, "method-not-allowed", "Method Not Allowed"


def bearer_token(value: str | None) -> str | None:
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class Gateway:
    """The application object: RSGI (`__rsgi__`) and ASGI (`__call__`)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.routes = build_routes(settings)
        self.trusted = TrustedProxies(settings.trusted_proxies)
        self.cache = MicroCache(
            ttl_s=settings.gateway_microcache_ttl_s,
            max_entries=settings.gateway_microcache_entries,
        )
        self.sold_out = SoldOutFlags(settings.gateway_sold_out_ttl_s)
        self.stats = RequestStats("gateway")
        self.max_in_flight = settings.gateway_max_in_flight
        self.state: GatewayState | None = None
        self._stack: AsyncExitStack | None = None
        self._tasks = BackgroundTasks()

    # -- lifecycle ---------------------------------------------------------------------

    async def startup(self) -> None:
        self._stack = AsyncExitStack()
        self.state = await self._stack.enter_async_context(open_state(self.settings))
        state = self.state
        self._tasks.start("gateway-stats", self._flush_stats)
        self._tasks.start(
            "gateway-product-changes",
            lambda: listen_for_changes(
                state.redis, self._on_product_change, self.cache.clear, self._tasks.stopping
            ),
        )
        log.info("started", extra={"port": self.settings.listen_port})

    async def shutdown(self) -> None:
        await self._tasks.stop()
        self.stats.flush()
        if self._stack is not None:
            await self._stack.aclose()
        log.info("stopped")

    def _on_product_change(self, product_id: int) -> None:
        self.cache.invalidate(product_id)
        self.sold_out.clear(product_id)

    async def _flush_stats(self) -> None:
        while not self._tasks.stopping.is_set():
            await asyncio.sleep(1.0)
            self.stats.flush()

    # -- RSGI --------------------------------------------------------------------------

    def __rsgi_init__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.startup())

    def __rsgi_del__(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.run_until_complete(self.shutdown())

    async def __rsgi__(self, scope: Any, protocol: Any) -> None:
        if scope.proto != "http":
            return
        started = time.perf_counter()
        method = scope.method
        headers = scope.headers
        rid = request_id_from(headers.get("x-request-id"))
        if headers.get("transfer-encoding") is not None:
            await self._rsgi_transfer_coded(scope, protocol, rid, started)
            return
        # The hot path: a cached product page is answered without leaving this frame.
        key = product_key(scope.path, scope.query_string) if method in ("GET", "HEAD") else None
        entry = self.cache.get(key) if key is not None else None
        if entry is not None:
            reply = self._from_cache(entry, headers.get("if-none-match"), rid)
            send_rsgi(protocol, reply, head=method == "HEAD")
            self.stats.record(
                "/api/v1/products/{id}", method, reply.status, time.perf_counter() - started
            )
            return
        body: bytes | None = None
        if method == "POST" and scope.path == ORDERS_PATH:
            # The sold-out storm: refused here too, once the body names a flagged product.
            fast = await self._sold_out_fast(headers, protocol, rid)
            if isinstance(fast, Reply):
                send_rsgi(protocol, fast)
                self.stats.record(ORDERS_PATH, method, fast.status, time.perf_counter() - started)
                return
            body = fast
        request = rsgi_request(scope, protocol, body)
        route, reply = await self.handle(request, rid)
        send_rsgi(protocol, reply, head=method == "HEAD")
        self.stats.record(route, method, reply.status, time.perf_counter() - started)

    async def _rsgi_transfer_coded(
        self, scope: Any, protocol: Any, rid: str, started: float
    ) -> None:
        """A request with Transfer-Encoding: no fast path; odd framing closes the connection."""
        headers = scope.headers
        framing = transfer_framing(
            headers.get_all("transfer-encoding"), headers.get("content-length")
        )
        refused = None
        if framing is Framing.REFUSE:
            refused = BadRequest("Transfer-Encoding must be a single chunked coding", headers=CLOSE)
        route, reply = await self.handle(rsgi_request(scope, protocol, refused=refused), rid)
        if framing is not Framing.PLAIN and all(k != "connection" for k, _ in reply.headers):
            reply.headers.append(("connection", "close"))
        send_rsgi(protocol, reply, head=scope.method == "HEAD")
        self.stats.record(route, scope.method, reply.status, time.perf_counter() - started)

    async def _sold_out_fast(self, headers: Any, protocol: Any, rid: str) -> Reply | bytes | None:
        """A sold-out reply, or the body read on the way (for the normal path), or None.

        Only the plain case is taken here: a verified token (from the cache), a
        declared small body, no Idempotency-Key; anything else goes the normal
        way, which answers it fully (401, 413, 422, ...).
        """
        if headers.get("idempotency-key") is not None or self.state is None:
            return None
        token = bearer_token(headers.get("authorization"))
        if token is None or self.state.tokens.verify_cached(token) is None:
            return None
        declared = headers.get("content-length")
        if declared is None or not declared.isdigit():
            return None
        if int(declared) > self.settings.gateway_small_body_bytes:
            return None
        if headers.get("transfer-encoding") is not None:
            # The chunks decide the length, whatever Content-Length says: leave such a
            # body to the normal path's counted read, which stops at the cap.
            return None
        try:
            async with asyncio.timeout(self.settings.body_read_timeout_s):
                body = await read_whole(protocol)
        except TimeoutError:
            reply = problem_reply(RequestTimeout("request body was not received in time"))
            reply.headers.append(("x-request-id", rid))
            return reply
        except BadRequest as exc:
            reply = problem_reply(exc)
            reply.headers.append(("x-request-id", rid))
            return reply
        product_id = ordered_product(body)
        if product_id is None or not self.sold_out.refuse_or_probe(product_id):
            return body
        return Reply(409, [*PROBLEM_HEADERS, ("x-request-id", rid)], sold_out_body(product_id))

    # -- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._asgi_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        request = asgi_request(scope, receive)
        rid = request_id_from(request.headers.get("x-request-id"))
        route, reply = await self.handle(request, rid)
        await send_asgi(send, reply, head=request.method == "HEAD")
        self.stats.record(route, request.method, reply.status, time.perf_counter() - started)

    async def _asgi_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    log.exception("gateway failed to start")
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- dispatch ----------------------------------------------------------------------

    async def handle(self, request: Request, rid: str) -> tuple[str, Reply]:
        """Route and answer one request; every failure becomes a problem reply."""
        token = request_id_var.set(rid)
        route_name = "unmatched"
        self.stats.in_flight += 1
        try:
            route = match(self.routes, request.path)
            if route is not None:
                route_name = route.name
            if request.refused is not None:
                raise request.refused
            if route is None:
                raise NotFound(f"no route for {request.path}")
            if route.methods is not None and request.method not in route.methods:
                allow = ", ".join(sorted(route.methods))
                raise MethodNotAllowed("method not allowed", headers={"Allow": allow})
            if route.sheddable and self.stats.in_flight > self.max_in_flight:
                raise Overloaded("the gateway is at capacity; retry shortly", retry_after_s=1)
            if route.local is not None:
                reply = await self.local(route, request)
            else:
                reply = await self.forward(route, request, rid)
        except Problem as exc:
            reply = problem_reply(exc)
        except Exception as exc:
            if (problem := unavailable_problem(exc)) is not None:
                # Postgres or Redis not answering (login): retryable, no trace.
                error = f"{type(exc).__name__}: {exc}"
                log.warning("dependency unavailable", extra={"path": request.path, "error": error})
                reply = problem_reply(problem)
            else:
                log.exception("unhandled error", extra={"path": request.path})
                reply = Reply(
                    500,
                    [("content-type", PROBLEM_CONTENT_TYPE)],
                    problem_bytes(500, "internal-error", "an unexpected error occurred"),
                )
        finally:
            self.stats.in_flight -= 1
            request_id_var.reset(token)
        reply.headers.append(("x-request-id", rid))
        return route_name, reply

    def _state(self) -> GatewayState:
        if self.state is None:
            raise NotReady("the gateway is starting")
        return self.state

    def _from_cache(
        self, entry: Entry, if_none_match: str | None, rid: str | None, status: str = "hit"
    ) -> Reply:
        """A reply from a cache entry (the request id is added here only on the hot path)."""
        tail = [("x-cache", status)]
        if rid is not None:
            tail.append(("x-request-id", rid))
        if entry.status == 200 and etag_matches(if_none_match, entry.etag):
            headers = [h for h in entry.headers if h[0] != "content-type"]
            return Reply(304, headers + tail)
        return Reply(entry.status, entry.headers + tail, entry.body)

    async def local(self, route: Route, request: Request) -> Reply:
        if route.local is Local.HEALTHZ:
            return Reply(200, [("content-type", JSON)], b'{"status":"ok"}')
        if route.local is Local.METRICS:
            self.stats.flush()
            return Reply(200, [("content-type", METRICS_CONTENT_TYPE)], render_metrics())
        if route.local is Local.READYZ:
            return await self.readyz()
        return await self.login(route, request)

    async def readyz(self) -> Reply:
        state = self._state()
        checks = {
            "postgres": lambda: db.ping(state.db),
            "redis": lambda: redis.ping(state.redis),
            **{name: _health_probe(up) for name, up in state.upstreams.items()},
        }
        failed = await failing_checks(checks)
        status = {name: ("down" if name in failed else "ok") for name in checks}
        if failed:
            raise NotReady("not ready: " + ", ".join(sorted(failed)), extra={"checks": status})
        return json_reply(200, {"status": "ok", "checks": status})

    async def login(self, route: Route, request: Request) -> Reply:
        state = self._state()
        body = await request.body(
            limit=route.max_body_bytes, timeout_s=self.settings.body_read_timeout_s
        )
        try:
            data = LoginIn.model_validate_json(body)
        except ValidationError as exc:
            errors = [
                {"loc": [str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_input=False)
            ]
            raise Invalid("the request is not valid", extra={"errors": errors}) from None
        token = await domain.login(
            pool=state.db,
            passwords=state.passwords,
            tokens=state.tokens,
            limiter=state.limiter,
            ip_bucket=state.ip_bucket,
            failure_bucket=state.failure_bucket,
            username=data.username,
            password=data.password,
            client_ip=self._client_ip(request),
        )
        reply = {"access_token": token, "token_type": "bearer", "expires_in": state.tokens.ttl_s}
        return json_reply(200, reply, [("cache-control", "no-store")])

    def _client_ip(self, request: Request) -> str:
        return self.trusted.client_ip(request.client, request.headers.get("x-forwarded-for"))

    async def forward(self, route: Route, request: Request, rid: str) -> Reply:
        state = self._state()
        user: TokenUser | None = None
        if route.needs_user:
            token = bearer_token(request.headers.get("authorization"))
            user = state.tokens.verify_cached(token) if token else None
            if user is None:
                raise Unauthorized("a valid bearer token is required")
        if route.cached:
            key = product_key(request.path, request.query)
            if key is not None:
                entry = self.cache.get(key)
                status = "hit"
                if entry is None:
                    entry = await self.cache.fetch(key, lambda: self._load(route, request, rid))
                    status = "miss"
                return self._from_cache(entry, request.headers.get("if-none-match"), None, status)
        body = await request.body(
            limit=route.max_body_bytes, timeout_s=self.settings.body_read_timeout_s
        )
        is_write = request.method in WRITES
        has_key = request.headers.get("idempotency-key") is not None
        sold_out_candidate = None
        if route.name == "/api/v1/orders" and request.method == "POST" and not has_key:
            # A replayed idempotent order must see its first reply, so keyed requests pass.
            sold_out_candidate = ordered_product(body)
            if (
                sold_out_candidate is not None
                and not request.prechecked  # the RSGI fast path asked already
                and self.sold_out.refuse_or_probe(sold_out_candidate)
            ):
                return Reply(409, list(PROBLEM_HEADERS), sold_out_body(sold_out_candidate))
        ip = self._client_ip(request)
        if route.rate_limited and is_write:
            await self._rate_limit(state, user, ip)
        reply = await self._upstream_call(route, request, rid, body, user, ip, has_key)
        if sold_out_candidate is not None:
            if reply.status == 409 and SOLD_OUT_TYPE in reply.body:
                self.sold_out.mark(sold_out_candidate)
            elif reply.status < 500:  # the probe found stock (or another answer): stop refusing
                self.sold_out.clear(sold_out_candidate)
        return reply

    async def _rate_limit(self, state: GatewayState, user: TokenUser | None, ip: str) -> None:
        buckets = [(f"write-ip:{ip}", state.write_ip_bucket)]
        if user is not None:
            buckets.insert(0, (f"write-user:{user.user_id}", state.write_user_bucket))
        try:
            decision = await state.limiter.take_each(*buckets)
        except RedisError as exc:
            # Writes stay available without Redis (login alone fails closed).
            log.warning(
                "rate limiter unavailable; letting the request through", extra={"error": str(exc)}
            )
            return
        if not decision.allowed:
            raise RateLimited("too many requests", retry_after_s=decision.retry_after_s)

    async def _upstream_call(
        self,
        route: Route,
        request: Request,
        rid: str,
        body: bytes,
        user: TokenUser | None,
        ip: str,
        has_key: bool,
    ) -> Reply:
        extra = {"x-request-id": rid, "x-forwarded-for": ip, "x-forwarded-proto": request.scheme}
        if user is not None:
            extra["x-user-id"] = user.user_id
            extra["x-user-role"] = user.role
        path_qs = request.path + ("?" + request.query if request.query else "")
        assert route.upstream is not None
        # An idempotent method is resent once when its connection dies before the answer
        # (RFC 9112 9.3.1); a POST only when it carries an Idempotency-Key.
        may_retry = has_key and request.method == "POST"
        reply = (
            await self._state()
            .upstreams[route.upstream]
            .forward(
                request.method,
                path_qs,
                request_headers(list(request.headers.items()), extra),
                body,
                timeout_s=route.timeout_s,
                may_retry=may_retry,
            )
        )
        return Reply(reply.status, reply.headers, reply.body)

    async def _load(self, route: Route, request: Request, rid: str) -> Entry:
        extra = {"x-request-id": rid}
        assert route.upstream is not None
        reply = (
            await self._state()
            .upstreams[route.upstream]
            .forward(
                "GET",
                request.path,
                list(extra.items()),
                b"",
                timeout_s=route.timeout_s,
                may_retry=False,
            )
        )
        keep = ("content-type", "etag", "cache-control")
        headers = [(k, v) for k, v in reply.headers if k in keep]
        etag = next((v for k, v in headers if k == "etag"), None)
        return Entry(
            reply.status, headers, reply.body, etag, time.monotonic() + self.cache.lifetime()
        )


def _health_probe(upstream: Upstream) -> Any:
    async def probe() -> None:
        reply = await upstream.forward("GET", "/healthz", [], b"", timeout_s=1.0, may_retry=False)
        if reply.status != 200:
            raise RuntimeError(f"{upstream.name} answered {reply.status}")

    return probe


def create_app(settings: GatewaySettings | None = None) -> Gateway:
    """Build the gateway; settings come from the environment unless given."""
    resolved = settings or common_settings.load(GatewaySettings)
    assert isinstance(resolved, GatewaySettings)
    resolved.secret("jwt_secret")  # fail fast on a missing or weak secret
    configure_logging("gateway", level=resolved.log_level, json_logs=resolved.json_logs)
    return Gateway(resolved)
