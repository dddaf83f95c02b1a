"""WebSocket helpers shared by the node and session endpoints: reading a text frame, credentials
from the upgrade request, and ``Link``, a socket's outbound side as an actor."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from dragoman.errors import ProtocolError

log = structlog.get_logger(__name__)
MAX_STRIKES = 20  # consecutive invalid frames tolerated before a connection is closed


async def receive_text(ws: WebSocket) -> str:
    """The next text frame. A binary frame is a protocol error (answered, connection kept)."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is not None:
        return str(message["text"])
    raise ProtocolError("binary frames are not part of the protocol: send JSON text frames")


def bearer(conn: HTTPConnection, query_name: str) -> str:
    """``Authorization: Bearer <token>``, or the ``?<query_name>=`` parameter."""
    auth = conn.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return conn.query_params.get(query_name, "")


class Link:
    """A socket's outbound side: one writer task drains a queue, so any task may send without a
    lock and a slow peer never blocks the sender. The queue is bounded: a peer that cannot keep up is
    disconnected rather than letting memory grow."""

    def __init__(self, ws: WebSocket, name: str, max_backlog: int = 1000) -> None:
        self.ws = ws
        self.name = name
        self._queue: asyncio.Queue[str | None] = asyncio.Queue(max_backlog)
        self._task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.overflowed = False

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
            self.overflowed = True
            self.closed.set()
            if self._task is not None:
                self._task.cancel()
            return False

    async def _write(self) -> None:
        try:
            while True:
                text = await self._queue.get()
                if text is None:
                    return
                await self.ws.send_text(text)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket went away: the reader side will notice and clean up
            log.debug("writer stopped", link=self.name, error=str(exc))
        finally:
            self.closed.set()

    async def close(self, code: int = 1000, timeout: float = 5.0) -> None:
        """Send what is queued (unless the peer overflowed it), then close the socket. The writer
        task is always gone when this returns."""
        task = self._task
        if task is not None and not self.overflowed:
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.closed.set()
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)
