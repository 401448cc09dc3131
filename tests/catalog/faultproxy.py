"""A tiny TCP proxy that can swallow the next reply and reset the client (INV-5).

The request reaches the server and runs there; only its answer is lost, as when a
reply times out. The client then retries on a new connection.
"""

from __future__ import annotations

import asyncio
import contextlib


class DropReplyProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.drop_next = False
        self.drops = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(*self.target), timeout=5
            )
        except (OSError, TimeoutError):
            writer.close()
            self._tasks.discard(task)
            return

        async def client_to_server() -> None:
            while data := await reader.read(65_536):
                up_writer.write(data)
                await up_writer.drain()

        async def server_to_client() -> None:
            while data := await up_reader.read(65_536):
                if self.drop_next:
                    self.drop_next = False
                    self.drops += 1
                    writer.transport.abort()  # the reply is lost, the client sees a reset
                    return
                writer.write(data)
                await writer.drain()

        try:
            pumps = [
                asyncio.create_task(client_to_server()),
                asyncio.create_task(server_to_client()),
            ]
            _, pending = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pending:
                pump.cancel()
            for pump in pumps:
                with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                    await pump
        finally:
            for w in (writer, up_writer):
                w.close()
            self._tasks.discard(task)
