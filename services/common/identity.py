"""The caller, as the gateway vouches for it (X-User-Id / X-User-Role).

Services behind the gateway trust these headers; the gateway strips any a
client sends and sets them only from a verified token. Services must not be
exposed to clients directly (docker-compose publishes only the gateway).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from fastapi import Request

from services.common.errors import Forbidden, Unauthorized

USER_ID_HEADER = "x-user-id"
USER_ROLE_HEADER = "x-user-role"
_SANE_USER_ID = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


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


async def current_caller(request: Request) -> Caller:
    """FastAPI dependency: the authenticated caller, else 401."""
    return caller_from(request.headers)


async def current_admin(request: Request) -> Caller:
    """FastAPI dependency: an authenticated caller with role admin, else 401/403."""
    caller = await current_caller(request)
    if not caller.is_admin:
        raise Forbidden("this operation needs the admin role")
    return caller
