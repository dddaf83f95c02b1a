"""dragoman.core.ordering.ResultOrderer: in-order delivery per target with a bounded gap wait."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragoman.core.ordering import Delivery, GapTimeout, Result, ResultOrderer


def orderer(slots: dict[str, list[int]], gap_ms: int = 30_000) -> ResultOrderer[str]:
    o: ResultOrderer[str] = ResultOrderer(gap_ms=gap_ms)
    for tgt, indices in slots.items():
        for index in indices:
            o.expect(tgt, index, 0)
    return o


def R(tgt: str, index: int) -> Result[str]:  # noqa: N802 - reads like the type it builds
    return Result(tgt, index, f"{tgt}{index}")


class TestInOrder:
    def test_in_order_results_pass_straight_through(self) -> None:
        o = orderer({"en": [0, 1, 2]})
        for i in range(3):
            assert o.push("en", i, f"en{i}", 10 * i) == [R("en", i)]
        assert o.owed() == 0 and o.next_deadline_ms() is None

    def test_out_of_order_results_are_held_then_released(self) -> None:
        o = orderer({"en": [0, 1, 2]})
        assert o.push("en", 2, "en2", 100) == []
        assert o.push("en", 1, "en1", 200) == []
        assert o.owed() == 3
        assert o.push("en", 0, "en0", 300) == [R("en", 0), R("en", 1), R("en", 2)]
        assert o.owed() == 0 and o.next_deadline_ms() is None

    def test_sparse_indices_are_a_complete_sequence(self) -> None:
        o = orderer({"en": [0, 3, 7]})  # utterances 1, 2, 4-6 had no job for "en"
        assert o.push("en", 3, "en3", 0) == []
        assert o.push("en", 0, "en0", 0) == [R("en", 0), R("en", 3)]
        assert o.push("en", 7, "en7", 0) == [R("en", 7)]

    def test_a_slot_expected_later_does_not_block_earlier_results(self) -> None:
        o = orderer({"en": [0]})
        assert o.push("en", 0, "en0", 0) == [R("en", 0)]
        o.expect("en", 1, 5)
        assert o.push("en", 1, "en1", 6) == [R("en", 1)]

    def test_targets_do_not_block_each_other(self) -> None:
        o = orderer({"en": [0, 1], "fr": [0, 1]})
        assert o.push("en", 1, "en1", 0) == []
        assert o.push("fr", 0, "fr0", 0) == [R("fr", 0)]
        assert o.push("fr", 1, "fr1", 0) == [R("fr", 1)]
        assert o.owed() == 2
        assert o.poll(30_000) == [GapTimeout("en", 0), R("en", 1)]

    def test_expect_must_increase_per_target(self) -> None:
        o = orderer({"en": [3]})
        o.expect("fr", 1, 0)  # other targets have their own sequence
        with pytest.raises(ValueError, match="increasing order"):
            o.expect("en", 3, 0)
        with pytest.raises(ValueError, match="increasing order"):
            o.expect("en", 2, 0)


class TestGapTimeout:
    def test_gap_times_out_then_later_results_flow(self) -> None:
        o = orderer({"en": [0, 1, 2]})
        assert o.next_deadline_ms() is None  # nothing waits behind slot 0 yet
        assert o.push("en", 1, "en1", 1000) == []
        assert o.push("en", 2, "en2", 5000) == []
        assert o.next_deadline_ms() == 31_000  # from when slot 0 started blocking, not from 5000
        assert o.poll(30_999) == []
        assert o.poll(31_000) == [GapTimeout("en", 0), R("en", 1), R("en", 2)]
        assert o.owed() == 0 and o.next_deadline_ms() is None

    def test_a_late_result_after_its_gap_timeout_is_dropped(self) -> None:
        o = orderer({"en": [0, 1]})
        o.push("en", 1, "en1", 0)
        assert o.poll(30_000) == [GapTimeout("en", 0), R("en", 1)]
        assert o.push("en", 0, "en0", 31_000) == []
        assert o.late_dropped == 1

    def test_a_result_arriving_before_the_timer_fires_is_delivered(self) -> None:
        o = orderer({"en": [0, 1]})
        o.push("en", 1, "en1", 0)
        assert o.push("en", 0, "en0", 40_000) == [R("en", 0), R("en", 1)]  # deadline passed, not polled
        assert o.poll(40_000) == []

    def test_each_new_blocker_waits_from_when_it_became_the_blocker(self) -> None:
        o = orderer({"en": [0, 1, 2]})
        o.push("en", 2, "en2", 0)
        assert o.poll(30_000) == [GapTimeout("en", 0)]
        assert o.next_deadline_ms() == 60_000
        assert o.poll(60_000) == [GapTimeout("en", 1), R("en", 2)]

    def test_releasing_the_head_restarts_the_clock_for_a_new_blocker(self) -> None:
        o = orderer({"en": [0, 1, 2, 3]})
        o.push("en", 3, "en3", 0)
        o.push("en", 1, "en1", 0)
        assert o.push("en", 0, "en0", 10_000) == [R("en", 0), R("en", 1)]
        assert o.next_deadline_ms() == 40_000  # slot 2 blocks since 10_000

    def test_zero_gap_skips_gaps_at_once(self) -> None:
        o = orderer({"en": [0, 1, 2, 3]}, gap_ms=0)
        o.push("en", 3, "en3", 0)
        assert o.poll(0) == [GapTimeout("en", 0), GapTimeout("en", 1), GapTimeout("en", 2), R("en", 3)]

    def test_trailing_unanswered_slot_is_not_timed_out_here(self) -> None:
        o = orderer({"en": [0]})
        assert o.poll(10**9) == [] and o.owed() == 1

    def test_negative_gap_is_rejected(self) -> None:
        with pytest.raises(ValueError):
            ResultOrderer(gap_ms=-1)


class TestDropped:
    def test_never_expected_or_repeated_results_are_dropped(self) -> None:
        o = orderer({"en": [0, 2]})
        assert o.push("de", 0, "de0", 0) == []  # unknown target
        assert o.push("en", 1, "en1", 0) == []  # no job for this slot
        assert o.push("en", 5, "en5", 0) == []  # not expected (yet)
        assert o.push("en", 2, "first", 0) == []
        assert o.push("en", 2, "second", 0) == []  # one outcome per slot: the first one wins
        assert o.push("en", 0, "en0", 0) == [R("en", 0), Result("en", 2, "first")]
        assert o.push("en", 0, "again", 0) == []  # already delivered
        assert o.late_dropped == 5


class TestDrain:
    def test_force_settles_every_owed_slot_in_order(self) -> None:
        o = orderer({"en": [0, 1, 2, 4], "fr": [0]})
        o.push("en", 2, "en2", 0)
        o.push("en", 4, "en4", 0)
        assert o.unsettled() == [("en", 0), ("en", 1), ("fr", 0)]
        assert o.drain(1000, force=True) == [
            GapTimeout("en", 0),
            GapTimeout("en", 1),
            R("en", 2),
            R("en", 4),
            GapTimeout("fr", 0),
        ]
        assert o.owed() == 0 and o.unsettled() == [] and o.next_deadline_ms() is None
        assert o.push("en", 1, "en1", 2000) == [] and o.late_dropped == 1

    def test_without_force_only_what_is_due_is_settled(self) -> None:
        o = orderer({"en": [0, 1, 2]})
        o.push("en", 2, "en2", 0)
        assert o.drain(1000) == []
        assert o.owed() == 3 and o.unsettled() == [("en", 0), ("en", 1)]
        assert o.drain(30_000) == [GapTimeout("en", 0)]


# -- property: every expected slot delivered exactly once, in order --------------------------------------


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[dict[str, list[int]], list[tuple[str, object]]]:
    """Expected slots per target, and a shuffled script of pushes (some missing, some repeated,
    some for slots never expected) interleaved with polls."""
    slots = {
        tgt: sorted(draw(st.sets(st.integers(0, 30), max_size=12)))
        for tgt in draw(st.sets(st.sampled_from(["en", "fr", "de"]), min_size=1))
    }
    pushes: list[tuple[str, object]] = [
        ("push", (tgt, i)) for tgt, indices in slots.items() for i in indices if draw(st.booleans())
    ]
    pushes += [("push", key) for key in draw(st.lists(st.sampled_from(pushes), max_size=5))] if pushes else []
    pushes += [("push", ("en", 99))] * draw(st.integers(0, 2))
    polls: list[tuple[str, object]] = [("poll", None)] * draw(st.integers(0, 10))
    script = draw(st.permutations(pushes + polls))
    return slots, list(script)


@settings(max_examples=400, deadline=None)
@given(scenario=scenarios(), steps=st.lists(st.integers(0, 20_000), min_size=60, max_size=60))
def test_every_slot_settles_exactly_once_in_order(
    scenario: tuple[dict[str, list[int]], list[tuple[str, object]]], steps: list[int]
) -> None:
    slots, script = scenario
    o: ResultOrderer[str] = ResultOrderer(gap_ms=10_000)
    for tgt, indices in slots.items():
        for i in indices:
            o.expect(tgt, i, 0)
    delivered: list[Delivery[str]] = []
    pushed: dict[tuple[str, int], str] = {}
    now = 0
    for (kind, arg), step in zip(script, steps, strict=False):
        now += step
        if kind == "poll":
            delivered += o.poll(now)
        else:
            tgt, i = arg  # type: ignore[misc]
            outcome = f"{tgt}{i}@{now}"
            pushed.setdefault((tgt, i), outcome)
            delivered += o.push(tgt, i, outcome, now)
        deadline = o.next_deadline_ms()
        assert deadline is None or deadline > now or kind == "push"
    delivered += o.drain(now + 1, force=True)

    for tgt, indices in slots.items():
        mine = [d for d in delivered if d.tgt_lang == tgt]
        assert [d.utterance_index for d in mine] == indices  # exactly once each, increasing
        for d in mine:
            if isinstance(d, Result):
                assert d.outcome == pushed[(tgt, d.utterance_index)]  # the first outcome pushed
    results = sum(isinstance(d, Result) for d in delivered)
    pushes = sum(1 for kind, _ in script[: len(steps)] if kind == "push")
    assert o.late_dropped == pushes - results
    assert o.owed() == 0
