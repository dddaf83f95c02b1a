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
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

Run = Callable[[K, list[Any]], Awaitable[Sequence[Any]]]


class _Pending(Generic[K]):
    __slots__ = ("items", "futures", "timer")

    def __init__(self) -> None:
        self.items: list[Any] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.timer: asyncio.TimerHandle | None = None


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
        loop = asyncio.get_running_loop()
        p = self._pending.get(key)
        if p is None:
            p = self._pending[key] = _Pending()
            p.timer = loop.call_later(self.linger, self._flush, key)
        fut: asyncio.Future[Any] = loop.create_future()
        p.items.append(item)
        p.futures.append(fut)
        if len(p.items) >= self.max_items:
            self._flush(key)
        return fut

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
            for fut in p.futures:
                if not fut.done():
                    fut.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for fut, result in zip(p.futures, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def aclose(self) -> None:
        """Send what is waiting now, and wait for every batch in flight."""
        for key in list(self._pending):
            self._flush(key)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
