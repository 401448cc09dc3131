"""One error hierarchy for every service, rendered once as RFC 9457 problem+json."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

PROBLEM_CONTENT_TYPE = "application/problem+json"


_TITLES: dict[int, str] = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class Problem(Exception):
    """Base of every error a client may see; `code` becomes `/problems/<code>`."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal Server Error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        """Return the problem document as a dict."""
        return problem_body(self.status, self.code, self.title, self.detail, self.extra)


def problem_body(
    status: int, code: str, title: str | None, detail: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Build a problem document; `extra` members never overwrite the standard ones."""
    doc: dict[str, Any] = dict(extra or {})
    doc.update(
        {
            "type": f"/problems/{code}",
            "title": title or _TITLES.get(status, "Error"),
            "status": status,
            "detail": detail,
        }
    )
    return doc


def problem_bytes(
    status: int, code: str, detail: str, *, title: str | None = None, **extra: Any
) -> bytes:
    """Serialize a problem document to bytes."""
    return orjson.dumps(problem_body(status, code, title, detail, extra))


def code_for_status(status: int) -> str:
    """Map a bare HTTP status (from the framework) to a problem code."""
    return {
        400: "bad-request",
        401: "unauthorized",
        403: "forbidden",
        404: "not-found",
        405: "method-not-allowed",
        408: "request-timeout",
        413: "payload-too-large",
        415: "unsupported-media-type",
        422: "validation-error",
        429: "rate-limited",
        503: "overloaded",
    }.get(status, "http-error")


class BadRequest(Problem):
    status, code, title = 400, "bad-request", "Bad Request"


class ValidationProblem(Problem):
    status, code, title = 422, "validation-error", "Validation Error"


class NotFound(Problem):
    status, code, title = 404, "not-found", "Not Found"


class Unauthorized(Problem):
    status, code, title = 401, "unauthorized", "Unauthorized"

    def __init__(self, detail: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("headers", {"WWW-Authenticate": 'Bearer realm="shopstack"'})
        super().__init__(detail, **kwargs)


class Forbidden(Problem):
    status, code, title = 403, "forbidden", "Forbidden"


class SoldOut(Problem):
    status, code, title = 409, "sold-out", "Sold Out"


class LimitExceeded(Problem):
    status, code, title = 409, "limit-exceeded", "Limit Exceeded"


class OrderNotPayable(Problem):
    status, code, title = 409, "order-not-payable", "Order Not Payable"


class IdempotencyMismatch(Problem):
    status, code, title = 422, "idempotency-mismatch", "Idempotency Key Reused"


class IdempotencyInProgress(Problem):
    status, code, title = 409, "idempotency-in-progress", "Request In Progress"


class BadSignature(Problem):
    status, code, title = 400, "bad-signature", "Bad Signature"


class PayloadTooLarge(Problem):
    status, code, title = 413, "payload-too-large", "Payload Too Large"


class RequestTimeout(Problem):
    status, code, title = 408, "request-timeout", "Request Timeout"


class RateLimited(Problem):
    status, code, title = 429, "rate-limited", "Too Many Requests"

    def __init__(self, detail: str | None = None, *, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_s))})


class Overloaded(Problem):
    status, code, title = 503, "overloaded", "Overloaded"

    def __init__(self, detail: str | None = None, *, retry_after_s: int = 1) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after_s))})


class UpstreamUnavailable(Problem):
    """An upstream failed; the status is 502, 503 or 504 depending on how."""

    status, code, title = 503, "upstream-unavailable", "Upstream Unavailable"

    def __init__(
        self, detail: str | None = None, *, status: int = 503, retry_after_s: int | None = None
    ) -> None:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
        super().__init__(detail, headers=headers)
        self.status = status  # type: ignore[misc]


class ServiceNotReady(Problem):
    status, code, title = 503, "not-ready", "Service Not Ready"


class Conflict(Problem):
    status, code, title = 409, "conflict", "Conflict"
