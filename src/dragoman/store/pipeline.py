"""Auto-pipelining: the script calls a process makes in one turn of its event loop go to Redis in one
write, on one connection, and one reader task takes their replies back in order (what ioredis and
redis-rs multiplexed connections do).

Why: a script call through a pooled client costs a pool checkout, a socket write and a read wake-up
of its own; under load most of a scheduler's CPU went to that, and Redis spent as much again on one
read and one write per call. Here a busy turn's calls share one write and Redis reads them in one go.

Rules:
- Replies come back in the order the commands were written (Redis guarantees it per connection);
  each waiting call gets its own, an error reply raises in that call only.
- Anything that breaks the connection (closed, timed out, the primary demoted under a Sentinel
  pool) fails every call still owed a reply with a connection error; the caller's retry (Store.retrying)
  makes it again on a new connection (every script is retry-safe, I8).
- With ``replicas`` > 0 each write ends with ``WAIT replicas timeout``: its calls return only once
  that many replicas have the writes, or fail with ``ReplicasBehind`` (retried like a lost
  connection). One WAIT covers a whole batch.
- A reply that does not come within the connection's ``socket_timeout`` breaks the connection (as
  a read timeout would). One watchdog timer per connection checks it, instead of a timeout around
  every read: under load that per-read timer was a measurable share of the scheduler's CPU.
- Every ``recheck_s`` the connection is handed back to its pool and a new one taken, so a pool that
  follows a Sentinel primary (``store/connect.py``) gets to move it; the old connection's reader
  first takes the replies it is still owed.

Not for a Redis Cluster (a cluster client routes per key; it keeps one call per round trip), nor for
blocking commands (XREAD BLOCK would hold up every call behind it).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:  # (what the hiredis reader returns for "no whole reply yet", as redis-py configures it)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
    from redis._parsers.hiredis import _AsyncHiredisParser
except ImportError:  # another redis-py layout: its own read path
    _NOT_ENOUGH_DATA = _AsyncHiredisParser = None
_PUSH = getattr(hiredis, "PushNotification", None)

Settle = Callable[[Any], None]  # gets the reply, or the exception to raise in the caller


def _pack(conn: Any, commands: list[tuple[Any, ...]]) -> bytes | list[bytes]:
    """The commands in the Redis protocol. hiredis packs str, bytes, int and float arguments in C
    (a dispatch's two dozen arguments: ~5 µs, where redis-py's per-argument encoding took ~28);
    anything else goes the redis-py way, which also names a bad argument."""
    try:
        return b"".join([hiredis.pack_command(args) for args in commands])
    except TypeError:
        return conn.pack_commands(commands)  # type: ignore[no-any-return]


class _DirectReader:
    """The replies of a connection read straight from its hiredis reader: what redis-py's
    ``read_response`` does (an error reply comes back as its exception,
    which the owed call raises), without a timeout context, a host name formatted and three
    coroutines per reply; a turn's replies come out of one socket read."""

    __slots__ = ("parser", "reader", "stream", "more")

    def __init__(self, parser: Any) -> None:
        self.parser = parser
        self.reader = parser._reader
        self.stream = parser._stream
        self.more = _NOT_ENOUGH_DATA

    async def next_reply(self) -> Any:
        reader = self.reader
        while True:
            reply = reader.gets()
            while reply is self.more:
                if not self.parser._connected or self.parser._reader is not reader:  # (closed, or connected anew)
                    raise RedisConnectionError("Connection closed by server.")
                data = await self.stream.read(65536)
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                reader.feed(data)
                reply = reader.gets()
            if _PUSH is None or not isinstance(reply, _PUSH):
                break
            # (RESP3: a push is nobody's reply; a pipeline connection subscribes to nothing)
        if isinstance(reply, RedisConnectionError) or (type(reply) is list and reply
                                                       and isinstance(reply[0], RedisConnectionError)):
            raise reply if isinstance(reply, RedisConnectionError) else reply[0]  # (as redis-py does)
        return reply


