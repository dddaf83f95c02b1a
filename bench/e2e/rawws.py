"""A lean WebSocket client for the load generators, so that they never weigh on the machine more
than they must (they share its two cores with the scheduler they measure).

The opening handshake is websockets' own (its sans-I/O ``ClientProtocol``). After it, frames are
read and written in place by an asyncio ``Protocol``: a text frame that arrives goes straight to
``on_text`` in the socket's callback (no task woken, no per-frame objects), a frame sent is masked
and written at once. A ping is answered with its pong, a close frame is echoed; fragmented
messages are put together. RFC 6455 without extensions (compression is never offered).

``recv()`` (for the few frames of a setup: an ack) works until ``handle(on_text)`` is called.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import Callable
from urllib.parse import urlsplit

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode, apply_mask
from websockets.protocol import OPEN
from websockets.uri import parse_uri

_H16 = struct.Struct("!BBH")
_H64 = struct.Struct("!BBQ")
_randbytes = random.Random().randbytes  # (the mask only keeps proxies from reading frames as HTTP)


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One masked frame from a client (RFC 6455 5.2)."""
    mask = _randbytes(4)
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    if n < 126:
        head = bytes((b0, 0x80 | n))
    elif n < 65536:
        head = _H16.pack(b0, 0x80 | 126, n)
    else:
        head = _H64.pack(b0, 0x80 | 127, n)
    return head + mask + apply_mask(payload, mask)


class RawWebSocket(asyncio.Protocol):
    def __init__(self, url: str, max_size: int) -> None:
        self.hs = ClientProtocol(parse_uri(url), max_size=max_size)
        self.max_size = max_size
        self.open = False
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_text: Callable[[str], None] | None = None
        self._inbox: asyncio.Queue[str | None] = asyncio.Queue()
        self._buf = bytearray()
        self._parts: list[bytes] = []
        self.transport: asyncio.Transport | None = None
        self.close_code: int | None = None  # the peer's, once it sent its close frame
        self.pings = 0  # answered (each with its pong)

    @classmethod
    async def connect(cls, url: str, *, max_size: int = 16 * 1024 * 1024, timeout: float = 30) -> RawWebSocket:
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        _, proto = await asyncio.wait_for(loop.create_connection(
            lambda: cls(url, max_size), parts.hostname, parts.port or 80), timeout)
        await asyncio.wait_for(asyncio.shield(proto.opened), timeout)
        return proto

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.hs.send_request(self.hs.connect())
        transport.write(b"".join(self.hs.data_to_send()))  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.open:
            self._buf += data
            self._frames()
            return
        self.hs.receive_data(data)
        for event in self.hs.events_received():
            if isinstance(event, Frame):  # (sent right behind the response)
                self._frame(event.opcode.value, event.fin, event.data)
        if self.hs.handshake_exc is not None:
            self._fail(self.hs.handshake_exc)
        elif self.hs.state is OPEN and not self.open:
            self.open = True
            self._buf += bytes(self.hs.reader.buffer)  # (a frame's start read with the response)
            self.hs.reader.buffer.clear()
            if not self.opened.done():
                self.opened.set_result(None)
            self._frames()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ConnectionError("connection closed"))

    # ------------------------------------------------------------------ frames
    def _frames(self) -> None:
        buf = self._buf
        at, end = 0, len(buf)
        while end - at >= 2:
            b0, b1 = buf[at], buf[at + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if end - at < 4:
                    break
                n, head = int.from_bytes(buf[at + 2:at + 4], "big"), 4
            elif n == 127:
                if end - at < 10:
                    break
                n, head = int.from_bytes(buf[at + 2:at + 10], "big"), 10
            if b1 & 0x80 or n > self.max_size:
                self._fail(ConnectionError("a masked or oversized frame from the server"))
                return
            if end - at < head + n:
                break
            payload = bytes(buf[at + head:at + head + n])
            at += head + n
            self._frame(b0 & 0x0F, bool(b0 & 0x80), payload)
        del buf[:at]

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (Opcode.TEXT.value, Opcode.CONT.value):
            self._parts.append(payload)
            if not fin:
                return
            data = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
            self._parts = []
            text = data.decode()
            if self.on_text is not None:
                self.on_text(text)
            else:
                self._inbox.put_nowait(text)
        elif opcode == Opcode.PING.value:
            self.pings += 1
            self._write(client_frame(Opcode.PONG.value, payload))
        elif opcode == Opcode.CLOSE.value:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._write(client_frame(Opcode.CLOSE.value, payload[:2]))
            if self.transport is not None:
                self.transport.close()
        # (a pong, or a binary frame: nothing the generators use)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _fail(self, exc: BaseException) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if not self.closed.done():
            self.closed.set_result(None)
        self._inbox.put_nowait(None)
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ the API
    def send(self, text: str) -> None:
        """Write one text frame now (or drop it: the socket is closing; ``closed`` says so)."""
        self._write(client_frame(Opcode.TEXT.value, text.encode()))

    def handle(self, on_text: Callable[[str], None]) -> None:
        """From now on every text frame goes to ``on_text`` as it arrives (those ``recv`` left first)."""
        while not self._inbox.empty():
            text = self._inbox.get_nowait()
            if text is None:
                self._inbox.put_nowait(None)
                break
            on_text(text)
        self.on_text = on_text

    async def recv(self) -> str:
        text = await self._inbox.get()
        if text is None:
            self._inbox.put_nowait(None)
            raise ConnectionError("connection closed")
        return text

    async def close(self, code: int = 1000) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._write(client_frame(Opcode.CLOSE.value, code.to_bytes(2, "big")))
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), 2)
            except TimeoutError:
                self.transport.close()
