"""The caller, as the gateway vouches for it (X-User-Id / X-User-Role).

Services behind the gateway trust these headers; the gateway strips any a
client sends and sets them only from a verified token. Services must not be
exposed to clients directly (docker-compose publishes only the gateway).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.common.errors import Forbidden, Unauthorized

USER_ID_HEADER = "x-user-id"
USER_ROLE_HEADER = "x-user-role"
USER_ID_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
_SANE_USER_ID = re.compile(USER_ID_PATTERN)


@dataclass(frozen=True)
class Caller:
    user_id: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def caller_from(headers: Mapping[str, str]) -> Caller:
    """The authenticated caller named by these (lower-case) headers, else 401."""
    user_id = headers.get(USER_ID_HEADER)
    if not user_id or not _SANE_USER_ID.match(user_id):
        raise Unauthorized("authentication required")
    return Caller(user_id=user_id, role=headers.get(USER_ROLE_HEADER, "user"))


GATEWAY_TOKEN = HTTPBearer(
    bearerFormat="JWT",
    scheme_name="bearerAuth",
    description=(
        "An access token from the gateway's POST /api/v1/auth/login. The gateway verifies "
        "it and forwards the user to the service as X-User-Id / X-User-Role."
    ),
    auto_error=False,
)
"""Documents (OpenAPI `security`) that a route needs the gateway's bearer token; the
gateway strips the token after checking it, so the service itself never sees one."""


async def current_caller(
    request: Request,
    _token: Annotated[HTTPAuthorizationCredentials | None, Security(GATEWAY_TOKEN)] = None,
) -> Caller:
    """FastAPI dependency: the authenticated caller, else 401."""
    return caller_from(request.headers)


async def current_admin(caller: Annotated[Caller, Depends(current_caller)]) -> Caller:
    """FastAPI dependency: an authenticated caller with role admin, else 401/403."""
    if not caller.is_admin:
        raise Forbidden("this operation needs the admin role")
    return caller
