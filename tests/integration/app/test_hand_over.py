"""A socket's messages handed over in place (``_Inbound.direct``, what ``session_ws`` uses for a
session's frames) on the scheduler's server: only while the reader waits with nothing queued, so
whatever the handler refuses goes to the reader and the two together see every frame once, in
the order sent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from tests.helpers import serving_endpoints

FRAMES = 200


async def mixed(ws: WebSocket) -> None:
    """Frames starting with "d" are taken in place when allowed; every other frame, and any frame
    that arrives while the reader has one to take first, is read by the endpoint."""
    await ws.accept()
    proto = ws.scope["extensions"]["dragoman.frames"]
    seen: list[str] = []
    in_place = 0

    def direct(message: Any) -> bool:
        nonlocal in_place
        text = message.get("text")
        if text is None or not text.startswith("d"):
            return False
        seen.append(text)
        in_place += 1
        return True

    proto.queue.direct = direct
    while True:
        text = await ws.receive_text()
        if text == "end":
            break
        seen.append(text)
        if len(seen) % 7 == 0:
            await asyncio.sleep(0)  # the reader is busy now and then: frames queue behind it
    await ws.send_text(json.dumps({"seen": seen, "in_place": in_place}))
    await ws.receive_text()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    async with serving_endpoints(mixed=mixed) as url:
        yield url


async def test_frames_handed_over_in_place_and_read_keep_their_order(server: str) -> None:
    sent = [f"{'d' if i % 3 else 'r'}{i}" for i in range(FRAMES)]
    async with connect(server + "/mixed", compression=None) as ws:
        for i, frame in enumerate(sent):
            await ws.send(frame)
            if i % 10 == 0:
                await asyncio.sleep(0.002)  # now and then the reader catches up and waits
        await ws.send("end")
        report = json.loads(await asyncio.wait_for(ws.recv(), 10))
        await ws.send("done")
    assert report["seen"] == sent  # each once, in order
    assert 0 < report["in_place"] < FRAMES * 2 // 3  # some in place; others queued behind the reader
