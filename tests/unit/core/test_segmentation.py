"""Scripted event sequences against dragoman.core.segmentation.Segmenter (no clock, no I/O)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dragoman.core.audio import duration_ms, join_opus, split_opus_packets
from dragoman.core.segmentation import CutReason, Segmenter, SegmenterConfig, Utterance
from dragoman.errors import ProtocolError

WEB_CHUNK_MS = 256  # the web client's send interval
WEB_CHUNK_PACKETS = 13  # ~256 ms of 20 ms packets


class Mic:
    """Makes audio whose every packet/sample is distinct, so a lost or repeated byte shows."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def opus(self, packets: int, size: int = 4) -> bytes:
        return join_opus(next(self._counter).to_bytes(4, "big").ljust(size, b".") for _ in range(packets))

    def pcm(self, samples: int) -> bytes:
        return b"".join((next(self._counter) & 0xFFFF).to_bytes(2, "little") for _ in range(samples))


def opus_segmenter(**overrides: int) -> Segmenter:
    return Segmenter(SegmenterConfig(audio_format="opus", **overrides))


def pcm_segmenter(**overrides: int) -> Segmenter:
    return Segmenter(SegmenterConfig(audio_format="pcm16", **overrides))


def packets(utterance: Utterance) -> int:
    return len(split_opus_packets(utterance.audio))


