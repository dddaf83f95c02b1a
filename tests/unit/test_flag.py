"""dragoman/flag.py: an asyncio.Event without the per-instance deque, with the same semantics."""

from __future__ import annotations

import asyncio

import pytest

from dragoman.flag import Flag


async def test_a_set_flag_does_not_wait() -> None:
    flag = Flag()
    flag.set()
    assert flag.is_set() and await asyncio.wait_for(flag.wait(), 1)


async def test_set_wakes_every_waiter_even_if_cleared_before_they_run() -> None:
    flag = Flag()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await asyncio.sleep(0)  # they are waiting
    assert not any(w.done() for w in waiters)
    flag.set()
    flag.clear()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [True, True, True]
    assert not flag.is_set()


async def test_a_cancelled_waiter_leaves_nothing_behind() -> None:
    flag = Flag()
    waiter = asyncio.create_task(flag.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert flag._waiters == []
    flag.set()  # nobody left to wake: no error
    assert flag.is_set()


def test_no_waiter_list_until_something_waits() -> None:
    assert Flag()._waiters is None


async def test_a_wait_with_a_timeout_is_false_when_nothing_set_it_and_true_when_set_in_time() -> None:
    flag = Flag()
    assert await asyncio.wait_for(flag.wait(0.01), 1) is False
    assert await flag.wait(0) is False  # no time: no wait
    assert flag._waiters == []  # the timed-out waiter left nothing behind
    waiter = asyncio.create_task(flag.wait(30))
    await asyncio.sleep(0)
    flag.set()
    assert await asyncio.wait_for(waiter, 1) is True
    assert await flag.wait(0) is True  # already set: true at once, whatever the timeout
