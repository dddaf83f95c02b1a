"""A socket's outbound side as an actor: one writer task drains a queue, so any task may send
without a lock and a slow peer never blocks the sender (the queue is bounded: a peer that cannot
keep up is disconnected rather than letting memory grow)."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from starlette.websockets import WebSocket, WebSocketState

log = structlog.get_logger(__name__)


class Link:
    def __init__(self, ws: WebSocket, name: str, max_backlog: int = 1000) -> None:
        self.ws = ws
        self.name = name
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(max_backlog)
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._write(), name=f"writer:{self.name}")

    def send(self, text: str) -> bool:
        if self.closed.is_set():
            return False
        try:
            self._queue.put_nowait(text)
            return True
        except asyncio.QueueFull:
            log.warning("peer too slow, closing", link=self.name)
            self.closed.set()
            return False

    async def _write(self) -> None:
        try:
            while True:
                text = await self._queue.get()
                if text is None:
                    return
                await self.ws.send_text(text)
        except Exception as exc:  # the socket went away: the reader side will notice and clean up
            log.debug("writer stopped", link=self.name, error=str(exc))
        finally:
            self.closed.set()

    async def flush_and_close(self, code: int = 1000, timeout: float = 5.0) -> None:
        """Send what is queued, then close the socket."""
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)
        if self._task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout)
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self.closed.set()
