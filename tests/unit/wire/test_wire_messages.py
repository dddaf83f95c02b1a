"""Every message survives encode -> decode, and the message set matches PROTOCOL.md."""

from __future__ import annotations

import json
from typing import Any, get_args

import msgspec
import pytest

from dragoman.wire import (
    PROTOCOL_VERSION,
    QUALITY_FIELDS,
    AsrPartial,
    AudioChunk,
    Backpressure,
    CapabilityByType,
    ClientHeartbeat,
    ErrorInfo,
    ErrorMessage,
    GpuInfo,
    Hardware,
    InstalledService,
    JobAck,
    JobAssign,
    JobCancel,
    JobResult,
    JobStarted,
    LanguageCapabilities,
    Message,
    MissingResult,
    NodeAsrPartial,
    NodeError,
    NodeHeartbeat,
    NodeInbound,
    NodeOutbound,
    NodeRegister,
    NodeRegisterAck,
    Pipeline,
    ResourceUsage,
    RoomCreate,
    RoomCreateAck,
    RoomError,
    RoomExpired,
    RoomJoin,
    RoomLeave,
    RoomMember,
    RoomMembers,
    RoomRawVoicePreference,
    ServerHeartbeat,
    SessionClose,
    SessionCloseAck,
    SessionInbound,
    SessionInit,
    SessionInitAck,
    SessionOutbound,
    TranslationResult,
    TtsPlayEnded,
    TtsStarted,
    UiEvent,
    Utterance,
    WebrtcAnswer,
    WebrtcIce,
    WebrtcOffer,
    decode_node,
    decode_node_outbound,
    decode_session,
    decode_session_outbound,
    encode,
)

# The `type` strings of PROTOCOL.md, by endpoint and direction, copied by hand on purpose: a message
# added to or dropped from a union without touching the protocol fails here.
PROTOCOL_TAGS: dict[str, set[str]] = {
    "node_inbound": {
        "node_register",
        "node_heartbeat",
        "job_ack",
        "job_started",
        "asr_partial",
        "job_result",
        "node_error",
    },
    "node_outbound": {"node_register_ack", "job_assign", "job_cancel", "error"},
    "session_inbound": {
        "session_init",
        "audio_chunk",
        "utterance",
        "client_heartbeat",
        "tts_started",
        "tts_play_ended",
        "session_close",
        "room_create",
        "room_join",
        "room_leave",
        "room_raw_voice_preference",
        "webrtc_offer",
        "webrtc_answer",
        "webrtc_ice",
    },
    "session_outbound": {
        "session_init_ack",
        "translation_result",
        "asr_partial",
        "missing_result",
        "ui_event",
        "error",
        "backpressure",
        "server_heartbeat",
        "session_close_ack",
        "room_create_ack",
        "room_members",
        "room_error",
        "room_expired",
        "webrtc_offer",
        "webrtc_answer",
        "webrtc_ice",
    },
}

UNIONS = {
    "node_inbound": (NodeInbound, decode_node),
    "node_outbound": (NodeOutbound, decode_node_outbound),
    "session_inbound": (SessionInbound, decode_session),
    "session_outbound": (SessionOutbound, decode_session_outbound),
}

SERVICES = [
    InstalledService(service_id="whisper", type="asr", device="gpu", status="running", version="1.2"),
    InstalledService(service_id="lexicon-1", type="lexicon", device="cpu", status="starting"),
]
CAPABILITIES = [
    CapabilityByType(type="asr", ready=True),
    CapabilityByType(type="tts", ready=False, reason="x"),
]
LANGS = LanguageCapabilities(
    asr_languages=["zh", "en"],
    semantic_languages=["zh", "en"],
    tts_languages=["en"],
    semantic_core_ready=True,
)
QUALITY: dict[str, Any] = {
    "asr_quality_level": "good",
    "reason_codes": ["LOW_SNR"],
    "quality_score": 0.87,
    "rerun_count": 1,
    "segments_meta": {"segments": [{"start": 0, "end": 1.5}]},
}

