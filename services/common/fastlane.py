"""A fast lane past the framework for a service's hottest routes.

FastAPI costs a few hundred microseconds per request here (its middleware
chain, routing, dependency solving and model validation), several times what a
small handler does itself. A route that is called many times per user action
(provider callbacks, payment creation, the catalog's internal order calls) is
registered as a `FastRoute`: `ServiceApp` answers it with a plain handler,
inside the same request-id, metrics and catch-all middleware every route has,
with the body read under the same size cap and deadline.

The FastAPI route of the same path stays declared (it documents the route in
OpenAPI and serves it when the lane is off) and calls the same handler, so each
route has one implementation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from uuid import UUID

from fastapi import FastAPI, Request, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from services.common.asgi import Receive, Scope, Send
from services.common.errors import (
    PROBLEM_CONTENT_TYPE,
    Problem,
    ValidationProblem,
    code_for_status,
    problem_bytes,
)
from services.common.middleware import read_body
from services.common.openapi import complete

JSON = b"application/json"
ModelT = TypeVar("ModelT", bound=BaseModel)


@dataclass(slots=True)
class FastRequest:
    """What a fast handler sees: the path parameters, the headers, the whole body."""

    state: Any  # the lifespan-yielded service state
    headers: Mapping[str, str]  # names lower-case
    body: bytes
    params: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class FastReply:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    content_type: bytes = JSON
    # A response that sends itself (one that stalls or breaks the connection on purpose).
    custom: Response | None = None


FastHandler = Callable[[FastRequest], Awaitable[FastReply]]


@dataclass(frozen=True, slots=True)
class FastRoute:
    """`method` and `template` as FastAPI declares them; `{name}` segments become params."""

    method: str
    template: str
    handler: FastHandler

    def match(self, path: str) -> dict[str, str] | None:
        want = self.template.split("/")
        got = path.split("/")
        if len(want) != len(got):
            return None
        params: dict[str, str] = {}
        for pattern, part in zip(want, got, strict=True):
            if pattern.startswith("{") and pattern.endswith("}"):
                if not part:
                    return None
                params[pattern[1:-1]] = part
            elif pattern != part:
                return None
        return params


def parse_body(model: type[ModelT], body: bytes) -> ModelT:
    """A JSON body as `model`, else 422 with the same error list FastAPI gives."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = [
            {"loc": ["body", *(str(p) for p in e["loc"])], "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_input=False, include_url=False, include_context=False)
        ]
        raise ValidationProblem("the request is not valid", extra={"errors": errors}) from None


def path_uuid(request: FastRequest, name: str) -> UUID:
    """A UUID path parameter, else 422 like FastAPI's."""
    try:
        return UUID(request.params[name])
    except ValueError:
        error = {"loc": ["path", name], "msg": "Input should be a valid UUID"}
        error["type"] = "uuid_parsing"
        raise ValidationProblem("the request is not valid", extra={"errors": [error]}) from None


async def framework_reply(handler: FastHandler, request: Request, **params: object) -> Response:
    """Serve a fast handler from its FastAPI route (the lane off, or a test app)."""
    reply = await handler(
        FastRequest(
            request.state.app_state,
            request.headers,
            await request.body(),
            {name: str(value) for name, value in params.items()},
        )
    )
    if reply.custom is not None:
        return reply.custom
    return Response(
        reply.body,
        status_code=reply.status,
        headers=reply.headers,
        media_type=reply.content_type.decode(),
    )


def problem_reply(exc: Problem) -> FastReply:
    body = problem_bytes(exc.status, exc.code, exc.detail, title=exc.title, **exc.extra)
    return FastReply(exc.status, body, dict(exc.headers), PROBLEM_CONTENT_TYPE.encode())


class FastLane:
    """The ASGI endpoint behind the shared middleware for every fast route of a service."""

    def __init__(
        self, routes: Iterable[FastRoute], *, max_body_bytes: int, body_read_timeout_s: float
    ) -> None:
        self.exact: dict[tuple[str, str], FastRoute] = {}
        self.templated: list[FastRoute] = []
        for route in routes:
            if "{" in route.template:
                self.templated.append(route)
            else:
                self.exact[(route.method, route.template)] = route
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s

    def find(self, method: str, path: str) -> tuple[FastRoute, dict[str, str]] | None:
        route = self.exact.get((method, path))
        if route is not None:
            return route, {}
        for candidate in self.templated:
            if candidate.method == method:
                params = candidate.match(path)
                if params is not None:
                    return candidate, params
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route, params = scope["shopstack.fast"]
        try:
            body = await read_body(
                scope,
                receive,
                limit=self.max_body_bytes,
                timeout_s=self.body_read_timeout_s,
            )
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            state = scope["state"]["app_state"]
            reply = await route.handler(FastRequest(state, headers, body, params))
        except Problem as exc:
            reply = problem_reply(exc)
        except HTTPException as exc:  # from read_body: 400, 408, 413
            # The rest of the body was not read: the connection cannot carry another request.
            status = exc.status_code
            reply = FastReply(
                status,
                problem_bytes(status, code_for_status(status), str(exc.detail)),
                {"connection": "close"},
                PROBLEM_CONTENT_TYPE.encode(),
            )
        if reply.custom is not None:
            await reply.custom(scope, receive, send)
            return
        raw_headers = [
            (b"content-type", reply.content_type),
            (b"content-length", str(len(reply.body)).encode()),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()),
        ]
        await send({"type": "http.response.start", "status": reply.status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": reply.body})


class ServiceApp(FastAPI):
    """FastAPI, plus the fast lane: a registered route skips the framework's own stack,
    and an OpenAPI document completed by services.common.openapi."""

    fast_lane: FastLane | None = None
    fast_stack: Callable[[Scope, Receive, Send], Awaitable[None]] | None = None

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = complete(super().openapi())
        return self.openapi_schema

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.fast_stack is not None and self.fast_lane is not None:
            found = self.fast_lane.find(scope["method"], scope["path"])
            if found is not None:
                scope["app"] = self
                scope["shopstack.fast"] = found
                scope["shopstack.route"] = found[0].template
                await self.fast_stack(scope, receive, send)
                return
        await super().__call__(scope, receive, send)
