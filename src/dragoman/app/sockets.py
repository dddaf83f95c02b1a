"""WebSocket helpers shared by the node and session endpoints: reading a text frame, credentials
from the upgrade request, and ``Link``, a socket's outbound side as an actor."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import struct
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import apply_mask
from websockets.protocol import OPEN, SERVER

from dragoman.errors import ProtocolError
from dragoman.flag import Flag

log = structlog.get_logger(__name__)
MAX_STRIKES = 20  # consecutive invalid frames tolerated before a connection is closed
INBOUND_HIGH_WATER = 8  # messages received and not yet taken by the app before reading stops
INBOUND_HIGH_WATER_SIZE = 256 * 1024  # ... or characters/bytes of them (a few large frames are enough)
HOLD_S = 0.02  # the longest a frame sent with Link.send_soon waits for company


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


STOPPED = object()
T = TypeVar("T")


class Interruptible:
    """Waits in the calling task that another party can cut short with ``stop()``: a frame read,
    without a task and an ``asyncio.wait`` per frame."""

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.waiting = self.stopped = False

    def stop(self, _: object = None) -> None:
        self.stopped = True
        if self.waiting and self.task is not None:
            self.task.cancel()

    async def wait(self, awaitable: Awaitable[T]) -> T | object:
        """The awaitable's result, or ``STOPPED`` (then it was cancelled)."""
        if self.stopped:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            return STOPPED
        self.waiting = True
        try:
            return await awaitable
        except asyncio.CancelledError:
            assert self.task is not None
            if self.stopped and self.task.uncancel() == 0:  # our own interruption, nothing else's
                return STOPPED
            raise
        finally:
            self.waiting = False


class _Inbound:
    """uvicorn's receive queue (``put_nowait``, ``get``, ``empty``; one reader: the ASGI app) without
    what an ``asyncio.Queue`` carries for every socket (three deques and an Event, ~3 kB): a list
    of what arrived and, while the reader waits, one future. ``size`` is the length of the text or
    bytes waiting, which bounds the memory it holds together with ``len``."""

    __slots__ = ("_items", "_waiter", "size", "direct")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None
        self.size = 0
        # Takes a message in place of the reader, when the reader waits with nothing before it
        # (so order is kept); returns False to leave it to the reader (see ``session_ws``).
        self.direct: Callable[[Any], bool] | None = None

    @staticmethod
    def _size(item: Any) -> int:
        return len(item.get("text") or item.get("bytes") or "")

    def put_nowait(self, item: Any) -> None:
        waiter = self._waiter
        idle = waiter is not None and not waiter.done()  # the reader waits, and took everything before
        if idle and self.direct is not None and self.direct(item):
            return
        self._items.append(item)
        self.size += self._size(item)
        if idle:
            waiter.set_result(None)  # type: ignore[union-attr]

    def empty(self) -> bool:
        return not self._items

    def __len__(self) -> int:
        return len(self._items)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.pop(0)  # (a handful at most: reading the socket stops beyond that)
        self.size -= self._size(item)
        return item

    def full(self) -> bool:
        return len(self._items) >= INBOUND_HIGH_WATER or self.size >= INBOUND_HIGH_WATER_SIZE

    def drained(self) -> bool:
        return len(self._items) <= INBOUND_HIGH_WATER // 2 and self.size <= INBOUND_HIGH_WATER_SIZE // 2


class FrameWriterProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, named in each connection's ASGI scope (extension
    ``dragoman.frames``) so that ``Link`` can write frames to it in place. The scheduler's server
    runs with it (``server.py``); under any other server Link goes through the ASGI ``send``.

    Pings at two rates: uvicorn's ``ws_ping_interval`` while the connection is *watched* (a node
    holding a job: if it stops answering, its jobs must move on within seconds), and
    ``idle_ping_interval`` otherwise (a session, an idle node: nothing waits on it, and thousands of
    such sockets would otherwise cost the process a ping each every couple of seconds). Watching a
    connection brings its next ping within ``ws_ping_interval``, so a peer that hung while idle is
    found out as quickly once it is given work.

    An unwatched socket that sent a message since its last ping is not pinged: the message shows it
    is alive (nodes and web clients heartbeat every 15 s, more often than the idle interval, so
    thousands of them cost no pings at all). One that falls silent is pinged within two idle
    intervals. A watched socket is pinged whatever it sends, so a job holder that hangs is found
    out within ``ws_ping_interval`` + timeout."""

    idle_ping_interval: float | None = None  # None: always ws_ping_interval (see ``with_idle_pings``)
    watched = False
    heard = False  # a message arrived since the keepalive timer last looked

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Inbound()  # type: ignore[assignment]  # (memory per socket: see _Inbound)
        self.writable = Flag()  # type: ignore[assignment]  # (memory per socket: see dragoman.flag)
        self.writable.set()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if (conn.state is OPEN and not conn.reader.buffer and conn.current_size is None and not conn.extensions
                and not self.close_sent):
            data = self._text_frames(data)
            if not data:
                return
        super().data_received(data)

    def _text_frames(self, data: bytes) -> bytes:
        """Take the whole text frames at the start of ``data`` that need nothing of websockets'
        parser (unfragmented, masked, shorter than 64 KiB, within the size limit, valid UTF-8) and
        hand each to the app; what is left (from the first frame not taken) goes to the parser, which
        is then where it was: between frames, its buffer empty (``data_received`` checks). Every
        frame of a job went through the parser's generators and per-frame objects: ~10% of the
        scheduler's CPU per job here."""
        limit = self.conn.max_message_size
        at, end = 0, len(data)
        while end - at >= 6:
            b1 = data[at + 1]
            if data[at] != 0x81 or b1 < 0x80:  # (FIN + text, no RSV bits; the mask bit)
                break
            n, head = b1 & 0x7F, 6
            if n == 126:
                if end - at < 8:
                    break
                n, head = (data[at + 2] << 8) | data[at + 3], 8
            elif n == 127:
                break
            if (limit is not None and n > limit) or end - at < head + n:
                break
            try:
                text = apply_mask(data[at + head:at + head + n], data[at + head - 4:at + head]).decode()
            except UnicodeDecodeError:
                break
            at += head + n
            self.heard = True
            if self.close_sent:  # (as uvicorn does: past websocket.close, messages are dropped)
                continue
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
            self._pause_if_full()
        return data[at:] if at else data

    def send_receive_event_to_app(self) -> None:
        # uvicorn stops reading the socket after every message until the app has taken it, then
        # starts again: two system calls per frame received (the loop's interest in the socket
        # dropped and added back). Here reading stops only once INBOUND_HIGH_WATER messages, or
        # INBOUND_HIGH_WATER_SIZE of text or bytes, wait (one frame of any size is enough for the
        # latter, as with uvicorn), which bounds memory just the same. (``read_paused`` keeps
        # uvicorn's meaning: its close path starts reading again, for the peer's close frame.)
        self.heard = True
        paused = self.read_paused
        self.read_paused = True  # (so uvicorn's own pause after this message is skipped)
        super().send_receive_event_to_app()
        self.read_paused = paused
        self._pause_if_full()

    def _pause_if_full(self) -> None:
        """Stop reading the socket once the app has INBOUND_HIGH_WATER messages (or that size) waiting."""
        if not self.read_paused and self.queue.full():  # type: ignore[attr-defined]
            self.read_paused = True
            self.transport.pause_reading()

    async def receive(self) -> Any:
        message = await self.queue.get()
        if self.read_paused and self.queue.drained():  # type: ignore[attr-defined]
            self.read_paused = False
            self.transport.resume_reading()
        return message

    def start_keepalive(self) -> None:
        # Called once the handshake's response is sent: nothing reads the upgrade request and the
        # response again, and they weigh ~2.5 kB a socket for its whole life.
        super().start_keepalive()
        self.request = self.response = None  # type: ignore[assignment]

    @classmethod
    def with_idle_pings(cls, seconds: float) -> type[FrameWriterProtocol]:
        return type(cls.__name__, (cls,), {"idle_ping_interval": seconds})

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # (None: the upgrade was refused)
            scope["extensions"]["dragoman.frames"] = self

    def schedule_ping(self) -> None:
        assert self.ping_interval is not None
        interval = self.ping_interval
        if not self.watched and self.idle_ping_interval is not None:
            interval = max(interval, self.idle_ping_interval)
        self.ping_timer = self.loop.call_later(max(0.0, interval - self.last_ping_rtt), self._keepalive)

    def _keepalive(self) -> None:
        """The keepalive timer: a ping, unless the socket is unwatched and sent a message since the
        timer last looked (then it looks again an interval later)."""
        heard, self.heard = self.heard, False
        if heard and not self.watched:
            self.schedule_ping()
        else:
            self.send_keepalive_ping()

    def watch(self, on: bool) -> None:
        """Ping at the fast rate (``on``) or the idle one, from the next ping (or sooner: see ``probe``)."""
        if on == self.watched:
            return
        self.watched = on
        if on and self.ping_interval:
            self.probe(self.ping_interval)

    def probe(self, within: float = 0.0) -> None:
        """Bring the next ping forward to ``within`` seconds from now (unless one is due sooner or
        awaits its pong): a peer that stopped answering is found out ``ws_ping_timeout`` later."""
        timer = self.ping_timer
        if timer is None or timer.when() <= self.loop.time() + within:
            return  # a ping in flight, keepalive off or not started, or the next ping is due sooner
        timer.cancel()
        self.ping_timer = self.loop.call_later(within, self.send_keepalive_ping)


