"""Frames as a client may send them reach the app whole and in order: the scheduler reads the
common ones (whole, unfragmented, masked text frames under 64 KiB) itself and leaves every other
one to websockets' parser (``FrameWriterProtocol.data_received``); both kinds mixed in one TCP
write, a frame split over writes, a 64-bit length, a fragmented message, and invalid UTF-8."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.e2e.rawws import RawWebSocket, client_frame
from tests.e2e.test_node_plane import ws
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e

TEXT, CONT, PONG = 0x1, 0x0, 0xA


def beat(pad: int = 0) -> bytes:
    return json.dumps({"type": "client_heartbeat", "timestamp": 1, "pad": "x" * pad}).encode()


async def open_session(base: str) -> tuple[RawWebSocket, asyncio.Queue[str]]:
    sock = await RawWebSocket.connect(ws(base) + "/ws/session")
    sock.send(json.dumps({"type": "session_init", "src_lang": "zh", "tgt_lang": "en"}))
    assert json.loads(await asyncio.wait_for(sock.recv(), 10))["type"] == "session_init_ack"
    replies: asyncio.Queue[str] = asyncio.Queue()
    sock.handle(lambda text: replies.put_nowait(json.loads(text)["type"]))
    return sock, replies


async def answered(replies: asyncio.Queue[str], n: int) -> None:
    for _ in range(n):
        assert await asyncio.wait_for(replies.get(), 10) == "server_heartbeat"


async def test_every_kind_of_text_frame_reaches_the_session(scheduler) -> None:
    sock, replies = await open_session(scheduler())
    w = sock.transport.write  # type: ignore[union-attr]
    w(client_frame(TEXT, beat()) + client_frame(TEXT, beat(300)))  # two in one write (the second: 16-bit length)
    await answered(replies, 2)
    split = client_frame(TEXT, beat(1000))
    w(split[:3])  # (a header cut short: the parser holds it, and takes the rest)
    w(split[3:] + client_frame(TEXT, beat()))
    await answered(replies, 2)
    w(client_frame(TEXT, beat(70_000)) + client_frame(TEXT, beat()))  # a 64-bit length, then a common one
    await answered(replies, 2)
    whole = beat(10)
    w(client_frame(TEXT, whole[:7], fin=False) + client_frame(CONT, whole[7:]) + client_frame(TEXT, beat()))
    await answered(replies, 2)
    w(client_frame(TEXT, b'{"type": "client_heartbeat", "pad": "\xff"}'))  # not UTF-8: the socket closes
    await asyncio.wait_for(asyncio.shield(sock.closed), 10)
    assert sock.close_code == 1007
    assert replies.empty()


async def test_pongs_keep_a_pinged_socket_open(scheduler) -> None:
    """The scheduler's keepalive pings (every 0.2 s here) are each answered within 0.4 s, or it
    closes the socket (1011): the pongs reach it; an unsolicited one, in the same write as a
    frame, changes nothing."""
    sock, replies = await open_session(scheduler(DRAGOMAN_WS_PING_INTERVAL_MS="200", DRAGOMAN_WS_PING_TIMEOUT_MS="400",
                                                 DRAGOMAN_WS_IDLE_PING_INTERVAL_MS="200"))

    async def pinged() -> bool:
        return sock.pings >= 6

    await wait_for(pinged, timeout=20)
    sock.transport.write(client_frame(PONG, b"none") + client_frame(TEXT, beat()))  # type: ignore[union-attr]
    await answered(replies, 1)
    assert not sock.closed.done()