class TestFinal:
    def test_final_chunk_audio_belongs_to_the_utterance_it_ends(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        a, b, c = mic.opus(13), mic.opus(13), mic.opus(13)
        assert seg.feed_chunk(a, False, 0) == []
        assert seg.feed_chunk(b, False, 256) == []
        [utt] = seg.feed_chunk(c, True, 512)
        assert utt == Utterance(
            index=0,
            audio=a + b + c,
            duration_ms=780,
            reason=CutReason.FINAL,
            turn_id=None,
            started_at_ms=0,
            ended_at_ms=512,
            next_seq=3,
        )
        assert (utt.is_manual_cut, utt.is_timeout_triggered, utt.is_max_duration_triggered) == (
            True,
            False,
            False,
        )
        assert utt.reason == "final"
        assert seg.buffered_ms == 0 and seg.next_deadline_ms() is None

    def test_empty_final_makes_no_utterance_and_takes_no_index(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        seg.feed_chunk(mic.opus(5), False, 0)
        [first] = seg.poll(3000)
        assert first.index == 0 and first.reason == "pause"
        assert seg.feed_chunk(b"", True, 3100) == []
        assert seg.next_index == 1
        [second] = seg.feed_chunk(mic.opus(2), True, 3200)
        assert second.index == 1

    def test_utterance_repr_leaves_out_the_audio(self) -> None:
        [utt] = opus_segmenter().feed_chunk(Mic().opus(3), True, 0)
        assert "audio" not in repr(utt)


class TestPause:
    def test_chunk_revealing_a_pause_starts_the_new_utterance(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        a, b, c = mic.opus(13), mic.opus(13), mic.opus(13)
        seg.feed_chunk(a, False, 0)
        seg.feed_chunk(b, False, 256)
        [paused] = seg.feed_chunk(c, False, 256 + 3000)
        assert (paused.index, paused.audio, paused.reason) == (0, a + b, CutReason.PAUSE)
        assert paused.is_timeout_triggered and not paused.is_manual_cut
        assert (paused.started_at_ms, paused.ended_at_ms) == (0, 3256)
        [final] = seg.feed_chunk(b"", True, 3400)
        assert (final.index, final.audio, final.reason, final.started_at_ms) == (1, c, "final", 3256)

    def test_a_gap_just_under_pause_ms_does_not_cut(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        seg.feed_chunk(mic.opus(1), False, 0)
        assert seg.feed_chunk(mic.opus(1), False, 2999) == []
        assert seg.buffered_ms == 40

    def test_poll_cuts_when_the_deadline_passes(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        a = mic.opus(13)
        seg.feed_chunk(a, False, 1000)
        assert seg.next_deadline_ms() == 4000
        assert seg.poll(3999) == []
        [utt] = seg.poll(4000)
        assert (utt.index, utt.audio, utt.reason, utt.ended_at_ms) == (0, a, "pause", 4000)
        assert seg.next_deadline_ms() is None
        assert seg.poll(10_000) == []

    def test_every_chunk_with_audio_pushes_the_deadline(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        seg.feed_chunk(mic.opus(1), False, 0)
        seg.feed_chunk(mic.opus(1), False, 2000)
        assert seg.next_deadline_ms() == 5000

    def test_an_empty_chunk_does_not_hold_the_pause_back(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        seg.feed_chunk(mic.opus(1), False, 0)
        assert seg.feed_chunk(b"", False, 2000) == []
        assert seg.next_deadline_ms() == 3000
        [utt] = seg.feed_chunk(b"", False, 3000)
        assert utt.reason == "pause"

    def test_nothing_buffered_means_no_deadline(self) -> None:
        seg = opus_segmenter()
        assert seg.next_deadline_ms() is None
        seg.feed_chunk(b"", False, 0)
        assert seg.next_deadline_ms() is None


class TestTtsPlayback:
    def test_no_pause_cut_during_playback_and_clock_restarts_after(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        a, b = mic.opus(5), mic.opus(5)
        seg.feed_chunk(a, False, 0)
        assert seg.tts_started(1000) == []
        assert seg.tts_playing and seg.next_deadline_ms() is None
        assert seg.poll(9000) == []
        assert seg.feed_chunk(b, False, 9000) == []  # a 9 s gap, but the client was playing TTS
        seg.tts_ended(12_000)
        assert seg.next_deadline_ms() == 15_000
        assert seg.poll(14_999) == []
        [utt] = seg.poll(15_000)
        assert (utt.audio, utt.reason) == (a + b, "pause")

    def test_chunk_after_playback_within_pause_ms_continues_the_utterance(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        a, b = mic.opus(5), mic.opus(5)
        seg.feed_chunk(a, False, 0)
        seg.tts_started(500)
        seg.tts_ended(8000)
        assert seg.feed_chunk(b, False, 10_000) == []
        [utt] = seg.feed_chunk(b"", True, 10_100)
        assert utt.audio == a + b

    def test_a_pause_already_elapsed_is_cut_when_playback_starts(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        a = mic.opus(5)
        seg.feed_chunk(a, False, 0)
        [utt] = seg.tts_started(3500)  # the timer was late; playback must not merge two utterances
        assert (utt.audio, utt.reason) == (a, "pause")

    def test_a_stray_tts_ended_does_not_postpone_the_cut(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        seg.feed_chunk(mic.opus(5), False, 0)
        seg.tts_ended(2000)
        assert seg.next_deadline_ms() == 3000


class TestMaxDuration:
    def test_cut_exactly_at_the_limit_and_turn_id_is_shared(self) -> None:
        mic, seg = Mic(), opus_segmenter(max_duration_ms=1000)  # 50 packets
        chunks = [mic.opus(13) for _ in range(9)]  # 117 packets
        out: list[Utterance] = []
        for i, chunk in enumerate(chunks):
            out += seg.feed_chunk(chunk, False, i * WEB_CHUNK_MS)
        assert [(u.index, u.reason, u.duration_ms, packets(u)) for u in out] == [
            (0, "max_duration", 1000, 50),
            (1, "max_duration", 1000, 50),
        ]
        assert all(u.is_max_duration_triggered for u in out)
        assert seg.buffered_ms == 17 * 20
        [closing] = seg.feed_chunk(b"", True, 9 * WEB_CHUNK_MS)
        out.append(closing)
        assert (closing.reason, packets(closing)) == ("final", 17)
        assert [u.turn_id for u in out] == ["turn-0", "turn-0", "turn-0"]
        assert b"".join(u.audio for u in out) == b"".join(chunks)
        # The remainder of a split chunk started when that chunk arrived.
        assert out[1].started_at_ms == 3 * WEB_CHUNK_MS

        [next_turn] = seg.feed_chunk(mic.opus(3), True, 10_000)
        assert next_turn.turn_id is None

    def test_pause_ends_the_turn_with_its_id(self) -> None:
        mic, seg = Mic(), opus_segmenter(max_duration_ms=100)  # 5 packets
        [cut] = seg.feed_chunk(mic.opus(7), False, 0)
        [paused] = seg.poll(3000)
        assert (cut.turn_id, paused.turn_id, paused.reason) == ("turn-0", "turn-0", "pause")
        [later] = seg.feed_chunk(mic.opus(7), False, 4000)
        assert (later.index, later.turn_id) == (2, "turn-2")

    def test_close_ends_the_turn_with_its_id(self) -> None:
        mic, seg = Mic(), opus_segmenter(max_duration_ms=100)
        seg.feed_chunk(mic.opus(7), False, 0)
        [closing] = seg.close(100)
        assert (closing.reason, closing.turn_id) == ("close", "turn-0")

    def test_one_chunk_can_yield_several_cuts(self) -> None:
        mic, seg = Mic(), opus_segmenter(max_duration_ms=100)
        out = seg.feed_chunk(mic.opus(12), True, 0)
        assert [(u.reason, packets(u), u.turn_id) for u in out] == [
            ("max_duration", 5, "turn-0"),
            ("max_duration", 5, "turn-0"),
            ("final", 2, "turn-0"),
        ]

    def test_final_chunk_landing_exactly_on_the_limit_is_a_manual_cut(self) -> None:
        mic, seg = Mic(), opus_segmenter(max_duration_ms=100)
        [utt] = seg.feed_chunk(mic.opus(5), True, 0)
        assert (utt.reason, utt.turn_id, utt.duration_ms) == ("final", None, 100)

    def test_reaching_the_limit_cuts_at_once_and_an_empty_final_ends_the_turn(self) -> None:
        mic, seg = Mic(), opus_segmenter(max_duration_ms=100)
        [utt] = seg.feed_chunk(mic.opus(5), False, 0)
        assert (utt.reason, utt.turn_id) == ("max_duration", "turn-0")
        assert seg.feed_chunk(b"", True, 50) == []
        [after] = seg.feed_chunk(mic.opus(1), True, 100)
        assert (after.index, after.turn_id) == (1, None)

    def test_a_pause_with_nothing_buffered_still_ends_the_turn(self) -> None:
        mic, seg = Mic(), opus_segmenter(max_duration_ms=100)
        seg.feed_chunk(mic.opus(5), False, 0)  # cut at once, buffer now empty
        assert seg.feed_chunk(mic.opus(1), False, 5000) == []
        [utt] = seg.feed_chunk(b"", True, 5100)
        assert utt.turn_id is None

    def test_pcm16_cuts_at_the_sample_boundary(self) -> None:
        mic, seg = Mic(), pcm_segmenter(max_duration_ms=1000, sample_rate=8000)  # 8000 samples
        chunks = [mic.pcm(3000) for _ in range(3)]
        out = [u for i, c in enumerate(chunks) for u in seg.feed_chunk(c, False, i * 375)]
        [cut] = out
        assert (cut.reason, len(cut.audio), cut.duration_ms) == ("max_duration", 16_000, 1000)
        assert cut.audio == b"".join(chunks)[:16_000]
        assert seg.buffered_bytes == 2000
        [rest] = seg.close(2000)
        assert rest.audio == b"".join(chunks)[16_000:]
        assert (rest.duration_ms, rest.turn_id, rest.started_at_ms) == (125, "turn-0", 750)

    def test_pcm16_limit_that_is_not_a_whole_ms(self) -> None:
        seg = pcm_segmenter(max_duration_ms=10, sample_rate=44_100)  # 441 samples
        out = seg.feed_chunk(Mic().pcm(1000), True, 0)
        assert [len(u.audio) // 2 for u in out] == [441, 441, 118]
        assert [u.duration_ms for u in out] == [10, 10, 2]


class TestMaxBuffer:
    def test_pcm16_buffer_over_the_limit_is_split(self) -> None:
        mic, seg = Mic(), pcm_segmenter(max_buffer_bytes=1000)
        audio = mic.pcm(750)
        out = seg.feed_chunk(audio, False, 0)
        assert [(u.reason, len(u.audio), u.turn_id) for u in out] == [("max_buffer", 1000, "turn-0")]
        assert seg.buffered_bytes == 500
        [rest] = seg.feed_chunk(b"", True, 10)
        assert (rest.reason, rest.turn_id) == ("final", "turn-0")
        assert out[0].audio + rest.audio == audio

    def test_a_buffer_exactly_at_the_limit_is_not_cut(self) -> None:
        seg = pcm_segmenter(max_buffer_bytes=1000)
        assert seg.feed_chunk(Mic().pcm(500), False, 0) == []

    def test_opus_splits_at_packet_boundaries_within_the_limit(self) -> None:
        mic, seg = Mic(), opus_segmenter(max_buffer_bytes=500)
        audio = mic.opus(10, size=100)  # 102 bytes per framed packet: 4 fit in 500
        out = seg.feed_chunk(audio, True, 0)
        assert [(u.reason, packets(u), len(u.audio)) for u in out] == [
            ("max_buffer", 4, 408),
            ("max_buffer", 4, 408),
            ("final", 2, 204),
        ]
        assert not any(u.is_max_duration_triggered for u in out)
        assert b"".join(u.audio for u in out) == audio

    def test_whichever_limit_is_tighter_decides(self) -> None:
        mic, seg = Mic(), opus_segmenter(max_buffer_bytes=1000, max_duration_ms=100)
        out = seg.feed_chunk(mic.opus(20, size=100), False, 0)  # 5 packets = 510 bytes per 100 ms
        assert {u.reason for u in out} == {"max_duration"}
        seg2 = opus_segmenter(max_buffer_bytes=300, max_duration_ms=100)
        out2 = seg2.feed_chunk(mic.opus(20, size=100), False, 0)
        assert {u.reason for u in out2} == {"max_buffer"}

    def test_a_packet_larger_than_the_buffer_is_invalid(self) -> None:
        seg = opus_segmenter(max_buffer_bytes=50)
        with pytest.raises(ValueError, match="exceeds max_buffer_bytes=50"):
            seg.feed_chunk(Mic().opus(1, size=60), False, 0)


class TestClose:
    def test_close_flushes_the_buffer(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        a = mic.opus(13)
        seg.feed_chunk(a, False, 0)
        [utt] = seg.close(500)
        assert (utt.index, utt.audio, utt.reason, utt.ended_at_ms) == (0, a, "close", 500)
        assert seg.closed and seg.next_deadline_ms() is None
        assert seg.close(600) == [] and seg.poll(10_000) == []

    def test_close_with_nothing_buffered_makes_nothing(self) -> None:
        assert opus_segmenter().close(0) == []

    def test_audio_after_close_is_refused(self) -> None:
        seg = opus_segmenter()
        seg.close(0)
        with pytest.raises(ProtocolError) as info:
            seg.feed_chunk(Mic().opus(1), False, 1)
        assert info.value.code == "SESSION_CLOSED"


class TestInvalidAudio:
    @pytest.mark.parametrize("bad", [b"\x05\x00ab", b"\x00\x00", b"\x01"])
    def test_bad_opus_raises_and_changes_nothing(self, bad: bytes) -> None:
        mic, seg = Mic(), opus_segmenter()
        a = mic.opus(5)
        seg.feed_chunk(a, False, 0)
        with pytest.raises(ValueError, match="invalid opus framing"):
            seg.feed_chunk(bad, True, 5000)  # would otherwise reveal a pause and be final
        assert (seg.buffered_ms, seg.next_index, seg.next_deadline_ms()) == (100, 0, 3000)
        [utt] = seg.poll(5000)
        assert (utt.index, utt.audio) == (0, a)

    def test_odd_pcm16_raises_and_changes_nothing(self) -> None:
        mic, seg = Mic(), pcm_segmenter()
        seg.feed_chunk(mic.pcm(10), False, 0)
        with pytest.raises(ValueError, match="even byte count"):
            seg.feed_chunk(b"\x01\x02\x03", True, 100)
        assert seg.buffered_bytes == 20 and seg.next_deadline_ms() == 3000


class TestConfig:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"audio_format": "mp3"}, "audio_format"),
            ({"max_duration_ms": 19}, "shorter than one packet"),
            ({"audio_format": "pcm16", "max_duration_ms": 0}, "shorter than one sample"),
            ({"pause_ms": 0}, "pause_ms"),
            ({"sample_rate": 0}, "sample_rate"),
            ({"max_buffer_bytes": 1}, "max_buffer_bytes"),
        ],
    )
    def test_unusable_configs_are_rejected(self, kwargs: dict[str, object], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            SegmenterConfig(**kwargs)  # type: ignore[arg-type]

    def test_defaults_are_the_protocol_defaults(self) -> None:
        config = Segmenter().config
        assert (config.pause_ms, config.max_duration_ms, config.max_buffer_bytes) == (3000, 10_000, 512_000)
        assert (config.audio_format, config.sample_rate) == ("opus", 16_000)


class TestWebClientShape:
    """Opus Plan A, a 13-packet chunk every 256 ms, then an empty ``is_final`` chunk."""

    def _speak(self, seg: Segmenter, mic: Mic, chunks: int) -> tuple[bytes, list[Utterance]]:
        sent, out = [], []
        for i in range(chunks):
            chunk = mic.opus(WEB_CHUNK_PACKETS, size=60)
            sent.append(chunk)
            out += seg.feed_chunk(chunk, False, i * WEB_CHUNK_MS)
        out += seg.feed_chunk(b"", True, chunks * WEB_CHUNK_MS)
        return b"".join(sent), out

    def test_short_turn_is_one_manual_cut(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        audio, [utt] = self._speak(seg, mic, 20)
        assert (utt.index, utt.reason, utt.duration_ms, utt.turn_id) == (0, "final", 5200, None)
        assert utt.audio == audio
        assert (utt.started_at_ms, utt.ended_at_ms) == (0, 20 * WEB_CHUNK_MS)

    def test_long_turn_is_cut_at_ten_seconds(self) -> None:
        mic, seg = Mic(), opus_segmenter()
        audio, out = self._speak(seg, mic, 60)  # 780 packets = 15.6 s
        assert [(u.index, u.reason, u.duration_ms, u.turn_id) for u in out] == [
            (0, "max_duration", 10_000, "turn-0"),
            (1, "final", 5600, "turn-0"),
        ]
        assert b"".join(u.audio for u in out) == audio
        assert duration_ms("opus", out[0].audio) == 10_000


# -- property: nothing lost, nothing duplicated, limits hold ---------------------------------------------


@dataclass(frozen=True)
class Chunk:
    units: int
    is_final: bool
    dt: int


@dataclass(frozen=True)
class Event:
    kind: str  # "poll" | "tts_started" | "tts_ended" | "bad"
    dt: int


dt_st = st.integers(min_value=0, max_value=2500)
events_st = st.lists(
    st.one_of(
        st.builds(Chunk, units=st.integers(0, 30), is_final=st.booleans(), dt=dt_st),
        st.builds(Event, kind=st.sampled_from(["poll", "tts_started", "tts_ended", "bad"]), dt=dt_st),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    audio_format=st.sampled_from(["opus", "pcm16"]),
    max_duration_ms=st.integers(20, 400),
    max_buffer_bytes=st.integers(60, 2000),
    events=events_st,
)
def test_no_audio_lost_or_duplicated_and_limits_hold(
    audio_format: str, max_duration_ms: int, max_buffer_bytes: int, events: list[Chunk | Event]
) -> None:
    config = SegmenterConfig(
        pause_ms=1000,
        max_duration_ms=max_duration_ms,
        max_buffer_bytes=max_buffer_bytes,
        audio_format=audio_format,  # type: ignore[arg-type]
        sample_rate=8000,
    )
    seg, mic = Segmenter(config), Mic()
    sent: list[bytes] = []
    out: list[Utterance] = []
    now = 0
    for event in events:
        now += event.dt
        if isinstance(event, Chunk):
            payload = mic.opus(event.units, size=20) if audio_format == "opus" else mic.pcm(event.units * 7)
            out += seg.feed_chunk(payload, event.is_final, now)
            sent.append(payload)
        elif event.kind == "poll":
            out += seg.poll(now)
        elif event.kind == "tts_started":
            out += seg.tts_started(now)
        elif event.kind == "tts_ended":
            seg.tts_ended(now)
        else:
            with pytest.raises(ValueError):
                seg.feed_chunk(b"\x09\x00x" if audio_format == "opus" else b"x", False, now)
        if isinstance(event, Chunk) or event.kind == "poll":  # the calls that settle a due pause
            deadline = seg.next_deadline_ms()
            assert deadline is None or deadline > now
    out += seg.close(now)

    assert b"".join(u.audio for u in out) == b"".join(sent)
    assert [u.index for u in out] == list(range(len(out)))
    for u in out:
        assert u.audio, "empty utterance"
        assert u.duration_ms == duration_ms(audio_format, u.audio, 8000) <= max_duration_ms
        assert len(u.audio) <= max_buffer_bytes
        assert u.started_at_ms <= u.ended_at_ms
        if u.reason in ("max_duration", "max_buffer"):
            assert u.turn_id is not None
    # A turn is a contiguous run: forced cuts, then exactly one cut that is not forced (or the end).
    runs = [(tid, [u.reason for u in group]) for tid, group in itertools.groupby(out, lambda u: u.turn_id)]
    for tid, reasons in runs:
        if tid is None:
            continue
        assert [r for r in reasons[:-1] if r not in ("max_duration", "max_buffer")] == []
        assert sum(1 for t, _ in runs if t == tid) == 1


# -- property: a resumed segmenter goes on exactly where the lost one stopped ---------------------------


@settings(max_examples=200, deadline=None)
@given(
    audio_format=st.sampled_from(["opus", "pcm16"]),
    max_duration_ms=st.integers(20, 400),
    max_buffer_bytes=st.integers(60, 2000),
    chunks=st.lists(st.tuples(st.integers(0, 30), st.booleans()), min_size=1, max_size=30),
    resume_after=st.integers(0, 40),
)
def test_resume_point_replays_to_the_same_utterances(
    audio_format: str, max_duration_ms: int, max_buffer_bytes: int, chunks: list[tuple[int, bool]],
    resume_after: int,
) -> None:
    """Session resume: after utterance k was dispatched, a new segmenter started at its resume point
    and fed the client's chunks again from ``next_seq`` cuts the same utterances as the lost one
    would have: no audio lost, none twice (pauses aside: they depend on arrival times)."""
    config = SegmenterConfig(pause_ms=10**9, max_duration_ms=max_duration_ms, max_buffer_bytes=max_buffer_bytes,
                             audio_format=audio_format, sample_rate=8000)  # type: ignore[arg-type]
    mic = Mic()
    payloads = [mic.opus(units, size=20) if audio_format == "opus" else mic.pcm(units * 7) for units, _ in chunks]
    first, out = Segmenter(config), []
    for seq, (payload, (_, final)) in enumerate(zip(payloads, chunks, strict=True)):
        out += first.feed_chunk(payload, final, 0, seq=seq)
    if not out:
        return
    k = out[min(resume_after, len(out) - 1)]
    resumed = Segmenter(config, start_index=k.index + 1, start_seq=k.next_seq, skip=k.next_skip)
    again = []
    for seq in range(k.next_seq, len(payloads)):
        again += resumed.feed_chunk(payloads[seq], chunks[seq][1], 0, seq=seq)
    after = [u for u in out if u.index > k.index]
    assert [(u.index, u.audio) for u in again] == [(u.index, u.audio) for u in after]
    assert b"".join(u.audio for u in out if u.index <= k.index) + b"".join(u.audio for u in again) \
        == b"".join(payloads[: len(payloads)])[: sum(len(u.audio) for u in out if u.index <= k.index)
                                                + sum(len(u.audio) for u in again)]
