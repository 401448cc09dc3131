"""Bare hello apps for calibration: the least work granian can be asked to do per request.

`rsgi_app` is granian's native interface; `asgi_app` is the interface the services
use (without FastAPI). Both read the request body, so POST shapes cost what a
real POST costs on the wire, and answer a 13-byte JSON body.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

BODY = b'{"ok": true}\n'
HEADERS = [("content-type", "application/json")]


async def rsgi_app(scope: Any, proto: Any) -> None:
    """RSGI: read the body, answer the fixed body."""
    await proto()
    proto.response_bytes(200, HEADERS, BODY)


async def asgi_app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """ASGI: answer lifespan, read the body, answer the fixed body."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:
        message = await receive()
        more = bool(message.get("more_body"))
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(k.encode(), v.encode()) for k, v in HEADERS],
        }
    )
    await send({"type": "http.response.body", "body": BODY})
