"""Sandbox and payment tests' process helpers (on top of tests.support.process)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.process import ROOT, ServiceProcess
from tests.support.process import start_service as support_start

WEBHOOK_SECRET = "test-psp-webhook-secret-0123456789abcdef-xyz"

__all__ = ["ROOT", "WEBHOOK_SECRET", "ServiceProcess", "declare_huge_body", "start_service"]


def start_service(
    service: str, *, port: int, env: dict[str, str], run_dir: Path, timeout_s: float = 30.0
) -> ServiceProcess:
    """Start `shopstack serve <service>` on `port`, signing with the tests' webhook secret."""
    return support_start(
        service,
        env={"SHOPSTACK_LOG_LEVEL": "INFO", "SHOPSTACK_PSP_WEBHOOK_SECRET": WEBHOOK_SECRET, **env},
        log_path=run_dir / f"{service}.log",
        port=port,
        timeout_s=timeout_s,
    )


async def declare_huge_body(port: int, path: str, size: int = 1_048_577) -> tuple[int, bytes]:
    """POST headers declaring a body over 1 MiB, send none of it, return (status, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        return status, body
    finally:
        writer.close()
