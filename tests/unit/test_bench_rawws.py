"""The load generators' lean WebSocket client (``bench.e2e.rawws``) against a real ``websockets``
server: text both ways, fragments put together, pings answered, the close handshake."""

from __future__ import annotations

import asyncio

from websockets.asyncio.server import serve

from bench.e2e.rawws import RawWebSocket


async def test_text_fragments_pings_and_close() -> None:
    server_got: asyncio.Queue[str] = asyncio.Queue()
    pong_waited: asyncio.Queue[float] = asyncio.Queue()
    closed_with: asyncio.Queue[int | None] = asyncio.Queue()

    async def handler(ws) -> None:  # type: ignore[no-untyped-def]
        await ws.send("hello")
        server_got.put_nowait(await ws.recv())
        await ws.send(["frag-", "ment", "ed ünïcode"])  # one message in three frames
        await ws.send("x" * 70_000)  # a 64-bit length
        pong_waited.put_nowait(await asyncio.wait_for(await ws.ping(b"abcd"), 5))
        server_got.put_nowait(await ws.recv())
        await ws.wait_closed()
        closed_with.put_nowait(ws.close_code)

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await RawWebSocket.connect(f"ws://127.0.0.1:{port}/")
        assert await ws.recv() == "hello"
        ws.send("x" * 300)  # a 16-bit length, masked
        assert await asyncio.wait_for(server_got.get(), 5) == "x" * 300
        got: list[str] = []
        ws.handle(got.append)
        ws.send("after")
        assert await asyncio.wait_for(server_got.get(), 5) == "after"
        assert await asyncio.wait_for(pong_waited.get(), 5) >= 0  # the ping was answered
        assert got == ["frag-mented ünïcode", "x" * 70_000]
        await ws.close(1000)
        assert await asyncio.wait_for(closed_with.get(), 5) == 1000
        assert ws.closed.done()

