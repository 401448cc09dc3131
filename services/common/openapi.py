"""The OpenAPI document every service publishes, completed from what the code knows.

FastAPI describes routes from their models; this module adds what it cannot see:
every error is an RFC 9457 problem (`application/problem+json`, one `Problem`
schema), the 400/408/413/422 any body or parameter can earn (services.common.middleware
and the validation handlers), the 401 of routes that need the gateway's bearer token
(their `security`, from services.common.identity), and the 502/503/504 the gateway
answers for every public route (`/api/v1`) when an upstream or the gateway itself
cannot serve.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

from services.common.errors import PROBLEM_CONTENT_TYPE, code_for_status, problem_body

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
PUBLIC_PREFIX = "/api/v1/"
_BODY_METHODS = frozenset({"post", "put", "patch"})

PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; `type` is `/problems/<code>` (see API.md).",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string", "pattern": "^/problems/[a-z0-9-]+$"},
        "title": {"type": "string"},
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "description": "What failed validation: where, the rule, never the input.",
            "items": {"type": "object"},
        },
    },
}

_DEFAULT_DETAILS: dict[int, str] = {
    400: "the request body is not readable JSON",
    401: "a valid bearer token is required",
    408: "request body was not received in time",
    413: "request body exceeds the limit",
    422: "the request is not valid",
    502: "the upstream failed",
    503: "overloaded, or the upstream is unavailable",
    504: "the upstream did not answer in time",
}


def problem(status: int, detail: str, *, code: str | None = None) -> dict[str, Any]:
    """An OpenAPI response object for one problem status (route `responses=` entry)."""
    example = problem_body(status, code or code_for_status(status), None, detail)
    return {
        "description": detail,
        "content": {PROBLEM_CONTENT_TYPE: {"schema": PROBLEM_REF, "example": example}},
    }


RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}
}
RATE_LIMITED: dict[int | str, dict[str, Any]] = {
    429: {
        **problem(429, "this user or client sends writes too fast", code="rate-limited"),
        "headers": RETRY_AFTER,
    }
}
"""`responses=` of a write the gateway rate-limits (per user and per client IP)."""


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if isinstance(operation, dict) and "responses" in operation:
                yield path, method, operation


def _as_problem(response: dict[str, Any]) -> None:
    """Every error body is problem+json of the one Problem schema (keeping any example)."""
    content = response.get("content") or {}
    example = None
    for media in content.values():
        example = example or media.get("example")
    doc: dict[str, Any] = {"schema": PROBLEM_REF}
    if example is not None:
        doc["example"] = example
    response["content"] = {PROBLEM_CONTENT_TYPE: doc}


def _ensure(operation: dict[str, Any], status: int) -> None:
    responses: dict[str, Any] = operation["responses"]
    if str(status) not in responses:
        responses[str(status)] = problem(status, _DEFAULT_DETAILS[status])


def complete(schema: dict[str, Any]) -> dict[str, Any]:
    """Complete a FastAPI-made OpenAPI document in place (see the module docstring)."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = PROBLEM_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, method, operation in _operations(schema):
        if operation.get("security"):
            _ensure(operation, 401)
        if operation.get("parameters") or "requestBody" in operation:
            _ensure(operation, 422)
        if method in _BODY_METHODS and "requestBody" in operation:
            for status in (400, 408, 413):
                _ensure(operation, status)
        if path.startswith(PUBLIC_PREFIX):
            for status in (502, 503, 504):
                _ensure(operation, status)
        for status, response in operation["responses"].items():
            if status[0] in "45":
                _as_problem(response)
    return schema


def link(
    path: str,
    method: str,
    description: str,
    *,
    parameters: dict[str, str] | None = None,
    request_body: Any = None,
) -> dict[str, Any]:
    """An OpenAPI link to the operation at `path` / `method` of the same document."""
    pointer = path.replace("~", "~0").replace("/", "~1")
    doc: dict[str, Any] = {
        "operationRef": f"#/paths/{pointer}/{method}",
        "description": description,
    }
    if parameters:
        doc["parameters"] = parameters
    if request_body is not None:
        doc["requestBody"] = request_body
    return doc


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` inlined: a request body documented by
    `openapi_extra` (a route that reads its raw body) cannot add components."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