# One instance per (direction, message), with every field set away from its default so that
# omit_defaults cannot hide a field that fails to round-trip.
SAMPLES: list[tuple[str, Message]] = [
    (
        "node_inbound",
        NodeRegister(
            node_id="node-1",
            version="2.0.0",
            capability_schema_version="2.0",
            platform="linux",
            hardware=Hardware(cpu_cores=16, memory_gb=31.5, gpus=[GpuInfo(name="RTX 4090", memory_gb=24.0)]),
            installed_models=["m2m100", {"model_id": "whisper-large"}],
            installed_services=SERVICES,
            capability_by_type=CAPABILITIES,
            features_supported={"emotion_detection": False, "speaker_id": True},
            accept_public_jobs=True,
            language_capabilities=LANGS,
            max_concurrency=8,
            language_pairs=[("zh", "en"), ("en", "zh")],
        ),
    ),
    (
        "node_inbound",
        NodeHeartbeat(
            node_id="node-1",
            timestamp=1_700_000_000_000,
            resource_usage=ResourceUsage(
                cpu_percent=12.5, gpu_percent=40.0, gpu_mem_percent=55.5, mem_percent=33.0, running_jobs=2
            ),
            installed_services=SERVICES,
            capability_by_type=CAPABILITIES,
            language_capabilities=LANGS,
            draining=True,
        ),
    ),
    ("node_inbound", JobAck(job_id="j1", attempt_id=1, node_id="node-1", session_id="s1", trace_id="t1")),
    ("node_inbound", JobStarted(job_id="j1", attempt_id=2, node_id="node-1", session_id="s1", trace_id="t1")),
    (
        "node_inbound",
        NodeAsrPartial(
            job_id="j1",
            node_id="node-1",
            text="ni hao",
            is_final=True,
            session_id="s1",
            utterance_index=3,
            trace_id="t1",
        ),
    ),
    (
        "node_inbound",
        JobResult(
            job_id="j1",
            attempt_id=1,
            node_id="node-1",
            success=False,
            session_id="s1",
            utterance_index=3,
            trace_id="t1",
            text_asr="你好",
            text_translated="hello",
            tts_audio="AAEC",
            tts_format="opus",
            extra={"reason": "X", "service_timings": {"asr_ms": 120}, "language_probability": 0.98},
            processing_time_ms=341.5,
            error=ErrorInfo(code="PROCESSING_ERROR", message="boom", details={"stage": "tts"}),
            **QUALITY,
        ),
    ),
    (
        "node_inbound",
        NodeError(node_id="node-1", code="MODEL_NOT_AVAILABLE", message="no tts", details={"a": 1}),
    ),
    (
        "node_outbound",
        NodeRegisterAck(
            node_id="node-1", message="ok", status="ready", heartbeat_interval_ms=15000, lease_ms=60000
        ),
    ),
    (
        "node_outbound",
        JobAssign(
            job_id="j1",
            attempt_id=2,
            session_id="s1",
            utterance_index=0,
            src_lang="auto",
            tgt_lang="en",
            pipeline=Pipeline(use_asr=True, use_nmt=True, use_tts=False, use_semantic=True, use_tone=True),
            audio="AAEC",
            audio_format="pcm16",
            sample_rate=16000,
            trace_id="t1",
            dialect="yue",
            features={"speaker_id": True},
            mode="two_way_auto",
            lang_a="zh",
            lang_b="en",
            auto_langs=["zh", "en"],
            enable_streaming_asr=True,
            partial_update_interval_ms=500,
            padding_ms=220,
            is_manual_cut=True,
            is_timeout_triggered=True,
            is_max_duration_triggered=True,
            turn_id="turn-1",
        ),
    ),
    ("node_outbound", JobCancel(job_id="j1", trace_id="t1", reason="lease_expired")),
    ("node_outbound", ErrorMessage(code="INVALID_MESSAGE", message="bad", details={"field": "x"})),
    (
        "session_inbound",
        SessionInit(
            client_version="web-1.0",
            platform="web",
            src_lang="auto",
            tgt_lang="en",
            dialect="yue",
            features={"x": 1},
            pairing_code="123456",
            tenant_id="acme",
            mode="two_way_auto",
            lang_a="zh",
            lang_b="en",
            auto_langs=["zh", "en"],
            trace_id="t1",
            tgt_langs=["en", "ja"],
            audio_format="pcm16",
            sample_rate=48000,
            resume_session_id="s0",
            resume_token="t0",
        ),
    ),
    (
        "session_inbound",
        AudioChunk(session_id="s1", seq=7, is_final=True, payload="AAEC", client_timestamp_ms=12.25),
    ),
    (
        "session_inbound",
        Utterance(
            session_id="s1",
            utterance_index=4,
            manual_cut=True,
            src_lang="zh",
            tgt_lang="en",
            audio="AAEC",
            audio_format="pcm16",
            sample_rate=8000,
            trace_id="t1",
            pipeline=Pipeline(use_tts=False),
            dialect="yue",
            mode="one_way",
            lang_a="zh",
            lang_b="en",
            auto_langs=["zh"],
            tgt_langs=["en", "de"],
        ),
    ),
    ("session_inbound", ClientHeartbeat(session_id="s1", timestamp=1_700_000_000_000)),
    ("session_inbound", TtsStarted(session_id="s1", trace_id="t1", group_id="g1", ts_start_ms=10)),
    ("session_inbound", TtsPlayEnded(session_id="s1", trace_id="t1", group_id="g1", ts_end_ms=20)),
    ("session_inbound", SessionClose(session_id="s1", reason="user")),
    (
        "session_outbound",
        SessionInitAck(
            session_id="s1",
            assigned_node_id="node-1",
            message="ok",
            trace_id="t1",
            protocol_version=PROTOCOL_VERSION,
            use_binary_frame=False,
            negotiated_codec="opus",
            negotiated_audio_format="opus",
            negotiated_sample_rate=16000,
            negotiated_channel_count=1,
            resumed=True,
            resume_from_seq=7,
            resume_from_utterance_index=3,
            resume_token="t1",
        ),
    ),
    (
        "session_outbound",
        TranslationResult(
            session_id="s1",
            utterance_index=2,
            job_id="j1",
            text_asr="你好",
            text_translated="hello",
            tts_audio="AAEC",
            tts_format="opus",
            extra={"reason": None},
            trace_id="t1",
            service_timings={"asr_ms": 1},
            network_timings={"rtt_ms": 2},
            scheduler_sent_at_ms=1_700_000_000_000,
            tgt_lang="en",
            **QUALITY,
        ),
    ),
    (
        "session_outbound",
        AsrPartial(session_id="s1", utterance_index=2, job_id="j1", text="ni", is_final=False, trace_id="t1"),
    ),
    (
        "session_outbound",
        MissingResult(
            session_id="s1", utterance_index=2, reason="gap_timeout", created_at_ms=5, trace_id="t1", tgt_lang="en"
        ),
    ),
    (
        "session_outbound",
        UiEvent(
            trace_id="t1",
            session_id="s1",
            job_id="j1",
            utterance_index=2,
            event="ERROR",
            elapsed_ms=30,
            status="error",
            error_code="JOB_TIMEOUT",
            hint="retry",
        ),
    ),
    (
        "session_outbound",
        ErrorMessage(code="NO_AVAILABLE_NODE", message="none", details={"utterance_index": 2}),
    ),
    ("session_outbound", Backpressure(action="BUSY", resume_after_ms=500, message="queue full")),
    ("session_outbound", ServerHeartbeat(session_id="s1", timestamp=1_700_000_000_000)),
    ("session_outbound", SessionCloseAck(session_id="s1")),
    # rooms: the existing web client's messages (PROTOCOL.md, Rooms)
    ("session_inbound", RoomCreate(client_ts=1_700_000_000_000, display_name="Ann", preferred_lang="zh")),
    ("session_inbound", RoomJoin(room_code="123456", display_name="Bo", preferred_lang="en")),
    ("session_inbound", RoomLeave(room_code="123456")),
    ("session_inbound", RoomRawVoicePreference(room_code="123456", target_session_id="s2", receive_raw_voice=False)),
    ("session_inbound", WebrtcOffer(room_code="123456", to="s2", sdp={"type": "offer", "sdp": "v=0"})),
    ("session_inbound", WebrtcAnswer(room_code="123456", to="s2", sdp={"type": "answer", "sdp": "v=0"})),
    ("session_inbound", WebrtcIce(room_code="123456", to="s2", candidate={"candidate": "c", "sdpMid": "0"})),
    ("session_outbound", RoomCreateAck(room_code="123456", room_id="r1")),
    ("session_outbound", RoomMembers(room_code="123456", members=[RoomMember(
        participant_id="s1", session_id="s1", joined_at=5, display_name="Ann", preferred_lang="zh",
        raw_voice_preferences={"s2": False})])),
    ("session_outbound", RoomError(code="ROOM_FULL", message="16 members")),
    ("session_outbound", RoomExpired(room_code="123456", message="no speech for 30 minutes")),
    ("session_outbound", WebrtcOffer(room_code="123456", to="s1", sdp={"type": "offer"})),
    ("session_outbound", WebrtcAnswer(room_code="123456", to="s1", sdp={"type": "answer"})),
    ("session_outbound", WebrtcIce(room_code="123456", to="s1", candidate={"candidate": "c"})),
]


