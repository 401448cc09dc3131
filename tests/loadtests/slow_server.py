"""A real HTTP/1.1 server that answers one request at a time, each taking SERVICE_S.

Used to show coordinated omission: a closed-loop client sees the service time,
an open-model client at twice the capacity sees the queue grow.
Run: python -m tests.loadtests.slow_server PORT SERVICE_S
"""

from __future__ import annotations

import asyncio
import sys

BODY = b'{"ok":true}'


async def serve(port: int, service_s: float) -> None:
    lock = asyncio.Lock()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                async with lock:
                    await asyncio.sleep(service_s)
                close = b"connection: close" in head.lower()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(BODY)).encode()
                    + (b"\r\nConnection: close" if close else b"")
                    + b"\r\n\r\n"
                    + BODY
                )
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), float(sys.argv[2])))