def take_in_place(link: Link, direct: Callable[[Any], bool]) -> bool:
    """Have ``direct`` take the socket's frames that arrive while its reader waits with nothing
    queued, in the socket's own callback (no task woken); a frame it leaves (returns False) goes to
    the reader as before, and so does every frame under a server other than ours (returns False)."""
    inbound = getattr(link.proto, "queue", None)
    if not isinstance(inbound, _Inbound):
        return False
    inbound.direct = direct
    return True


def text_frame(text: str) -> bytes:
    """A whole text frame from the server (RFC 6455 5.2: unmasked, no extension), as websockets'
    ``send_text`` makes it, without its per-frame objects: a job's three frames out took ~5% of
    the scheduler's CPU there. Only for an open connection without extensions and with nothing
    of its own waiting to be written (``Link`` checks), so frames keep their order."""
    data = text.encode()
    n = len(data)
    if n < 126:
        return bytes((0x81, n)) + data
    if n < 65536:
        return _HEAD16.pack(0x81, 126, n) + data
    return _HEAD64.pack(0x81, 127, n) + data


_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


def _frame_writer(ws: WebSocket) -> Any:
    scope = getattr(ws, "scope", None) or {}
    return (scope.get("extensions") or {}).get("dragoman.frames")


class _Holding:
    """The links holding frames (``Link.send_soon``) of one event loop, released together by one
    timer: a timer per link and frame cost each job a few µs to make and to run."""

    __slots__ = ("loop", "links", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.links: list[Link] = []
        self.timer: asyncio.TimerHandle | None = None

    def add(self, link: Link) -> None:
        self.links.append(link)
        if self.timer is None:
            self.timer = self.loop.call_later(HOLD_S, self.release)

    def release(self) -> None:
        self.timer = None
        links, self.links = self.links, []
        for link in links:
            if link._held is not None:  # (not sent with a later frame meanwhile)
                link._release()


_HOLDING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Holding] = weakref.WeakKeyDictionary()


def _holding(loop: asyncio.AbstractEventLoop) -> _Holding:
    h = _HOLDING.get(loop)
    if h is None:
        h = _HOLDING[loop] = _Holding(loop)
    return h