def _tag(cls: type[Message]) -> str:
    return str(cls.__struct_config__.tag)


def _sample_id(sample: tuple[str, Message]) -> str:
    return f"{sample[0]}:{_tag(type(sample[1]))}"


@pytest.mark.parametrize("direction", sorted(PROTOCOL_TAGS))
def test_unions_carry_exactly_the_protocol_message_set(direction: str) -> None:
    union, _ = UNIONS[direction]
    assert {_tag(cls) for cls in get_args(union)} == PROTOCOL_TAGS[direction]


def test_every_message_of_every_direction_has_a_sample() -> None:
    covered = {(direction, _tag(type(msg))) for direction, msg in SAMPLES}
    expected = {(direction, tag) for direction, tags in PROTOCOL_TAGS.items() for tag in tags}
    assert covered == expected


@pytest.mark.parametrize("sample", SAMPLES, ids=_sample_id)
def test_round_trip(sample: tuple[str, Message]) -> None:
    direction, msg = sample
    _, decode = UNIONS[direction]
    text = encode(msg)
    assert isinstance(text, str)
    assert json.loads(text)["type"] == _tag(type(msg))
    assert decode(text) == msg
    assert decode(text.encode()) == msg


@pytest.mark.parametrize("sample", SAMPLES, ids=_sample_id)
def test_fully_populated_samples_put_every_field_on_the_wire(sample: tuple[str, Message]) -> None:
    _, msg = sample
    assert set(json.loads(encode(msg))) == {"type", *msg.__struct_fields__}


