"""The auto-pipeline (store/pipeline.py) against the real server: the calls of one loop turn share a
write, each gets its own reply in order, an error reply stays with its call, and a broken connection
fails every call it owes with a retryable connection error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from dragoman.store.pipeline import AutoPipeline


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(redis_url)
    yield c
    await c.aclose()


@pytest.fixture
async def pipe(client: aioredis.Redis) -> AsyncIterator[AutoPipeline]:
    p = AutoPipeline(client.connection_pool)
    yield p
    await p.aclose()


async def test_one_turn_of_calls_is_one_write_with_each_reply_in_order(pipe: AutoPipeline) -> None:
    replies = await asyncio.gather(*(pipe.execute("INCRBY", "counter", i) for i in range(1, 51)))
    assert replies == [sum(range(1, i + 1)) for i in range(1, 51)]  # written and answered in call order
    assert (pipe.writes, pipe.commands) == (1, 50)


async def test_a_callback_gets_its_reply_and_one_that_raises_breaks_neither_the_line_nor_the_others(
        pipe: AutoPipeline) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, ctx: reported.append(ctx))
    got: list[object] = []

    def broken(reply: object) -> None:
        raise RuntimeError("a caller's bug")

    pipe.execute_then(("SET", "k", "v"), broken)
    pipe.execute_then(("INCR", "k"), got.append)  # an error reply: handed to the callback, not raised
    after = pipe.execute("GET", "k")
    assert await asyncio.wait_for(after, 5) == b"v"
    assert len(got) == 1 and isinstance(got[0], ResponseError)
    assert [type(ctx["exception"]) for ctx in reported] == [RuntimeError]
    assert await pipe.execute("PING") == b"PONG" and pipe._line is not None and not pipe._line.broken


async def test_an_error_reply_raises_in_its_own_call_only(pipe: AutoPipeline) -> None:
    results = await asyncio.gather(pipe.execute("SET", "k", "v"), pipe.execute("INCR", "k"),
                                   pipe.execute("GET", "k"), return_exceptions=True)
    assert results[0] == b"OK"  # raw replies: no client-side conversion
    assert isinstance(results[1], ResponseError)
    assert results[2] == b"v"


async def test_a_killed_connection_fails_every_owed_call_retryably_and_the_next_call_reconnects(
        pipe: AutoPipeline, client: aioredis.Redis) -> None:
    assert await pipe.execute("PING") == b"PONG"
    blocked = asyncio.ensure_future(pipe.execute("BLPOP", "never", 0))  # owed a reply that never comes
    follower = asyncio.ensure_future(pipe.execute("PING"))  # queued behind it on the same connection
    await asyncio.sleep(0)  # let the writer send them (one loop turn)
    clients = await client.client_list()
    victim = next(c for c in clients if c["cmd"] == "blpop")
    await client.client_kill_filter(_id=victim["id"])
    for fut in (blocked, follower):
        with pytest.raises(RedisConnectionError):
            await asyncio.wait_for(fut, 5)
    assert await pipe.execute("PING") == b"PONG"  # a new connection


async def test_replicas_required_without_replicas_fail_retryably(client: aioredis.Redis) -> None:
    pipe = AutoPipeline(client.connection_pool, replicas=1, replica_wait_ms=50)
    try:
        with pytest.raises(RedisConnectionError, match="0 of 1 replicas"):
            await pipe.execute("SET", "x", "1")
        assert (pipe.writes, pipe.commands) == (1, 2)  # the SET and its WAIT, in one write
    finally:
        await pipe.aclose()


async def test_the_connection_is_renewed_after_recheck_s(client: aioredis.Redis) -> None:
    pipe = AutoPipeline(client.connection_pool, recheck_s=0.0)
    try:
        first = await pipe.execute("CLIENT", "ID")
        second = await pipe.execute("CLIENT", "ID")
        assert first != second  # a fresh connection from the pool (the old one handed back)
    finally:
        await pipe.aclose()


async def test_a_reply_that_never_comes_breaks_the_connection_after_its_socket_timeout(redis_url: str) -> None:
    c = aioredis.Redis.from_url(redis_url, socket_timeout=0.3)
    pipe = AutoPipeline(c.connection_pool)
    try:
        blocked = asyncio.ensure_future(pipe.execute("BLPOP", "never", 0))  # no reply, ever
        follower = asyncio.ensure_future(pipe.execute("PING"))
        for fut in (blocked, follower):  # the watchdog (no per-read timeout any more) breaks the line
            with pytest.raises(RedisConnectionError, match="no reply from Redis in 0.3 s"):
                await asyncio.wait_for(fut, 5)
        assert await pipe.execute("PING") == b"PONG"  # a new connection
        slow = await pipe.execute("BLPOP", "never", 0.2)  # slower than a watchdog tick, within the timeout
        assert slow is None
    finally:
        await pipe.aclose()
        await c.aclose()
