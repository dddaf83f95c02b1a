"""Test helpers shared by the tiers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any


async def snapshot(client: Any) -> dict[str, Any]:
    """Every key and its value, to assert that a rejected call changed nothing."""
    out: dict[str, Any] = {}
    async for key in client.scan_iter(count=1000):
        kind = (await client.type(key)).decode()
        if kind == "string":
            out[key] = await client.get(key)
        elif kind == "hash":
            out[key] = await client.hgetall(key)
        elif kind == "set":
            out[key] = await client.smembers(key)
        elif kind == "zset":
            out[key] = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            out[key] = await client.lrange(key, 0, -1)
        elif kind == "stream":
            out[key] = await client.xrange(key)
    return out


def dispatch_argv(proc: str, changes: dict[int, Any] | None = None) -> list[Any]:
    """dispatch_task's arguments for job c0.x of session s1 in pool zh>en (see the script's header),
    with those at the given 1-based positions changed."""
    args: list[Any] = [proc, "c0.x", "zh>en", "s1", 0, "en", 1000, 1000, 4, 3, "", "p1", 1, "{}", "", "", 0]
    for index, value in (changes or {}).items():
        args[index - 1] = value
    return args


async def raw_dispatch(store: Any, changes: dict[int, Any]) -> Any:
    """dispatch_task called straight, past the Store's own checks, with ``dispatch_argv(changes)``."""
    args, ck = dispatch_argv(store.proc, changes), store.cells["c0"]
    keys = [ck.nodes, ck.job(args[1]), ck.pool(args[2]), ck.sess(args[3])]
    return await store.scripts.call("dispatch_task", keys, args)


async def wait_for(predicate: Callable[[], Awaitable[Any]], timeout: float = 10.0, interval: float = 0.02) -> Any:
    """Poll an async predicate until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def uvicorn_serving(app: Any, **config: Any) -> AsyncIterator[str]:
    """``app`` served by uvicorn in this event loop on a free port; yields its ``ws://`` base URL."""
    import uvicorn

    from dragoman.embedded import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="off", **config))
    task = asyncio.create_task(server.serve())

    async def started() -> bool:
        return bool(server.started)

    try:
        await wait_for(started, timeout=10)
        yield f"ws://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def serving_endpoints(**endpoints: Any) -> AsyncIterator[str]:
    """WebSocket endpoints (``path=endpoint``, each at ``/path``) served by uvicorn on the scheduler's
    WebSocket protocol (``FrameWriterProtocol``, no compression); yields the ``ws://`` base URL."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute

    from dragoman.app.sockets import FrameWriterProtocol

    app = Starlette(routes=[WebSocketRoute(f"/{path}", endpoint) for path, endpoint in endpoints.items()])
    async with uvicorn_serving(app, ws=FrameWriterProtocol, ws_per_message_deflate=False) as url:
        yield url