def test_the_two_asr_partials_share_a_tag_but_belong_to_different_planes() -> None:
    frame = encode(
        AsrPartial(session_id="s", utterance_index=0, job_id="j", text="a", is_final=False, trace_id="t")
    )
    assert isinstance(decode_session_outbound(frame), AsrPartial)
    node_frame = encode(NodeAsrPartial(job_id="j", node_id="n", text="a"))
    assert isinstance(decode_node(node_frame), NodeAsrPartial)


def test_unset_optional_fields_are_left_off_the_wire() -> None:
    assert json.loads(encode(JobCancel(job_id="j1"))) == {"type": "job_cancel", "job_id": "j1"}
    assert json.loads(encode(NodeHeartbeat(node_id="n"))) == {"type": "node_heartbeat", "node_id": "n"}


def test_fields_the_existing_peers_read_are_sent_even_when_falsy() -> None:
    ack = json.loads(
        encode(
            SessionInitAck(
                session_id="s1",
                message="",
                trace_id="t1",
                protocol_version=PROTOCOL_VERSION,
                use_binary_frame=False,
                negotiated_codec="opus",
                negotiated_audio_format="opus",
                negotiated_sample_rate=16000,
                negotiated_channel_count=1,
            )
        )
    )
    assert ack["use_binary_frame"] is False
    assert ack["protocol_version"] == "1.0"
    assert "assigned_node_id" not in ack

    result = json.loads(
        encode(
            TranslationResult(
                session_id="s1",
                utterance_index=0,
                job_id="j1",
                text_asr="",
                text_translated="",
                tts_audio="",
                tts_format="",
                trace_id="t1",
            )
        )
    )
    assert result["tts_audio"] == "" and result["text_translated"] == ""


