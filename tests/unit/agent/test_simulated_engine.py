"""SimulatedEngine: deterministic text, the latency model, empty acks and seeded failures.

The engine's ``sleep`` is replaced by a recorder, so these tests check the requested delays
without ever waiting.
"""

from __future__ import annotations

import io
import wave

import pytest

from dragoman.agent.engines.base import EngineJob
from dragoman.agent.engines.simulated import SimulatedEngine
from dragoman.core.audio import join_opus

ONE_SECOND_PCM = b"\x00\x00" * 16_000
ONE_SECOND_OPUS = join_opus([b"\xfc\xff\xfe"] * 50)


class SleepRecorder:
    """Stands in for ``asyncio.sleep``: records the seconds asked for and returns at once."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def job(**overrides: object) -> EngineJob:
    fields: dict[str, object] = {
        "job_id": "j1",
        "session_id": "s1",
        "utterance_index": 7,
        "src_lang": "zh",
        "tgt_lang": "en",
        "audio": ONE_SECOND_PCM,
        "audio_format": "pcm16",
        "sample_rate": 16_000,
    }
    fields.update(overrides)
    return EngineJob(**fields)  # type: ignore[arg-type]


def engine(**options: object) -> tuple[SimulatedEngine, SleepRecorder]:
    sleep = SleepRecorder()
    return SimulatedEngine(sleep=sleep, **options), sleep  # type: ignore[arg-type]


async def test_text_is_deterministic_and_names_the_utterance() -> None:
    sim, _ = engine()
    result = await sim.run(job())
    assert result.success and result.error_code is None
    assert result.text_asr == "[sim zh] utterance 7 (1000 ms)"
    assert result.text_translated == "[sim zh->en] utterance 7 (1000 ms)"
    again = await SimulatedEngine(sleep=SleepRecorder()).run(job())
    assert (again.text_asr, again.text_translated) == (result.text_asr, result.text_translated)


@pytest.mark.parametrize(
    ("audio", "audio_format", "sample_rate", "expected_ms"),
    [
        (ONE_SECOND_PCM, "pcm16", 16_000, 1000),
        (ONE_SECOND_PCM, "pcm16", 8_000, 2000),
        (ONE_SECOND_OPUS, "opus", 16_000, 1000),
        (join_opus([b"x"] * 3), "opus", 48_000, 60),
    ],
    ids=["pcm16-16k", "pcm16-8k", "opus-50-packets", "opus-3-packets"],
)
async def test_duration_comes_from_the_audio(
    audio: bytes, audio_format: str, sample_rate: int, expected_ms: int
) -> None:
    sim, _ = engine()
    result = await sim.run(job(audio=audio, audio_format=audio_format, sample_rate=sample_rate))
    assert result.text_asr.endswith(f"({expected_ms} ms)")


async def test_latency_follows_duration_and_speed() -> None:
    slow, slow_sleep = engine(latency_base_ms=50, latency_factor=0.05)
    fast, fast_sleep = engine(latency_base_ms=50, latency_factor=0.05, speed=10.0)
    slow_result = await slow.run(job())
    await slow.run(job(audio=ONE_SECOND_PCM * 3))
    await fast.run(job())

    assert slow_sleep.calls == pytest.approx([0.100, 0.200])  # 50 + 0.05 x 1000, 50 + 0.05 x 3000
    assert fast_sleep.calls == pytest.approx([0.010])
    assert slow_result.processing_time_ms == 100
    timings = slow_result.extra["service_timings"]
    assert set(timings) == {"asr_ms", "nmt_ms", "tts_ms"}


async def test_jitter_is_bounded_and_reproducible_with_a_seed() -> None:
    a, a_sleep = engine(jitter=0.2, seed=42)
    b, b_sleep = engine(jitter=0.2, seed=42)
    for _ in range(20):
        await a.run(job())
        await b.run(job())
    assert a_sleep.calls == b_sleep.calls
    assert all(0.080 <= s <= 0.120 for s in a_sleep.calls)
    assert len(set(a_sleep.calls)) > 1


async def test_real_sleep_at_high_speed_is_quick() -> None:
    result = await SimulatedEngine(speed=1e6).run(job())
    assert result.success and result.processing_time_ms == 0


@pytest.mark.parametrize(("audio", "audio_format"), [(b"", "pcm16"), (b"\x00", "pcm16"), (b"", "opus")])
async def test_zero_duration_audio_gives_an_empty_ack_at_once(audio: bytes, audio_format: str) -> None:
    sim, sleep = engine()
    result = await sim.run(job(audio=audio, audio_format=audio_format))
    assert result.success
    assert result.extra == {"reason": "ASR_EMPTY"}
    assert (result.text_asr, result.text_translated, result.tts_audio) == ("", "", b"")
    assert sleep.calls == []


async def test_tts_is_a_valid_wav_that_grows_with_the_text() -> None:
    sim, _ = engine(tts_max_ms=10_000)
    short = await sim.run(job(utterance_index=1))
    longer = await sim.run(job(utterance_index=123456))
    assert short.tts_format == "wav"
    with wave.open(io.BytesIO(short.tts_audio)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16_000)
        short_frames = w.getnframes()
    with wave.open(io.BytesIO(longer.tts_audio)) as w:
        assert w.getnframes() > short_frames > 0


async def test_pipeline_flags_drop_translation_and_speech() -> None:
    sim, _ = engine()
    no_tts = await sim.run(job(use_tts=False))
    assert no_tts.success and no_tts.tts_audio == b"" and no_tts.tts_format == ""
    no_nmt = await sim.run(job(use_nmt=False))
    assert no_nmt.text_asr and no_nmt.text_translated == ""
    no_asr = await sim.run(job(use_asr=False))
    assert not no_asr.success and no_asr.error_code == "PROCESSING_ERROR"


async def test_two_way_auto_alternates_the_pair() -> None:
    sim, _ = engine()
    base = {"src_lang": "auto", "tgt_lang": "en", "lang_a": "zh", "lang_b": "en"}
    even = await sim.run(job(utterance_index=0, **base))
    odd = await sim.run(job(utterance_index=1, **base))
    assert even.text_translated.startswith("[sim zh->en]")
    assert odd.text_translated.startswith("[sim en->zh]")
    assert (even.extra["detected_language"], odd.extra["detected_language"]) == ("zh", "en")


async def test_fail_rate_one_always_fails_with_no_text() -> None:
    sim, _ = engine(fail_rate=1.0)
    result = await sim.run(job())
    assert not result.success
    assert result.error_code == "PROCESSING_ERROR"
    assert "j1" in (result.error_message or "")
    assert (result.text_asr, result.text_translated, result.tts_audio) == ("", "", b"")


async def test_fail_rate_is_reproducible_with_a_seed() -> None:
    outcomes = []
    for _ in range(2):
        sim, _ = engine(fail_rate=0.5, seed=7)
        outcomes.append([(await sim.run(job())).success for _ in range(40)])
    assert outcomes[0] == outcomes[1]
    assert 5 < outcomes[0].count(False) < 35


@pytest.mark.parametrize(
    ("audio", "message"),
    [
        (b"\x10\x00abc", "packet at byte 0 claims 16 bytes but only 3 remain"),
        (b"\x01\x00a\x07", "truncated length prefix at byte 3"),
        (b"\x01\x00a\x00\x00", "zero-length packet at byte 3"),  # would count 20 ms that are not there
    ],
    ids=["cut-packet", "cut-prefix", "zero-length-packet"],
)
async def test_broken_opus_framing_is_a_processing_error(audio: bytes, message: str) -> None:
    sim, sleep = engine()
    result = await sim.run(job(audio=audio, audio_format="opus"))
    assert not result.success and result.error_code == "PROCESSING_ERROR"
    assert "invalid opus framing" in (result.error_message or "")
    assert message in (result.error_message or "")
    assert sleep.calls == []


@pytest.mark.parametrize("options", [{"speed": 0}, {"jitter": 1.5}, {"fail_rate": -0.1}])
def test_bad_options_are_rejected(options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SimulatedEngine(**options)  # type: ignore[arg-type]
