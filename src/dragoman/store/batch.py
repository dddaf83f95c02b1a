"""Batching: calls that arrive within a few milliseconds of each other leave as one.

A scheduler process holding thousands of node sockets receives hundreds of heartbeats a second, and
nobody waits on their replies promptly. Each one a script call of its own costs the process a
Redis request, a reply to parse and a task wake-up apiece; collected for ``linger`` seconds (or
until ``max_items`` are waiting) they become one call of ``run`` with the list, and each caller
gets its own item of the answer.

Rules:
- ``run(key, items)`` returns one result per item, in order; a result that is an exception is
  raised in that item's caller only. An exception raised by ``run`` itself reaches every caller of
  the batch.
- Items are batched per ``key`` (e.g. a cell and a setting that must be the same for the batch).
- A caller that stops waiting (cancelled) leaves its item in the batch; the result is dropped.
- ``submit_soon`` is ``submit`` for a caller that does not wait: it gets the result's future (a
  node's frame loop goes on to its next frame while the heartbeat waits for company).
- ``submit_then`` is the same with a callback instead of a future: ``done(result, None)`` or
  ``done(None, exc)``, called when the batch's answer is in. A scheduler holding 10,000 node sockets
  hears hundreds of heartbeats a second; a future apiece, its done-callback and the loop iteration
  that runs it cost more than the rest of the heartbeat's handling. A callback that raises is
  reported to the loop's exception handler and the others still run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

Run = Callable[[K, list[Any]], Awaitable[Sequence[Any]]]
Done = Callable[[Any, BaseException | None], object]


class _Pending(Generic[K]):
    __slots__ = ("items", "done", "timer")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.done: list[Done] = []
        self.timer: asyncio.TimerHandle | None = None


def settle(fut: asyncio.Future[Any]) -> Done:
    """A ``Done`` callback that settles ``fut`` (unless its caller stopped waiting)."""
    def done(result: Any, exc: BaseException | None) -> None:
        if fut.done():  # (its caller stopped waiting)
            return
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    return done


class Batcher(Generic[K]):
    def __init__(self, run: Run[K], *, linger: float, max_items: int = 200) -> None:
        self.run = run
        self.linger = linger
        self.max_items = max_items
        self._pending: dict[K, _Pending[K]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # calls of ``run`` made (items / batches = the batching achieved)
        self.items = 0

    async def submit(self, key: K, item: Any) -> Any:
        return await self.submit_soon(key, item)

    def submit_soon(self, key: K, item: Any) -> asyncio.Future[Any]:
        """``submit`` for a caller that does not wait: the future of the item's result."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit_then(key, item, settle(fut))
        return fut

    def submit_then(self, key: K, item: Any, done: Done) -> None:
        """``submit`` for a caller that wants a callback: ``done(result, None)`` or ``done(None, exc)``."""
        p = self._pending.get(key)
        if p is None:
            p = self._pending[key] = _Pending()
            p.timer = asyncio.get_running_loop().call_later(self.linger, self._flush, key)
        p.items.append(item)
        p.done.append(done)
        if len(p.items) >= self.max_items:
            self._flush(key)

    def _flush(self, key: K) -> None:
        p = self._pending.pop(key, None)
        if p is None:
            return
        if p.timer is not None:
            p.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._run(key, p), name="batch")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, key: K, p: _Pending[K]) -> None:
        self.batches += 1
        self.items += len(p.items)
        try:
            results = await self.run(key, p.items)
            if len(results) != len(p.items):
                raise RuntimeError(f"a batch of {len(p.items)} got {len(results)} results")
        except BaseException as exc:
            self._tell(p.done, [exc] * len(p.done))
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._tell(p.done, results)

    @staticmethod
    def _tell(done: list[Done], results: Sequence[Any]) -> None:
        for cb, result in zip(done, results, strict=True):
            try:
                if isinstance(result, BaseException):
                    cb(None, result)
                else:
                    cb(result, None)
            except Exception as exc:  # (one caller's bug is not the others')
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "a batch callback failed", "exception": exc})

    async def aclose(self) -> None:
        """Send what is waiting now, and wait for every batch in flight."""
        for key in list(self._pending):
            self._flush(key)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
