"""The cycle collector's policy (dragoman/gcpolicy.py): survivors of a full collection are frozen,
so later full collections look only at newcomers; a sweep thaws and collects everything."""

from __future__ import annotations

import asyncio
import gc
import weakref

from dragoman.gcpolicy import collector_policy, sweep


class Node:
    """A container in a reference cycle: only the cycle collector frees it."""

    def __init__(self) -> None:
        self.me = self


def in_a_cycle() -> weakref.ref[Node]:
    return weakref.ref(Node())


async def test_survivors_of_a_full_collection_are_frozen_until_a_sweep() -> None:
    with collector_policy(3600):
        kept = Node()
        gc.collect()  # a full collection: its survivors (kept among them) are frozen
        assert gc.get_freeze_count() > 0
        assert not any(o is kept for o in gc.get_objects(generation=2))  # out of the collector's sight
        ref = weakref.ref(kept)
        del kept  # now garbage, but a frozen cycle: full collections do not look at it
        gc.collect()
        assert ref() is not None
        assert sweep() >= 1  # thawed and collected: the cycle is reclaimed
        assert ref() is None
        assert gc.get_freeze_count() > 0  # (the sweep's survivors frozen again)
    assert gc.get_freeze_count() == 0  # on exit everything is thawed
    assert all(getattr(cb, "__module__", "") != "dragoman.gcpolicy" for cb in gc.callbacks)


async def test_newcomers_are_still_collected_between_sweeps() -> None:
    with collector_policy(3600):
        gc.collect()
        ref = in_a_cycle()  # made after the freeze: the next full collection looks at it
        gc.collect()
        assert ref() is None


async def test_the_loop_sweeps_every_sweep_s() -> None:
    with collector_policy(0.05):
        gc.collect()
        kept = Node()
        reclaimed = asyncio.Event()
        weakref.finalize(kept, reclaimed.set)
        gc.collect()  # frozen
        del kept
        gc.collect()
        assert not reclaimed.is_set()
        await asyncio.wait_for(reclaimed.wait(), 2.0)  # the loop's sweep timer reclaims it


async def test_zero_leaves_the_collector_as_it_is() -> None:
    with collector_policy(0):
        gc.collect()
        assert gc.get_freeze_count() == 0
