"""The cycle collector in a process that holds thousands of sockets for hours.

CPython's full collection looks at every container object that is not frozen. A scheduler holding
10,000 node sockets has about a million of them, nearly all as old as their socket: one full
collection took 0.9 s of CPU on the bench machine, a stall of every socket that long, and under
steady heartbeats one ran every ~30 s (the ping timers and futures that live a few seconds fill the
old generation's quota of newcomers). That was a tenth of the process's CPU while it only answered
heartbeats (``python -m bench.idle``).

The policy (``collector_policy``):
- what survives a full collection is frozen (``gc.freeze``, from the collector's own callback): the
  next full collections look only at what was made since, so each costs what the newcomers cost;
- every ``sweep_s`` everything is thawed and collected once (``sweep``): a cycle among frozen
  objects (a socket's, frozen while it was open, then closed) is reclaimed then, so the memory
  such cycles hold stays bounded by what ``sweep_s`` of socket churn leaves.

Objects freed by their reference count (nearly all) are freed as ever, frozen or not: freezing only
hides them from the cycle collector.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Iterator
from typing import Any


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()  # (the collection is over: its survivors move to the permanent generation)


def sweep() -> int:
    """Thaw everything and collect it once (under the policy, the survivors are frozen again by the
    collector's callback): the number of objects collected."""
    gc.unfreeze()
    return gc.collect()


@contextlib.contextmanager
def collector_policy(sweep_s: float) -> Iterator[None]:
    """The policy above while the block runs, in a running event loop (its timer sweeps);
    ``sweep_s`` <= 0: CPython's collector as it is. On exit everything is thawed."""
    if sweep_s <= 0:
        yield
        return
    loop = asyncio.get_running_loop()
    timer: asyncio.TimerHandle | None = None

    def tick() -> None:
        nonlocal timer
        sweep()
        timer = loop.call_later(sweep_s, tick)

    gc.callbacks.append(_freeze_survivors)
    timer = loop.call_later(sweep_s, tick)
    try:
        yield
    finally:
        timer.cancel()
        gc.callbacks.remove(_freeze_survivors)
        gc.unfreeze()
