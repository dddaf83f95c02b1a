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
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        if self._waiters:
            for fut in self._waiters:
                if not fut.done():
                    fut.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        fut = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
            return True
        finally:
            self._waiters.remove(fut)