def _direct_reader(conn: Any) -> _DirectReader | None:
    """A direct reader for a connection parsed by hiredis; None: redis-py's own path."""
    parser = getattr(conn, "_parser", None)
    if (_NOT_ENOUGH_DATA is None or type(parser) is not _AsyncHiredisParser
            or not isinstance(getattr(parser, "_reader", None), hiredis.Reader)
            or getattr(parser, "_stream", None) is None):
        return None
    return _DirectReader(parser)


class ReplicasBehind(RedisConnectionError):
    """Fewer replicas than required acknowledged a transition (``redis_min_replicas_ack``)."""


def _settle_future(fut: asyncio.Future[Any]) -> Settle:
    def settle(reply: Any) -> None:
        if fut.done():  # the caller gave up (cancelled): nobody to tell
            return
        if isinstance(reply, BaseException):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)

    return settle


class _Line:
    """One connection of the pipeline and, in order, who is owed each reply still to come."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.owed: deque[Settle] = deque()
        self.has_owed = asyncio.Event()
        self.reader: asyncio.Task[None] | None = None
        self.retiring = False
        self.broken = False
        self.progress = 0.0  # loop time of the last reply read, or of the write that found nothing owed
        self.watchdog: asyncio.TimerHandle | None = None


class AutoPipeline:
    def __init__(self, pool: Any, *, replicas: int = 0, replica_wait_ms: int = 1000,
                 recheck_s: float | None = 1.0) -> None:
        self.pool = pool
        self.replicas = replicas
        self.replica_wait_ms = replica_wait_ms
        self.recheck_s = recheck_s
        self._batch: list[tuple[tuple[Any, ...], Settle]] = []
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._line: _Line | None = None
        self._line_since = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self.writes = 0  # batches written (commands / writes = the pipelining achieved)
        self.commands = 0

    def execute(self, *args: Any) -> asyncio.Future[Any]:
        """Send one command with the others of this loop turn: a future of its reply (an error reply
        raises). (A plain function returning the future: a coroutine here would be one more frame
        that every resumption of its caller passes through.)"""
        loop = self._loop
        if loop is None or loop.is_closed():  # (asyncio.get_running_loop() costs a getpid call)
            loop = self._loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self.execute_then(args, _settle_future(fut))
        return fut

    def execute_then(self, args: tuple[Any, ...], settle: Settle) -> None:
        """``execute`` for a caller that wants a callback: ``settle`` gets the reply, or the
        exception (an error reply included), from the pipeline's reader; no future, no loop
        iteration of its own."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        self._batch.append((args, settle))
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_loop(), name="redis-pipeline-writer")
        self._wake.set()

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer
            self._writer = None
        for _, settle in self._batch:
            settle(RedisConnectionError("the Redis pipeline was closed"))
        self._batch.clear()
        if self._line is not None:
            await self._break(self._line, RedisConnectionError("the Redis pipeline was closed"))

    # ------------------------------------------------------------------ writing
    async def _write_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._batch = self._batch, []
            if batch:
                await self._write(batch)

    async def _write(self, batch: list[tuple[tuple[Any, ...], Settle]]) -> None:
        try:
            line = await self._current_line()
        except Exception as exc:  # no connection: every call of the batch hears why
            for _, settle in batch:
                settle(exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(str(exc)))
            return
        commands = [args for args, _ in batch]
        if not line.owed:  # the watchdog's clock starts with the first reply owed
            line.progress = asyncio.get_running_loop().time()
        if self.replicas > 0:
            commands.append(("WAIT", self.replicas, self.replica_wait_ms))
            line.owed.extend(self._waited([settle for _, settle in batch]))
        else:
            line.owed.extend(settle for _, settle in batch)
        line.has_owed.set()
        self.writes += 1
        self.commands += len(commands)
        try:
            await line.conn.send_packed_command(_pack(line.conn, commands), check_health=False)
        except BaseException as exc:
            await self._break(line, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise

    def _waited(self, settles: list[Settle]) -> list[Settle]:
        """The batch's calls keep their replies until WAIT's answer says whether replicas have them."""
        replies: list[Any] = [None] * len(settles)

        def keep(i: int) -> Settle:
            def settle(reply: Any) -> None:
                replies[i] = reply

            return settle

        def after_wait(acked: Any) -> None:
            if isinstance(acked, BaseException):
                failure: BaseException | None = acked
            elif int(acked) < self.replicas:
                failure = ReplicasBehind(f"{acked} of {self.replicas} replicas acknowledged within "
                                         f"{self.replica_wait_ms} ms")
            else:
                failure = None
            for settle, reply in zip(settles, replies, strict=True):
                settle(failure if failure is not None else reply)

        return [*(keep(i) for i in range(len(settles))), after_wait]

    async def _current_line(self) -> _Line:
        line = self._line
        now = time.monotonic()
        if line is not None and not line.broken:
            if self.recheck_s is None or now - self._line_since < self.recheck_s:
                return line
            line.retiring = True  # its reader hands it back once the replies it is owed are in
            line.has_owed.set()
        conn = await self.pool.get_connection()
        line = _Line(conn)
        loop = asyncio.get_running_loop()
        line.reader = loop.create_task(self._read_loop(line), name="redis-pipeline-reader")
        self._watch(line, getattr(conn, "socket_timeout", None))
        self._line, self._line_since = line, now
        return line

    def _watch(self, line: _Line, timeout: float | None) -> None:
        """Break ``line`` when a reply it is owed has not come for ``timeout`` seconds (checked four
        times per ``timeout``; None: never, like a connection without a socket timeout)."""
        if not timeout:
            return
        loop = asyncio.get_running_loop()

        def check() -> None:
            if line.broken or (line.retiring and not line.owed):
                return
            if line.owed and loop.time() - line.progress > timeout:
                loop.create_task(self._break(line, RedisTimeoutError(
                    f"no reply from Redis in {timeout:g} s")), name="redis-pipeline-timeout")
                return
            line.watchdog = loop.call_later(timeout / 4, check)

        line.watchdog = loop.call_later(timeout / 4, check)

    # ------------------------------------------------------------------ reading
    async def _read_loop(self, line: _Line) -> None:
        loop = asyncio.get_running_loop()
        direct = _direct_reader(line.conn)
        try:
            while True:
                if not line.owed:
                    if line.retiring:
                        await self.pool.release(line.conn)
                        return
                    line.has_owed.clear()
                    await line.has_owed.wait()
                    continue
                if direct is not None:
                    reply: Any = await direct.next_reply()
                else:
                    try:
                        reply = await line.conn.read_response(timeout=math.inf)  # (the watchdog's)
                    except ResponseError as exc:  # an error reply: that call's alone
                        reply = exc
                line.progress = loop.time()
                settle = line.owed.popleft()
                try:
                    settle(reply)
                except Exception as exc:  # (a caller's bug: not the connection's, nor the other callers')
                    loop.call_exception_handler({"message": "a Redis reply's callback failed", "exception": exc})
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await self._break(line, exc)

    async def _break(self, line: _Line, exc: BaseException) -> None:
        """The connection is unusable: everyone it owes a reply hears a connection error; it goes
        back to its pool closed (the next batch takes a new one)."""
        if line.broken:
            return
        line.broken = True
        if line.watchdog is not None:
            line.watchdog.cancel()
        if self._line is line:
            self._line = None
        error = exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(
            f"Redis connection lost: {type(exc).__name__}: {exc}")
        while line.owed:
            line.owed.popleft()(error)
        if line.reader is not None and line.reader is not asyncio.current_task():
            line.reader.cancel()
        with contextlib.suppress(Exception):
            await line.conn.disconnect(nowait=True)
        with contextlib.suppress(Exception):
            await self.pool.release(line.conn)
