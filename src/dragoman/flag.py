"""``Flag``: an ``asyncio.Event`` that costs nothing until something waits on it.

``asyncio.Event`` allocates a deque of waiters (~380 bytes, a 64-slot block) with every instance.
A scheduler keeps a few per socket for hours (uvicorn's ``writable``, a session's inbox and end),
mostly never awaited; thousands of sockets make that a visible share of the process's memory
(``python -m bench.idle``). Same semantics as ``asyncio.Event``: ``set`` wakes every waiter, and a
waiter woken by ``set`` returns even if ``clear`` follows before it runs.
"""

from __future__ import annotations

import asyncio


class Flag:
    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        if self._waiters:
            for fut in self._waiters:
                if not fut.done():
                    fut.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self, timeout: float | None = None) -> bool:
        """True once set; with a ``timeout`` (seconds), False if it was not set by then. (One timer,
        no cancellation: cheaper than ``asyncio.timeout`` around a wait, for a loop that mostly
        wakes on its deadline.)"""
        if self._set:
            return True
        if timeout is not None and timeout <= 0:
            return False
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        timer = None if timeout is None else loop.call_later(timeout, _expire, fut)
        try:
            return await fut
        finally:
            if timer is not None:
                timer.cancel()
            self._waiters.remove(fut)


def _expire(fut: asyncio.Future[bool]) -> None:
    if not fut.done():
        fut.set_result(False)
