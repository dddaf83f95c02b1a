"""What a socket holds of what its peer sent before the app takes it, on the scheduler's server
(uvicorn, its sans-I/O WebSocket protocol): reading stops once a few messages, or a few hundred
kB of them, wait; it starts again once the app has taken about half; nothing is lost or reordered."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator

import pytest
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from dragoman.app.sockets import INBOUND_HIGH_WATER, INBOUND_HIGH_WATER_SIZE
from tests.helpers import serving_endpoints, wait_for

LARGE = 100 * 1024  # characters per frame: three of them pass INBOUND_HIGH_WATER_SIZE
LARGE_FRAMES = 6  # fewer than INBOUND_HIGH_WATER: only the size can stop reading
SMALL_FRAMES = 3 * INBOUND_HIGH_WATER


async def held_until_reading_stops(ws: WebSocket) -> None:
    """Takes nothing until the protocol has stopped reading the socket; says what it held then,
    then takes every frame and says what arrived and whether reading started again."""
    await ws.accept()
    count = int(await ws.receive_text())
    proto = ws.scope["extensions"]["dragoman.frames"]

    async def reading_stopped() -> bool:
        return not proto.transport.is_reading()

    await wait_for(reading_stopped, timeout=10)
    held = {"messages": len(proto.queue), "size": proto.queue.size}
    frames = [await ws.receive_text() for _ in range(count)]
    await ws.send_text(json.dumps({
        "held": held, "reading": proto.transport.is_reading(), "left": proto.queue.size,
        "order": [f.split(":", 1)[0] for f in frames], "lengths": sorted({len(f) for f in frames}),
    }))
    await ws.receive_text()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async with serving_endpoints(held=held_until_reading_stops) as url:
        yield url


async def exchange(url: str, frames: list[str]) -> dict:
    async with connect(url + "/held", max_size=None, compression=None) as ws:
        await ws.send(str(len(frames)))

        async def send_all() -> None:  # (sends wait while the server does not read: in a task)
            for frame in frames:
                await ws.send(frame)

        sender = asyncio.create_task(send_all())
        report = json.loads(await asyncio.wait_for(ws.recv(), 20))
        await asyncio.wait_for(sender, 5)
        await ws.send("done")
    return report


def padded(i: int, length: int) -> str:
    head = f"{i}:"
    return head + os.urandom(length).hex()[: length - len(head)]


async def test_a_few_large_frames_stop_reading_before_the_message_count_would(server: str) -> None:
    report = await exchange(server, [padded(i, LARGE) for i in range(LARGE_FRAMES)])
    held = report["held"]
    assert held["messages"] < INBOUND_HIGH_WATER  # so the size stopped it
    # (one read of the socket, up to 256 kB, may complete more than one frame at once)
    assert INBOUND_HIGH_WATER_SIZE <= held["size"] < INBOUND_HIGH_WATER_SIZE + 256 * 1024 + LARGE
    assert report["order"] == [str(i) for i in range(LARGE_FRAMES)] and report["lengths"] == [LARGE]
    assert report["reading"] and report["left"] == 0  # all taken: reading again, nothing counted


async def test_many_small_frames_stop_reading_at_the_message_count(server: str) -> None:
    report = await exchange(server, [padded(i, 16) for i in range(SMALL_FRAMES)])
    assert report["held"]["messages"] >= INBOUND_HIGH_WATER
    assert report["order"] == [str(i) for i in range(SMALL_FRAMES)]
    assert report["reading"] and report["left"] == 0
