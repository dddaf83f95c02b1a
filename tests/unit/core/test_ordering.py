"""dragoman.core.ordering.ResultOrderer: in-order delivery per lane, each slot exactly once."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragoman.core.ordering import Result, ResultOrderer


def orderer(slots: dict[str, list[int]]) -> ResultOrderer[str, str]:
    o: ResultOrderer[str, str] = ResultOrderer()
    for lane, indices in slots.items():
        for index in indices:
            o.expect(lane, index)
    return o


def R(lane: str, index: int) -> Result[str, str]:  # noqa: N802 - reads like the type it builds
    return Result(lane, index, f"{lane}{index}")


class TestInOrder:
    def test_in_order_results_pass_straight_through(self) -> None:
        o = orderer({"en": [0, 1, 2]})
        for i in range(3):
            assert o.push("en", i, f"en{i}") == [R("en", i)]
        assert o.owed() == 0

    def test_out_of_order_results_are_held_then_released(self) -> None:
        o = orderer({"en": [0, 1, 2]})
        assert o.push("en", 2, "en2") == []
        assert o.push("en", 1, "en1") == []
        assert o.owed() == 3
        assert list(o.unsettled()) == [("en", 0)]
        assert o.push("en", 0, "en0") == [R("en", 0), R("en", 1), R("en", 2)]
        assert o.owed() == 0

    def test_sparse_indices_are_a_complete_sequence(self) -> None:
        o = orderer({"en": [0, 3, 7]})  # utterances 1, 2, 4-6 had no job for "en"
        assert o.push("en", 3, "en3") == []
        assert o.push("en", 0, "en0") == [R("en", 0), R("en", 3)]
        assert o.push("en", 7, "en7") == [R("en", 7)]

    def test_lanes_do_not_block_each_other(self) -> None:
        o = orderer({"en": [0, 1], "fr": [0, 1]})
        assert o.push("en", 1, "en1") == []
        assert o.push("fr", 0, "fr0") == [R("fr", 0)]
        assert o.push("fr", 1, "fr1") == [R("fr", 1)]
        assert o.owed() == 2 and o.is_owed("en", 0) and not o.is_owed("en", 1)

    def test_a_gap_is_never_given_up_on_here(self) -> None:
        """A job still being recovered keeps its place: only its own outcome (or the error its
        deadline produces) releases what waits behind it."""
        o = orderer({"en": [0, 1]})
        assert o.push("en", 1, "en1") == []
        assert o.owed() == 2
        assert o.push("en", 0, "en0") == [R("en", 0), R("en", 1)]

    def test_expect_must_increase_per_lane(self) -> None:
        o = orderer({"en": [3]})
        with pytest.raises(ValueError, match="increasing"):
            o.expect("en", 3)
        with pytest.raises(ValueError, match="increasing"):
            o.expect("en", 2)
        o.expect("fr", 0)  # other lanes are independent
        assert o.last_expected("en") == 3 and o.last_expected("de") is None


class TestExactlyOnce:
    def test_late_duplicate_and_unknown_outcomes_are_dropped_and_counted(self) -> None:
        o = orderer({"en": [0, 1]})
        assert o.push("en", 0, "en0") == [R("en", 0)]
        assert o.push("en", 0, "again") == []  # already delivered
        assert o.push("en", 1, "en1") == [R("en", 1)]
        assert o.push("en", 5, "x") == []  # never expected
        assert o.push("de", 0, "x") == []  # unknown lane
        assert o.late_dropped == 3

    def test_an_answered_slot_cannot_be_answered_twice(self) -> None:
        o = orderer({"en": [0, 1]})
        assert o.push("en", 1, "first") == []
        assert o.push("en", 1, "second") == []
        assert o.push("en", 0, "en0") == [R("en", 0), Result("en", 1, "first")]
        assert o.late_dropped == 1


class TestDrop:
    def test_dropping_a_lane_releases_what_arrived_and_forgets_the_rest(self) -> None:
        o = orderer({"en": [0, 1, 2], "fr": [0]})
        o.push("en", 1, "en1")
        assert o.drop("en") == [R("en", 1)]
        assert o.owed() == 1
        assert o.push("en", 0, "en0") == []  # no longer owed
        assert o.drop("en") == []


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["en", "fr", "de"]), st.sets(st.integers(0, 40), max_size=15), max_size=3),
       st.randoms(use_true_random=False))
def test_every_slot_delivered_once_in_order(slots: dict[str, set[int]], rnd) -> None:  # type: ignore[no-untyped-def]
    o = orderer({lane: sorted(indices) for lane, indices in slots.items()})
    arrivals = [(lane, i) for lane, indices in slots.items() for i in indices]
    arrivals += rnd.sample(arrivals, k=len(arrivals) // 3)  # some repeated
    rnd.shuffle(arrivals)
    delivered: list[Result[str, str]] = []
    for lane, i in arrivals:
        delivered += o.push(lane, i, f"{lane}{i}")
    assert o.owed() == 0
    for lane, indices in slots.items():
        got = [r.utterance_index for r in delivered if r.lane == lane]
        assert got == sorted(indices)