class Link:
    """A socket's outbound side. Any task may send without a lock, and a slow peer never blocks the
    sender: what the socket cannot take now waits in a bounded queue for a writer task, and a peer
    that lets the queue fill up is disconnected rather than letting memory grow.

    The common case costs no task switch: while nothing waits in the queue and the socket takes
    writes, a frame is encoded in place and joins the frames sent to this socket in the same turn of
    the event loop; they leave in one write (one system call) at the end of the turn."""

    def __init__(self, ws: WebSocket, name: str, max_backlog: int = 1000) -> None:
        self.ws = ws
        self.name = name
        self.max_backlog = max_backlog
        # The queue and its writer task exist only once a frame had to wait (most sockets never
        # have one): an idle socket costs no task, no queue and no event (bench.idle: memory per socket).
        self._queue: asyncio.Queue[str | None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._proto = _frame_writer(ws)
        self._out: list[bytes] = []  # frames of this turn, not written yet
        self._writing = False  # the writer task holds a frame it is sending
        self.closed = False  # closed, overflowed, or the writer found the socket gone: nothing more is sent
        self.overflowed = False
        self.frames = 0  # sent in place (for tests and benchmarks)
        self.writes = 0

    @property
    def proto(self) -> Any:
        """The socket's ``FrameWriterProtocol`` (None under another server)."""
        return self._proto

    # Frames nobody waits on (``send_soon``): they leave with the next frame, or within HOLD_S.
    _held: list[str] | None = None

    def send_soon(self, text: str) -> bool:
        """Send a frame nobody waits on (a ``ui_event``): it leaves in the same write as the next
        frame sent to this socket, or HOLD_S after it was given at the latest; frames keep their
        order. Under load a session's ``DISPATCHED`` and its result ~a millisecond later then cost
        the process one socket write, not two."""
        if self.closed:
            return False
        if self._held is None:
            self._held = [text]
            _holding(self._proto.loop if self._proto is not None else asyncio.get_running_loop()).add(self)
        else:
            self._held.append(text)
        return True

    def _release(self) -> None:
        held, self._held = self._held, None
        for text in held or ():
            self._send(text)

    def send(self, text: str) -> bool:
        if self._held is not None:
            self._release()
        return self._send(text)

    def _send(self, text: str) -> bool:
        if self.closed:
            return False
        if self._send_in_place(text):
            return True
        if self._queue is None:
            self._queue = asyncio.Queue(self.max_backlog)
            self._task = asyncio.create_task(self._write(self._queue), name=f"writer:{self.name}")
        try:
            self._queue.put_nowait(text)
            return True
        except asyncio.QueueFull:
            log.warning("peer too slow, closing", link=self.name)
            self.overflowed = True
            self.closed = True
            if self._task is not None:
                self._task.cancel()
            return False

    def watch(self, on: bool) -> None:
        """Ping the peer at the fast rate while something waits on it (see ``FrameWriterProtocol``)."""
        if self._proto is not None:
            self._proto.watch(on)

    def probe(self) -> None:
        """Ping the peer now: if it stopped answering, the socket closes within the ping timeout."""
        if self._proto is not None:
            self._proto.probe()

    def _send_in_place(self, text: str) -> bool:
        p = self._proto
        if (p is None or self._writing or (self._queue is not None and not self._queue.empty()) or not p.writable.is_set()
                or p.close_sent or not p.handshake_complete or p.transport.is_closing()):
            return False
        conn = p.conn
        try:
            if conn.state is OPEN and not conn.extensions and not conn.writes and conn.side is SERVER:
                frames = [text_frame(text)]
            else:
                conn.send_text(text.encode())
                frames = conn.data_to_send()
        except Exception:  # the peer is closing (InvalidState): the queue's writer finds out and stops
            return False
        if not self._out:
            p.loop.call_soon(self._flush)  # (the protocol's loop: asyncio.get_running_loop() is a getpid call)
        self._out.extend(frames)
        self.frames += 1
        return True

    def _flush(self) -> None:
        out, self._out = self._out, []
        if out and self._proto is not None and not self._proto.transport.is_closing():
            self._proto.transport.write(b"".join(out))
            self.writes += 1

    async def _write(self, queue: asyncio.Queue[str | None]) -> None:
        try:
            while True:
                text = await queue.get()
                if text is None:
                    self._flush()
                    return
                self._writing = True
                self._flush()  # frames sent in place before this one leave first
                await self.ws.send_text(text)
                self._writing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the socket went away: the reader side will notice and clean up
            log.debug("writer stopped", link=self.name, error=str(exc))
        finally:
            self.closed = True

    async def close(self, code: int = 1000, timeout: float = 5.0) -> None:
        """Send what is queued (unless the peer overflowed it), then close the socket. The writer
        task is always gone when this returns."""
        if self._held is not None:
            self._release()
        task, queue = self._task, self._queue
        if task is not None and queue is not None and not self.overflowed:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.closed = True
        self._flush()  # frames sent in place go before the close frame
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code)