def test_job_assign_sends_every_pipeline_key() -> None:
    assign = JobAssign(
        job_id="j",
        attempt_id=1,
        session_id="s",
        utterance_index=0,
        src_lang="zh",
        tgt_lang="en",
        pipeline=Pipeline(),
        audio="",
        audio_format="opus",
        sample_rate=16000,
        trace_id="t",
    )
    assert json.loads(encode(assign))["pipeline"] == {
        "use_asr": True,
        "use_nmt": True,
        "use_tts": True,
        "use_semantic": False,
        "use_tone": False,
    }


def test_quality_fields_exist_on_both_job_result_and_translation_result() -> None:
    for cls in (JobResult, TranslationResult):
        assert set(QUALITY_FIELDS) <= set(cls.__struct_fields__)


def test_session_init_defaults_follow_the_protocol() -> None:
    msg = decode_session('{"type":"session_init","src_lang":"zh","tgt_lang":"en"}')
    assert isinstance(msg, SessionInit)
    assert (msg.audio_format, msg.sample_rate, msg.tgt_langs, msg.mode) == ("opus", 16000, None, None)


def test_existing_web_client_two_way_session_init_decodes() -> None:
    frame: dict[str, Any] = {
        "type": "session_init",
        "client_version": "web-client-v1.0",
        "platform": "web",
        "src_lang": "auto",
        "tgt_lang": "en",
        "dialect": None,
        "features": {},
        "pairing_code": None,
        "mode": "two_way_auto",
        "lang_a": "zh",
        "lang_b": "en",
        "auto_langs": ["zh", "en"],
        "enable_streaming_asr": True,
        "trace_id": "trace-abc",
    }
    msg = decode_session(json.dumps(frame))
    assert isinstance(msg, SessionInit)
    assert (msg.src_lang, msg.lang_a, msg.lang_b, msg.mode) == ("auto", "zh", "en", "two_way_auto")


# A node_register shaped like the existing network's worker: no max_concurrency, no language_pairs,
# a service type this scheduler does not know, languages only in language_capabilities, and keys
# of its own that we do not model.
EXISTING_WORKER_REGISTER: dict[str, Any] = {
    "type": "node_register",
    "node_id": None,
    "version": "1.4.2",
    "capability_schema_version": "2.0",
    "platform": "windows",
    "hardware": {
        "cpu_cores": 12,
        "memory_gb": 32,
        "gpus": [{"name": "NVIDIA GeForce RTX 4070", "memory_gb": 12, "driver": "551.23"}],
    },
    "installed_models": [],
    "installed_services": [
        {
            "service_id": "faster-whisper-vad",
            "type": "asr",
            "device": "gpu",
            "status": "running",
            "version": "1.0.0",
        },
        {"service_id": "nmt-m2m100", "type": "nmt", "device": "gpu", "status": "running"},
        {"service_id": "piper-tts", "type": "tts", "device": "cpu", "status": "stopped"},
        {"service_id": "semantic-repair-zh", "type": "semantic", "device": "gpu", "status": "running"},
        {
            "service_id": "phonetic-lexicon",
            "type": "lexicon",
            "device": "cpu",
            "status": "running",
            "port": 5016,
        },
    ],
    "capability_by_type": [
        {"type": "asr", "ready": True, "ready_impl_ids": ["faster-whisper-vad"]},
        {"type": "nmt", "ready": True},
        {"type": "tts", "ready": False, "reason": "no_running_impl"},
        {"type": "semantic", "ready": True},
        {"type": "lexicon", "ready": True},
    ],
    "features_supported": {
        "emotion_detection": False,
        "voice_style_detection": False,
        "speech_rate_control": True,
    },
    "accept_public_jobs": True,
    "language_capabilities": {
        "asr_languages": ["zh", "en"],
        "semantic_languages": ["zh", "en"],
        "tts_languages": ["zh", "en"],
        "semantic_core_ready": True,
        "supported_language_pairs": [{"src": "zh", "tgt": "en"}],
        "nmt_capabilities": [{"model_id": "m2m100", "languages": ["zh", "en"], "rule": "any_to_any"}],
    },
    "node_fingerprint": "3f9c",
    "pool_hint": {"preferred": []},
}


