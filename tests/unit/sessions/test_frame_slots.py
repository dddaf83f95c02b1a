"""sessions/actor.py FrameSlots: the bound on a session's queued client frames, taken with or
without waiting."""

from __future__ import annotations

import asyncio

from dragoman.sessions.actor import FrameSlots


async def test_slots_are_taken_without_waiting_until_none_are_left_then_a_release_lets_a_waiter_in() -> None:
    slots = FrameSlots(2)
    assert slots.try_acquire() and slots.try_acquire()
    assert not slots.try_acquire() and slots.free == 0
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    assert not waiter.done()  # none free: it waits
    slots.release()
    await asyncio.wait_for(waiter, 2)
    assert slots.free == 0  # the released slot went to the waiter
    slots.release()
    assert slots.free == 1
    await asyncio.wait_for(slots.acquire(), 2)  # a free slot: no wait
    assert slots.free == 0
