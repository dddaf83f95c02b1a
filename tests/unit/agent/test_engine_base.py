"""The engine contract: job/result shapes, the factory, and the shared language and audio helpers.

Framing, durations and WAV wrapping are dragoman.core.audio's, tested in tests/unit/core/test_audio.py.
"""

from __future__ import annotations

import base64

import pytest

import dragoman.agent.engines as engines
from dragoman.agent.engines.base import (
    Engine,
    EngineErrorCode,
    EngineJob,
    EngineResult,
    make_engine,
    resolve_target,
    same_language,
    whole_pcm16_samples,
)
from dragoman.agent.engines.simulated import SimulatedEngine
from dragoman.errors import ConfigError


def job(**overrides: object) -> EngineJob:
    fields: dict[str, object] = {
        "job_id": "j1",
        "session_id": "s1",
        "utterance_index": 0,
        "src_lang": "zh",
        "tgt_lang": "en",
        "audio": b"",
    }
    fields.update(overrides)
    return EngineJob(**fields)  # type: ignore[arg-type]


def test_exports_are_complete_and_unique() -> None:
    assert len(engines.__all__) == len(set(engines.__all__))
    for name in engines.__all__:
        assert hasattr(engines, name), name


# --- audio helpers ------------------------------------------------------------------------------


def test_whole_pcm16_samples_drops_only_a_torn_final_byte() -> None:
    assert whole_pcm16_samples(b"\x01\x00\x02\x00") == b"\x01\x00\x02\x00"
    assert whole_pcm16_samples(b"\x01\x00\x02") == b"\x01\x00"
    assert whole_pcm16_samples(b"\x01") == b""
    assert whole_pcm16_samples(b"") == b""


# --- languages ----------------------------------------------------------------------------------


def test_same_language_compares_primary_subtags() -> None:
    assert same_language("zh-CN", "zh")
    assert same_language("EN_us", "en")
    assert not same_language("zh", "en")
    assert not same_language(None, "en")


def test_resolve_target_two_way_picks_the_other_language() -> None:
    two_way = job(src_lang="auto", tgt_lang="en", lang_a="zh", lang_b="en")
    assert resolve_target(two_way, "zh") == "en"
    assert resolve_target(two_way, "en") == "zh"
    assert resolve_target(two_way, "en-US") == "zh"
    assert resolve_target(two_way, "ja") == "en"  # outside the pair: the job's target
    assert resolve_target(two_way, None) == "en"
    assert resolve_target(job(tgt_lang="de"), "zh") == "de"


# --- job and result -----------------------------------------------------------------------------


def test_job_from_assign_decodes_audio_and_pipeline() -> None:
    msg = {
        "type": "job_assign",
        "job_id": "j9",
        "attempt_id": 2,
        "session_id": "s9",
        "utterance_index": 4,
        "src_lang": "auto",
        "tgt_lang": "en",
        "pipeline": {"use_asr": True, "use_nmt": True, "use_tts": False, "use_semantic": False},
        "audio": base64.b64encode(b"\x00\x01").decode(),
        "audio_format": "pcm16",
        "sample_rate": 16000,
        "lang_a": "zh",
        "lang_b": "en",
        "trace_id": "t9",
        "unknown_field": "ignored",
    }
    got = EngineJob.from_assign(msg)
    assert got == EngineJob(
        job_id="j9",
        session_id="s9",
        utterance_index=4,
        src_lang="auto",
        tgt_lang="en",
        audio=b"\x00\x01",
        audio_format="pcm16",
        sample_rate=16_000,
        use_tts=False,
        lang_a="zh",
        lang_b="en",
        trace_id="t9",
    )


def test_job_from_assign_rejects_bad_base64() -> None:
    msg = {"job_id": "j", "session_id": "s", "utterance_index": 0, "src_lang": "en", "tgt_lang": "zh"}
    with pytest.raises(ValueError, match="base64"):
        EngineJob.from_assign({**msg, "audio": "not base64!"})


def test_empty_ack_and_failure_shapes() -> None:
    empty = EngineResult.empty("ASR_EMPTY")
    assert empty.success and empty.extra == {"reason": "ASR_EMPTY"}
    assert (empty.text_asr, empty.text_translated, empty.tts_audio) == ("", "", b"")

    failed = EngineResult.failure(EngineErrorCode.PROCESSING_ERROR, "boom", {"service": "nmt"})
    assert not failed.success
    assert failed.error_code == "PROCESSING_ERROR"
    fields = failed.to_job_result_fields()
    assert fields["error"] == {"code": "PROCESSING_ERROR", "message": "boom", "details": {"service": "nmt"}}
    assert fields["text_asr"] == fields["text_translated"] == ""


def test_job_result_fields_encode_tts_audio() -> None:
    result = EngineResult(
        success=True, text_asr="a", text_translated="b", tts_audio=b"RIFF", tts_format="wav"
    )
    fields = result.to_job_result_fields()
    assert fields["tts_audio"] == base64.b64encode(b"RIFF").decode()
    assert "error" not in fields


# --- factory ------------------------------------------------------------------------------------


async def test_make_engine_builds_each_kind() -> None:
    sim = make_engine("simulated", speed=100.0)
    assert isinstance(sim, SimulatedEngine) and isinstance(sim, Engine)
    assert sim.name == "simulated"

    http = make_engine("http", asr_url="http://127.0.0.1:1", opus_decoder=None)
    try:
        assert http.name == "http" and isinstance(http, Engine)
    finally:
        await http.aclose()


def test_make_engine_rejects_unknown_spec() -> None:
    with pytest.raises(ConfigError, match="unknown engine"):
        make_engine("gpu-magic")