def test_existing_worker_node_register_decodes() -> None:
    msg = decode_node(json.dumps(EXISTING_WORKER_REGISTER))
    assert isinstance(msg, NodeRegister)
    assert msg.node_id is None
    assert msg.max_concurrency is None and msg.language_pairs is None
    assert [s.type for s in msg.installed_services] == ["asr", "nmt", "tts", "semantic", "lexicon"]
    assert msg.hardware is not None and msg.hardware.gpus == [
        GpuInfo(name="NVIDIA GeForce RTX 4070", memory_gb=12)
    ]
    assert msg.language_capabilities is not None
    assert msg.language_capabilities.asr_languages == ["zh", "en"]
    assert msg.effective_language_pairs() == [("zh", "zh"), ("zh", "en"), ("en", "zh"), ("en", "en")]


def test_minimal_node_register_decodes_to_defaults() -> None:
    msg = decode_node('{"type":"node_register"}')
    assert msg == NodeRegister()
    assert msg.installed_services == [] and msg.effective_language_pairs() == []


def test_explicit_language_pairs_win_over_capabilities_and_are_deduplicated() -> None:
    msg = decode_node(
        json.dumps(
            {
                **EXISTING_WORKER_REGISTER,
                "max_concurrency": 4,
                "language_pairs": [["zh", "en"], ["zh", "en"], ["en", "zh"]],
            }
        )
    )
    assert isinstance(msg, NodeRegister)
    assert msg.max_concurrency == 4
    assert msg.effective_language_pairs() == [("zh", "en"), ("en", "zh")]


def test_existing_worker_heartbeat_decodes() -> None:
    frame = {
        "type": "node_heartbeat",
        "node_id": "node-7f3a",
        "timestamp": 1_700_000_000_123,
        "resource_usage": {"cpu_percent": 23.4, "gpu_percent": None, "mem_percent": 61, "running_jobs": 1},
        "installed_services": EXISTING_WORKER_REGISTER["installed_services"],
        "capability_by_type": EXISTING_WORKER_REGISTER["capability_by_type"],
        "processing_metrics": {"avg_ms": 812},
    }
    msg = decode_node(json.dumps(frame))
    assert isinstance(msg, NodeHeartbeat)
    assert msg.draining is False and msg.language_capabilities is None
    assert msg.resource_usage == ResourceUsage(cpu_percent=23.4, mem_percent=61, running_jobs=1)


def test_existing_worker_empty_ack_job_result_decodes() -> None:
    frame = {
        "type": "job_result",
        "job_id": "job-1",
        "attempt_id": 1,
        "node_id": "node-7f3a",
        "session_id": "s-1",
        "utterance_index": 0,
        "trace_id": "t-1",
        "success": True,
        "text_asr": "",
        "text_translated": "",
        "tts_audio": "",
        "extra": {"reason": "ASR_EMPTY", "language_probability": None},
        "processing_time_ms": 35,
        "error": None,
        "asr_quality_level": None,
    }
    msg = decode_node(json.dumps(frame))
    assert isinstance(msg, JobResult)
    assert msg.extra_reason == "ASR_EMPTY"
    assert msg.processing_time_ms == 35 and isinstance(msg.processing_time_ms, int)


def test_job_result_error_object_missing_keys_still_decodes() -> None:
    frame = '{"type":"job_result","job_id":"j","attempt_id":1,"node_id":"n","success":false,"error":{"message":"x"}}'
    msg = decode_node(frame)
    assert isinstance(msg, JobResult)
    assert msg.error == ErrorInfo(code="PROCESSING_ERROR", message="x")
    assert msg.extra_reason is None


def test_structs_accept_null_for_optional_fields() -> None:
    frame = (
        '{"type":"audio_chunk","session_id":null,"seq":0,"is_final":false,'
        '"payload":null,"client_timestamp_ms":null}'
    )
    assert decode_session(frame) == AudioChunk(seq=0, is_final=False)


def test_message_base_is_tagged_on_type() -> None:
    assert Message.__struct_config__.tag_field == "type"
    assert msgspec.structs.fields(NodeRegister)  # a real Struct, introspectable by msgspec
