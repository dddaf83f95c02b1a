"""Deliver one session's results in utterance order per target language, with a bounded wait for gaps.

PROTOCOL.md section 2: "Results are delivered in utterance_index order per target language. A gap is
waited for at most result_gap_ms, then a missing_result with reason gap_timeout is sent for it and
later results flow." Jobs finish in any order (different nodes, retries), so the session holds early
results here until the slots before them are settled.

A sans-I/O state machine, generic in the outcome type ``T`` (a result message, an error, an empty-ack
marker: whatever the session wants delivered). How to drive it::

    orderer: ResultOrderer[Outcome] = ResultOrderer(gap_ms=30_000)
    orderer.expect(tgt_lang, utterance_index, now_ms)         # when the job for that slot is created
    ready = orderer.push(tgt_lang, utterance_index, outcome, now_ms)  # when its outcome is known
    ready = orderer.poll(now_ms)                              # when the timer fires
    deadline = orderer.next_deadline_ms()                     # re-arm the timer after EVERY call
    ready = orderer.drain(now_ms, force=True)                 # session_close: settle everything owed

Send every returned item in list order: a ``Result`` as its outcome, a ``GapTimeout`` as a
``missing_result`` (reason ``gap_timeout``). Each expected slot yields exactly one of the two, ever.

Slots per target are exactly the indices given to ``expect`` (strictly increasing, possibly sparse:
an utterance may have no job for some target). The gap clock of a slot starts when it becomes the
head-of-line blocker: the lowest unsettled slot of its target while a later result waits behind it.
A slot nobody waits behind is not timed out here; its job's own timeout produces its outcome.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Result(Generic[T]):
    """The outcome of one slot, released in order."""

    tgt_lang: str
    utterance_index: int
    outcome: T


@dataclass(frozen=True, slots=True)
class GapTimeout:
    """Marker for a slot given up on: send ``missing_result`` (reason ``gap_timeout``) for it."""

    tgt_lang: str
    utterance_index: int


Delivery: TypeAlias = Result[T] | GapTimeout


@dataclass(slots=True)
class _Lane(Generic[T]):
    """One target language: the unsettled slots in index order and the results already arrived."""

    owed: deque[int] = field(default_factory=deque)
    arrived: dict[int, T] = field(default_factory=dict)
    last_expected: int | None = None
    # (head index, since when it blocks) while the head is unanswered and a later result waits.
    blocked: tuple[int, int] | None = None

    def flow(self, tgt_lang: str) -> list[Result[T]]:
        """Release the answered slots at the head, in order."""
        out: list[Result[T]] = []
        while self.owed and self.owed[0] in self.arrived:
            index = self.owed.popleft()
            out.append(Result(tgt_lang, index, self.arrived.pop(index)))
        return out

    def update_blocked(self, now_ms: int) -> None:
        if not (self.owed and self.arrived):
            self.blocked = None
        elif self.blocked is None or self.blocked[0] != self.owed[0]:
            self.blocked = (self.owed[0], now_ms)


class ResultOrderer(Generic[T]):
    """The per-session reorder window. See the module docstring for the calling sequence."""

    def __init__(self, gap_ms: int = 30_000) -> None:
        if gap_ms < 0:
            raise ValueError(f"gap_ms must not be negative, got {gap_ms}")
        self._gap_ms = gap_ms
        self._lanes: dict[str, _Lane[T]] = {}
        self._late_dropped = 0

    @property
    def late_dropped(self) -> int:
        """Outcomes refused: for a slot never expected, already settled, or already answered."""
        return self._late_dropped

    def owed(self) -> int:
        """Slots expected but not yet delivered (as a result or a gap timeout)."""
        return sum(len(lane.owed) for lane in self._lanes.values())

    def unsettled(self) -> list[tuple[str, int]]:
        """(tgt_lang, utterance_index) of every slot still owed and not yet answered, in order."""
        return [
            (tgt, index)
            for tgt, lane in self._lanes.items()
            for index in lane.owed
            if index not in lane.arrived
        ]

    def next_deadline_ms(self) -> int | None:
        """When ``poll`` should run next; None while no slot blocks a waiting result."""
        deadlines = [lane.blocked[1] + self._gap_ms for lane in self._lanes.values() if lane.blocked]
        return min(deadlines, default=None)

    def expect(self, tgt_lang: str, utterance_index: int, now_ms: int) -> None:
        """Register a slot that is owed an outcome. Indices per target must strictly increase.

        ``now_ms`` is accepted for symmetry with the other events; a new slot is always at the tail,
        so it never starts a gap clock.
        """
        lane = self._lanes.setdefault(tgt_lang, _Lane())
        if lane.last_expected is not None and utterance_index <= lane.last_expected:
            raise ValueError(
                f"expect({tgt_lang!r}, {utterance_index}) after index {lane.last_expected}: "
                "slots of a target must be expected in increasing order"
            )
        lane.last_expected = utterance_index
        lane.owed.append(utterance_index)

    def push(self, tgt_lang: str, utterance_index: int, outcome: T, now_ms: int) -> list[Result[T]]:
        """Record a slot's outcome; return the results that can now be delivered in order.

        An outcome for a slot never expected, already delivered or timed out, or already answered is
        dropped and counted in ``late_dropped``: each slot reaches the client exactly once.
        """
        lane = self._lanes.get(tgt_lang)
        if lane is None or utterance_index in lane.arrived or utterance_index not in lane.owed:
            self._late_dropped += 1
            return []
        lane.arrived[utterance_index] = outcome
        out = lane.flow(tgt_lang)
        lane.update_blocked(now_ms)
        return out

    def poll(self, now_ms: int) -> list[Delivery[T]]:
        """Timer tick: give up on every blocker waited for ``gap_ms``, and release what then flows."""
        out: list[Delivery[T]] = []
        for tgt_lang, lane in self._lanes.items():
            while lane.blocked is not None and now_ms >= lane.blocked[1] + self._gap_ms:
                out.append(GapTimeout(tgt_lang, lane.owed.popleft()))
                out.extend(lane.flow(tgt_lang))
                lane.update_blocked(now_ms)  # a new blocker starts its own wait now
        return out

    def drain(self, now_ms: int, force: bool = False) -> list[Delivery[T]]:
        """Settle for ``session_close``.

        Without ``force`` this only does what is due (as ``poll``): the caller can keep waiting for
        ``owed()`` to reach 0 as jobs finish, and inspect ``unsettled()``. With ``force`` every slot
        still owed is settled now, in order: its result if it arrived, else a ``GapTimeout``.
        """
        if not force:
            return self.poll(now_ms)
        out: list[Delivery[T]] = []
        for tgt_lang, lane in self._lanes.items():
            while lane.owed:
                index = lane.owed.popleft()
                if index in lane.arrived:
                    out.append(Result(tgt_lang, index, lane.arrived.pop(index)))
                else:
                    out.append(GapTimeout(tgt_lang, index))
            lane.blocked = None
        return out
