"""build_app(): the FastAPI app every service starts from.

It installs the middleware (request id, metrics, body guard), renders every
error as problem+json, and adds /healthz, /readyz and /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse as StarletteJSONResponse
from starlette.routing import BaseRoute, Match

from services.common.asgi import ASGIApp, Message, Receive, Scope, Send
from services.common.errors import PROBLEM_CONTENT_TYPE, Problem, code_for_status, problem_body
from services.common.fastlane import FastLane, FastRoute, ServiceApp
from services.common.health import Check, failing_checks
from services.common.logs import configure_logging
from services.common.metrics import METRICS_CONTENT_TYPE, render_metrics
from services.common.middleware import BodyGuardMiddleware, ObservabilityMiddleware, send_problem
from services.common.outage import unavailable_problem
from services.common.settings import CommonSettings

log = logging.getLogger("shopstack.app")


class ServiceState:
    """What a service's lifespan yields; subclasses add pools, clients and jobs."""

    def __init__(self, settings: CommonSettings) -> None:
        self.settings = settings

    def readiness_checks(self) -> dict[str, Check]:
        """Named dependency checks for /readyz; each raises when its dependency is down."""
        return {}


StateT = TypeVar("StateT", bound=ServiceState)


class JSONResponse(StarletteJSONResponse):
    """orjson-encoded JSON response (a JSONResponse, so OpenAPI shows the route's model)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def problem_response(
    status: int,
    code: str,
    detail: str,
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """A problem+json response."""
    body = orjson.dumps(problem_body(status, code, title, detail, extra))
    return Response(body, status_code=status, headers=headers, media_type=PROBLEM_CONTENT_TYPE)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # Name the location and the rule; never echo the (possibly huge or hostile) input.
    return [
        {
            "loc": [str(part) for part in err.get("loc", ())],
            "msg": err.get("msg", ""),
            "type": err.get("type", ""),
        }
        for err in exc.errors()
    ]


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(routes: Iterable[BaseRoute], scope: Scope) -> list[str]:
    """Every method some route takes at this scope's path.

    Starlette's own 405 names only the methods of the first route on the path, so a path
    served by two routes (GET and POST declared apart) advertised half its methods.
    """
    return [
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in routes)
    ]


def install_error_handlers(app: FastAPI) -> None:
    """Render Problem, framework HTTP errors and validation errors as problem+json."""

    async def on_problem(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return problem_response(
            exc.status,
            exc.code,
            exc.detail,
            title=exc.title,
            headers=exc.headers,
            extra=exc.extra,
        )

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            allowed = allowed_methods(request.app.router.routes, request.scope)
            if allowed:
                headers["Allow"] = ", ".join(allowed)
        return problem_response(
            exc.status_code, code_for_status(exc.status_code), str(exc.detail), headers=headers
        )

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return problem_response(
            422,
            "validation-error",
            "the request is not valid",
            extra={"errors": _validation_errors(exc)},
        )

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)


class CatchAllMiddleware:
    """Turns any unhandled exception into a plain 500 problem, logged with its trace."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if (problem := unavailable_problem(exc)) is None:
                log.exception("unhandled error", extra={"path": scope.get("path")})
                if not started:
                    await send_problem(send, 500, "internal-error", "an unexpected error occurred")
                return
            # Postgres restarting or unreachable: a retryable 503, one log line, no trace
            # (at hundreds of requests a second, traces would flood the log).
            log.warning(
                "dependency unavailable",
                extra={"path": scope.get("path"), "error": f"{type(exc).__name__}: {exc}"},
            )
            if not started:
                headers = [(k.lower().encode(), v.encode()) for k, v in problem.headers.items()]
                await send_problem(
                    send,
                    problem.status,
                    problem.code,
                    problem.detail,
                    title=problem.title,
                    headers=headers,
                )
        except asyncio.CancelledError:
            # The server cancels what is still running when its shutdown timeout runs out
            # (uvicorn's --timeout-graceful-shutdown): say so, rather than its bare 500.
            if not started:
                log.warning("request cut off by shutdown", extra={"path": scope.get("path")})
                with contextlib.suppress(Exception):
                    await send_problem(
                        send,
                        503,
                        "overloaded",
                        "the server is shutting down; try again",
                        headers=[(b"retry-after", b"1")],
                        close=True,
                    )
            raise


def health_router(get_state: Callable[[Request], ServiceState]) -> APIRouter:
    """GET /healthz, /readyz and /metrics."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz", include_in_schema=True)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", responses={503: {"description": "a dependency is down"}})
    async def readyz(request: Request) -> Response:
        checks = get_state(request).readiness_checks()
        failed = await failing_checks(checks)
        if failed:
            return problem_response(
                503,
                "not-ready",
                "not ready: " + ", ".join(sorted(failed)),
                extra={"checks": {name: ("down" if name in failed else "ok") for name in checks}},
            )
        return JSONResponse({"status": "ok", "checks": dict.fromkeys(checks, "ok")})

    @router.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(render_metrics(), media_type=METRICS_CONTENT_TYPE)

    return router


def state_of(request: Request) -> ServiceState:
    """The lifespan-yielded state, for FastAPI dependencies."""
    state: ServiceState = request.state.app_state
    return state


def build_app(
    *,
    settings: CommonSettings,
    title: str,
    description: str,
    lifespan: Callable[[CommonSettings], AbstractAsyncContextManager[ServiceState]],
    routers: Iterable[APIRouter],
    fast_routes: Iterable[FastRoute] = (),
) -> ServiceApp:
    """Build a service app: lifespan-owned state, middleware, problem+json, health.

    `fast_routes` are answered by the fast lane (services.common.fastlane) unless
    the fast_lane setting is off.
    """
    configure_logging(settings.service_name, level=settings.log_level, json_logs=settings.json_logs)

    @asynccontextmanager
    async def app_lifespan(_: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with lifespan(settings) as state:
            log.info("started", extra={"port": settings.listen_port})
            yield {"app_state": state}
        log.info("stopped")

    app = ServiceApp(
        title=title,
        description=description,
        version="1.0.0",
        lifespan=app_lifespan,
        default_response_class=JSONResponse,
        docs_url="/docs",
        redoc_url=None,
    )
    install_error_handlers(app)
    app.include_router(health_router(state_of))
    for router in routers:
        app.include_router(router)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(
        BodyGuardMiddleware,
        max_body_bytes=settings.max_body_bytes,
        body_read_timeout_s=settings.body_read_timeout_s,
    )
    app.add_middleware(ObservabilityMiddleware, service=settings.service_name)
    if settings.fast_lane:
        app.fast_lane = FastLane(
            fast_routes,
            max_body_bytes=settings.max_body_bytes,
            body_read_timeout_s=settings.body_read_timeout_s,
        )
        app.fast_stack = ObservabilityMiddleware(
            CatchAllMiddleware(app.fast_lane), service=settings.service_name
        )
    return app
