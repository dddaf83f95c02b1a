"""Client frames cut by ``FrameWriterProtocol.data_received`` on the scheduler's server: whole
text frames go to the app directly, every other frame to websockets whole. Whatever way the bytes
are split across reads, the app gets every message once, in order; pings are answered; a fragmented
message is joined; a frame over the size limit closes the connection with 1009, as websockets does."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import struct
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from dragoman.app.sockets import FrameWriterProtocol
from tests.helpers import uvicorn_serving

MAX_SIZE = 100_000


async def record(ws: WebSocket) -> None:
    """Every message until the text "end", then what arrived, as [kind, length, head]."""
    await ws.accept()
    got = []
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            if message["text"] == "end":
                break
            got.append(["text", len(message["text"]), message["text"][:16]])
        else:
            got.append(["bytes", len(message["bytes"]), message["bytes"][:16].hex()])
    await ws.send_text(json.dumps(got))
    await ws.receive()  # the client closes


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = Starlette(routes=[WebSocketRoute("/record", record)])
    async with uvicorn_serving(app, ws=FrameWriterProtocol, ws_per_message_deflate=False,
                               ws_max_size=MAX_SIZE) as url:
        yield url.removeprefix("ws://")


def frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame (masked, as RFC 6455 requires of clients)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack("!H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack("!Q", n)
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def handshake(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = address.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /record HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert response.startswith(b"HTTP/1.1 101")
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """A server frame (unmasked): opcode and payload."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", await reader.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack("!Q", await reader.readexactly(8))[0]
    return b0 & 0x0F, await reader.readexactly(n)


TEXTS = ["hello", "é" * 200, "x" * 70_000, "日本語" * 30]


def stream() -> tuple[bytes, list[list[object]]]:
    """Text of three header lengths, a ping, binary, a fragmented text, then "end"."""
    out = b"".join(frame(0x1, t.encode()) for t in TEXTS[:2])
    out += frame(0x9, b"are you there")
    out += frame(0x2, b"\x00\x01binary")
    out += frame(0x1, TEXTS[2].encode())
    out += frame(0x1, b"frag", fin=False) + frame(0x0, b"men", fin=False) + frame(0x0, b"ted")
    out += frame(0x1, TEXTS[3].encode()) + frame(0x1, b"end")
    expected = [["text", len(t), t[:16]] for t in TEXTS[:2]] + [["bytes", 8, b"\x00\x01binary".hex()]]
    expected += [["text", len(TEXTS[2]), TEXTS[2][:16]], ["text", 10, "fragmented"],
                 ["text", len(TEXTS[3]), TEXTS[3][:16]]]
    return out, expected


@pytest.mark.parametrize("cut", ["whole", "every byte of the start", "random pieces"])
async def test_every_message_arrives_once_in_order_however_the_bytes_are_split(server: str, cut: str) -> None:
    data, expected = stream()
    rng = random.Random(cut)
    if cut == "whole":
        pieces = [data]
    elif cut == "every byte of the start":
        pieces = [data[i:i + 1] for i in range(200)] + [data[200:]]
    else:
        pieces, pos = [], 0
        while pos < len(data):
            step = rng.choice([1, 2, 3, 7, 64, 1000, 30_000])
            pieces.append(data[pos:pos + step])
            pos += step
    reader, writer = await handshake(server)
    for piece in pieces:
        writer.write(piece)
        await writer.drain()
        if len(pieces) > 1:
            await asyncio.sleep(0)  # (separate writes: the server mostly reads them apart)
    opcode, payload = await read_frame(reader)
    assert (opcode, payload) == (0xA, b"are you there")  # the ping's pong comes first
    opcode, payload = await read_frame(reader)
    assert opcode == 0x1 and json.loads(payload) == expected
    writer.write(frame(0x8, struct.pack("!H", 1000)))
    writer.close()


async def test_a_frame_over_the_size_limit_closes_the_connection_with_1009(server: str) -> None:
    reader, writer = await handshake(server)
    writer.write(frame(0x1, b"fine"))
    writer.write(frame(0x1, b"y" * (MAX_SIZE + 1)))
    await writer.drain()
    opcode, payload = await read_frame(reader)
    assert opcode == 0x8 and struct.unpack("!H", payload[:2])[0] == 1009
    writer.close()
