"""Link's writes on the server the scheduler runs (uvicorn, its sans-I/O WebSocket protocol): frames
sent in one turn of the loop leave in one write, in order; while the socket takes no writes (a peer
that does not read), frames wait in the queue and still arrive in order, none lost."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from dragoman.app.sockets import FrameWriterProtocol, Link
from tests.helpers import uvicorn_serving

FRAMES = 5


async def one_turn(ws: WebSocket) -> None:
    await ws.accept()
    link = Link(ws, "test")
    for i in range(FRAMES):  # no await between them: one turn of the loop
        link.send(json.dumps({"i": i}))
    await asyncio.sleep(0)  # the turn ends: its flush, scheduled first, runs before this resumes
    link.send(json.dumps({"frames": link.frames, "writes": link.writes, "writer_task": link._task is not None}))
    await ws.receive_text()  # the client says it has everything
    await link.close()


async def backed_up(ws: WebSocket) -> None:
    """The socket stops taking writes midway (what the transport signals when its buffer passes the
    high-water mark: uvicorn's pause_writing), then takes them again."""
    await ws.accept()
    link = Link(ws, "backed-up")
    transport_signals = ws.scope["extensions"]["dragoman.frames"]
    for i in range(30):
        if i == 10:
            transport_signals.pause_writing()
        if i == 20:
            transport_signals.resume_writing()
        link.send(json.dumps({"i": i}))
    link.send(json.dumps({"in_place": link.frames, "writer_task": link._task is not None}))
    await ws.receive_text()
    await link.close()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = Starlette(routes=[WebSocketRoute("/turn", one_turn), WebSocketRoute("/backed-up", backed_up)])
    async with uvicorn_serving(app, ws=FrameWriterProtocol) as url:
        yield url


async def test_frames_of_one_turn_leave_in_one_write_in_order(server: str) -> None:
    async with connect(server + "/turn") as ws:
        got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(FRAMES + 1)]
        await ws.send("done")
    assert [m["i"] for m in got[:FRAMES]] == list(range(FRAMES))
    assert got[-1]["frames"] == FRAMES and got[-1]["writes"] == 1
    assert not got[-1]["writer_task"]  # nothing had to wait: no queue, no writer task (memory per socket)


async def test_frames_wait_in_the_queue_while_the_socket_takes_no_writes_and_keep_their_order(
        server: str) -> None:
    async with connect(server + "/backed-up") as ws:
        got = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(31)]
        await ws.send("done")
    assert [m["i"] for m in got[:30]] == list(range(30))
    assert got[-1]["in_place"] == 10  # the first ten; the rest queued (and stay queued behind each other)
    assert got[-1]["writer_task"]  # made when the first frame had to wait
