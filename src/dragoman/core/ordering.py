"""Deliver outcomes in utterance order per lane (a target language, or a speaker and a language in a
room), each exactly once.

PROTOCOL.md section 2: "Results are delivered in utterance_index order per target language." Jobs
finish in any order (different nodes, retries), so the session holds early outcomes here until the
slots before them are settled. A slot is never given up on here: every job has its own deadline
(I10), enforced by the session, which settles a slot with an error when it passes; so a gap lasts at
most as long as the job before it can, and a job that is still being recovered keeps its place.

A sans-I/O structure, generic in the lane key ``L`` and the outcome type ``T``. How to drive it::

    orderer: ResultOrderer[str, Outcome] = ResultOrderer()
    orderer.expect(lane, utterance_index)                # when the job for that slot is created
    ready = orderer.push(lane, utterance_index, outcome)  # when its outcome is known
    ready = orderer.drop(lane)                            # a lane nobody is owed any more (room left)

Send every returned ``Result`` in list order. Slots per lane are exactly the indices given to
``expect`` (strictly increasing, possibly sparse).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

L = TypeVar("L", bound=Hashable)
T = TypeVar("T")


@dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class Result(Generic[L, T]):
    """The outcome of one slot, released in order."""

    lane: L
    utterance_index: int
    outcome: T


@dataclass(slots=True)
class _Lane(Generic[T]):
    owed: deque[int] = field(default_factory=deque)
    arrived: dict[int, T] = field(default_factory=dict)
    last_expected: int | None = None


class ResultOrderer(Generic[L, T]):
    def __init__(self) -> None:
        self._lanes: dict[L, _Lane[T]] = {}
        self._late_dropped = 0

    @property
    def late_dropped(self) -> int:
        """Outcomes refused: for a slot never expected, already delivered, or already answered."""
        return self._late_dropped

    def owed(self) -> int:
        """Slots expected but not yet delivered."""
        return sum(len(lane.owed) for lane in self._lanes.values())

    def unsettled(self) -> Iterator[tuple[L, int]]:
        """(lane, utterance_index) of every slot still owed and not yet answered, in order."""
        for key, lane in self._lanes.items():
            for index in lane.owed:
                if index not in lane.arrived:
                    yield key, index

    def last_expected(self, lane: L) -> int | None:
        found = self._lanes.get(lane)
        return None if found is None else found.last_expected

    def is_owed(self, lane: L, utterance_index: int) -> bool:
        found = self._lanes.get(lane)
        return found is not None and utterance_index in found.owed and utterance_index not in found.arrived

    def expect(self, lane: L, utterance_index: int) -> None:
        """Register a slot that is owed an outcome. Indices per lane must strictly increase."""
        found = self._lanes.setdefault(lane, _Lane())
        if found.last_expected is not None and utterance_index <= found.last_expected:
            raise ValueError(f"expect({lane!r}, {utterance_index}) after index {found.last_expected}: "
                             "slots of a lane must be expected in increasing order")
        found.last_expected = utterance_index
        found.owed.append(utterance_index)

    def push(self, lane: L, utterance_index: int, outcome: T) -> list[Result[L, T]]:
        """Record a slot's outcome; return the results that can now be delivered in order.

        An outcome for a slot never expected, already delivered, or already answered is dropped and
        counted in ``late_dropped``: each slot reaches the client exactly once.
        """
        found = self._lanes.get(lane)
        if found is None or utterance_index in found.arrived or utterance_index not in found.owed:
            self._late_dropped += 1
            return []
        found.arrived[utterance_index] = outcome
        out: list[Result[L, T]] = []
        while found.owed and found.owed[0] in found.arrived:
            index = found.owed.popleft()
            out.append(Result(lane, index, found.arrived.pop(index)))
        return out

    def drop(self, lane: L) -> list[Result[L, T]]:
        """Forget a lane: what arrived is released in order, what is still unanswered is no longer owed."""
        found = self._lanes.pop(lane, None)
        if found is None:
            return []
        return [Result(lane, index, found.arrived[index]) for index in found.owed if index in found.arrived]
