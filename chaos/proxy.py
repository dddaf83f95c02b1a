"""A small TCP proxy per role, between the peers and the scheduler processes.

Nodes reach scheduler A and clients reach scheduler B through one of these, so that after a
scheduler process dies they reconnect *through the same address*: a new connection goes to the first
backend that accepts it (the preferred one while it lives, the other one after). Connections are
never moved: when a backend dies, its connections are closed and the peers reconnect on their own.

The proxy also injects the "TCP connection cut without a close frame" fault: ``cut(tag)`` stops
forwarding on that peer's live connection in both directions while keeping both sockets open (a
blackhole: nothing arrives, nothing is closed), and ``Conn.abort(rst=True)`` later ends both sides
with an RST.

A connection is tagged by the ``chaos`` query parameter of its HTTP upgrade request
(``ws://host:port/ws/node?chaos=n1``): the request line is the one plaintext thing a proxy can read
without speaking WebSocket, and the scheduler ignores unknown query parameters.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

CHUNK = 256 * 1024


@dataclass
class Conn:
    tag: str
    backend: tuple[str, int]
    peer_w: asyncio.StreamWriter
    back_w: asyncio.StreamWriter
    opened_at: float = field(default_factory=time.monotonic)
    blackholed: bool = False
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False
    pipes: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self, rst: bool = False) -> None:
        """Close both sides; with ``rst`` the kernel sends RST instead of FIN (SO_LINGER 0)."""
        if self.closed:
            return
        self.closed = True
        self.ended.set()
        for w in (self.peer_w, self.back_w):
            sock = w.get_extra_info("socket")
            if rst and sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort() if rst else w.close()


class Proxy:
    def __init__(self, name: str, backends: list[tuple[str, int]]) -> None:
        self.name = name
        self.backends = backends  # preferred first
        self.port = 0
        self.conns: list[Conn] = []
        self.failovers = 0  # connections that went to a backend other than the preferred one
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, limit=CHUNK)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def live(self, tag: str | None = None) -> list[Conn]:
        return [c for c in self.conns if not c.closed and (tag is None or c.tag == tag)]

    def cut(self, tag: str) -> Conn | None:
        """Blackhole the newest live connection tagged ``tag``: no byte forwarded either way, no
        close, no RST. Returns it (for ``abort(rst=True)`` later), or None when there is none."""
        live = self.live(tag)
        if not live:
            return None
        conn = live[-1]
        conn.blackholed = True
        for pipe in conn.pipes:  # nothing is read any more, so nothing is forwarded or closed
            pipe.cancel()
        return conn

    async def _connect_backend(self) -> tuple[tuple[str, int], asyncio.StreamReader, asyncio.StreamWriter]:
        last: Exception | None = None
        for i, backend in enumerate(self.backends):
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(*backend, limit=CHUNK), 2.0)
            except (OSError, TimeoutError) as exc:
                last = exc
                continue
            if i > 0:
                self.failovers += 1
            return backend, r, w
        raise ConnectionError(f"{self.name}: no backend accepts connections ({last})")

    async def _handle(self, peer_r: asyncio.StreamReader, peer_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn: Conn | None = None
        try:
            try:
                first = await asyncio.wait_for(peer_r.readuntil(b"\r\n"), 10)
                backend, back_r, back_w = await self._connect_backend()
            except (Exception, asyncio.CancelledError):
                peer_w.close()
                raise
            conn = Conn(_tag_of(first), backend, peer_w, back_w)
            self.conns.append(conn)
            back_w.write(first)
            conn.pipes = [asyncio.create_task(self._pipe(conn, peer_r, back_w)),
                          asyncio.create_task(self._pipe(conn, back_r, peer_w))]
            await conn.ended.wait()  # a pipe ended (EOF, error), an abort (the RST of a cut), or shutdown
        except (Exception, asyncio.CancelledError):
            pass
        finally:
            if conn is not None:
                conn.abort()
                for pipe in conn.pipes:
                    pipe.cancel()
            self._tasks.discard(task)

    async def _pipe(self, conn: Conn, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (Exception, asyncio.CancelledError):
            pass
        finally:
            if not conn.blackholed:
                conn.abort()  # one side ended: end the other (a dead backend closes its peers)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in self.conns:
            conn.abort(rst=True)
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


def _tag_of(request_line: bytes) -> str:
    """``GET /ws/node?chaos=n1 HTTP/1.1`` -> ``n1`` ("" when absent)."""
    try:
        target = request_line.split(b" ")[1].decode("latin-1")
        return parse_qs(urlsplit(target).query).get("chaos", [""])[0]
    except (IndexError, UnicodeDecodeError):
        return ""
