"""Pings at two rates on the scheduler's server (uvicorn, its sans-I/O WebSocket protocol): a socket
nothing waits on is pinged at the idle interval; watching it (a node given a job) brings its next
ping within the fast interval, so a peer that stopped answering is disconnected within interval +
timeout; unwatched again, it goes back to the idle interval."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import connect

from dragoman.app.sockets import FrameWriterProtocol, Link
from tests.helpers import uvicorn_serving, wait_for

FAST_S, TIMEOUT_S, IDLE_S = 0.3, 0.3, 60.0
gone: dict[str, float] = {}  # route -> seconds from being watched to the server seeing the peer gone


async def next_ping_in(ws: WebSocket) -> float:
    proto = ws.scope["extensions"]["dragoman.frames"]

    async def scheduled() -> bool:  # (a ping in flight has no next ping until its pong)
        return proto.ping_timer is not None

    await wait_for(scheduled, timeout=5)
    return float(proto.ping_timer.when() - proto.loop.time())


async def watched(ws: WebSocket) -> None:
    await ws.accept()
    link = Link(ws, "watched")
    link.send(json.dumps({"idle": await next_ping_in(ws)}))
    assert await ws.receive_text() == "watch"
    link.watch(True)
    link.send(json.dumps({"watched": await next_ping_in(ws)}))
    assert await ws.receive_text() == "unwatch"
    link.watch(False)
    proto = ws.scope["extensions"]["dragoman.frames"]

    async def back_to_idle() -> bool:  # the fast ping already scheduled goes out; its pong schedules an idle one
        return proto.ping_timer is not None and proto.ping_timer.when() - proto.loop.time() > FAST_S * 2

    await wait_for(back_to_idle, timeout=5)
    link.send(json.dumps({"unwatched": await next_ping_in(ws)}))
    assert await ws.receive_text() == "watch"
    link.watch(True)
    started = asyncio.get_running_loop().time()
    link.send(json.dumps({"watched": await next_ping_in(ws)}))
    try:
        while True:  # the client stops reading: no pong comes back
            await ws.receive_text()
    except WebSocketDisconnect:
        gone["watched"] = asyncio.get_running_loop().time() - started
    await link.close()


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = Starlette(routes=[WebSocketRoute("/watched", watched)])
    async with uvicorn_serving(app, ws=FrameWriterProtocol.with_idle_pings(IDLE_S), ws_ping_interval=FAST_S,
                               ws_ping_timeout=TIMEOUT_S) as url:
        yield url


async def test_a_watched_socket_is_pinged_fast_and_an_idle_one_seldom(server: str) -> None:
    async with connect(server + "/watched", ping_interval=None) as ws:
        async def recv() -> dict[str, float]:
            return dict(json.loads(await asyncio.wait_for(ws.recv(), 5)))

        assert (await recv())["idle"] > IDLE_S - 1
        await ws.send("watch")
        assert (await recv())["watched"] <= FAST_S
        await ws.send("unwatch")
        assert (await recv())["unwatched"] > IDLE_S - 1
        await ws.send("watch")
        assert (await recv())["watched"] <= FAST_S
        ws.transport.pause_reading()  # hung: the pings are never read, so never answered

        async def disconnected() -> bool:
            return "watched" in gone

        await wait_for(disconnected, timeout=10)
    assert gone["watched"] <= FAST_S + TIMEOUT_S + 1.0


CHATTY_IDLE_S = 0.3
protos: list[FrameWriterProtocol] = []


class CountingPings(FrameWriterProtocol):
    idle_ping_interval = CHATTY_IDLE_S
    pings = 0

    def send_keepalive_ping(self) -> None:
        self.pings += 1
        super().send_keepalive_ping()


async def listener(ws: WebSocket) -> None:
    await ws.accept()
    protos.append(ws.scope["extensions"]["dragoman.frames"])
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            await ws.receive_text()


async def test_an_idle_socket_that_speaks_is_not_pinged_and_one_that_falls_silent_is() -> None:
    """Messages more often than the idle interval: no pings (the messages show the peer lives).
    Silent: a ping within two idle intervals of its last message."""
    protos.clear()
    app = Starlette(routes=[WebSocketRoute("/listen", listener)])
    async with uvicorn_serving(app, ws=CountingPings, ws_ping_interval=0.05, ws_ping_timeout=5.0) as url:
        async with connect(url + "/listen", ping_interval=None) as ws:
            await ws.send("hello")

            async def accepted() -> bool:
                return bool(protos)

            await wait_for(accepted, timeout=5)
            proto = protos[0]
            loop = asyncio.get_running_loop()
            until = loop.time() + 4 * CHATTY_IDLE_S
            while loop.time() < until:  # a heartbeat every third of the idle interval
                await ws.send("heartbeat")
                await asyncio.sleep(CHATTY_IDLE_S / 3)
            assert proto.pings == 0  # type: ignore[attr-defined]
            fell_silent = loop.time()

            async def pinged() -> bool:
                return proto.pings > 0  # type: ignore[attr-defined]

            await wait_for(pinged, timeout=5)
            assert loop.time() - fell_silent <= 2 * CHATTY_IDLE_S + 0.5
