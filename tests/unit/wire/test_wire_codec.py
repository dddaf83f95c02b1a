"""Bad frames become ProtocolError(INVALID_MESSAGE) with a message that names the problem."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from dragoman.errors import ProtocolError
from dragoman.wire import (
    NodeRegister,
    decode_node,
    decode_node_outbound,
    decode_session,
    decode_session_outbound,
    error_frame,
)

Decoder = Callable[[str | bytes], Any]

JOB_RESULT: dict[str, Any] = {
    "type": "job_result",
    "job_id": "j",
    "attempt_id": 1,
    "node_id": "n",
    "success": True,
}
SESSION_INIT: dict[str, Any] = {"type": "session_init", "src_lang": "zh", "tgt_lang": "en"}
UTTERANCE: dict[str, Any] = {
    "type": "utterance",
    "utterance_index": 0,
    "src_lang": "zh",
    "tgt_lang": "en",
    "audio": "",
}


def _error(decode: Decoder, frame: str | bytes | dict[str, Any]) -> ProtocolError:
    data = json.dumps(frame) if isinstance(frame, dict) else frame
    with pytest.raises(ProtocolError) as info:
        decode(data)
    assert info.value.code == "INVALID_MESSAGE"
    assert str(info.value) == info.value.message
    return info.value


@pytest.mark.parametrize(
    "decode", [decode_node, decode_session, decode_node_outbound, decode_session_outbound]
)
@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        ("{not json", "malformed frame"),
        (b"\xff\xfe", "malformed frame"),
        ("", "malformed frame"),
        ('{"type": "node_register",', "malformed frame"),
        ("[1, 2]", "must be a JSON object, got array"),
        ('"node_register"', "must be a JSON object, got string"),
        ("null", "must be a JSON object, got null"),
        ("{}", "must have a 'type' field"),
        ('{"type": 5}', "'type' field must be a string, got number"),
        ('{"type": null}', "'type' field must be a string, got null"),
        ('{"type": "bogus"}', "unknown message type 'bogus'"),
    ],
)
def test_frames_that_are_not_messages(decode: Decoder, frame: str | bytes, expected: str) -> None:
    assert expected in _error(decode, frame).message


def test_unknown_type_message_is_exact() -> None:
    assert _error(decode_node, {"type": "x"}).message == "unknown message type 'x'"


def test_a_type_from_the_other_plane_is_unknown() -> None:
    assert _error(decode_node, SESSION_INIT).message == "unknown message type 'session_init'"
    assert _error(decode_session, JOB_RESULT).message == "unknown message type 'job_result'"
    assert _error(decode_node, {"type": "job_assign"}).message == "unknown message type 'job_assign'"


def test_unknown_type_echo_is_clipped() -> None:
    message = _error(decode_node, {"type": "x" * 10_000}).message
    assert len(message) < 120 and message.endswith("...'")


def test_malformed_tail_after_an_unknown_type_is_still_a_protocol_error() -> None:
    assert "malformed frame" in _error(decode_node, '{"type": "bogus", "x": ').message


@pytest.mark.parametrize(
    ("decode", "frame", "fragments"),
    [
        # missing required fields
        (decode_node, {"type": "node_heartbeat"}, ["node_heartbeat", "node_id"]),
        (
            decode_node,
            {k: v for k, v in JOB_RESULT.items() if k != "attempt_id"},
            ["job_result", "attempt_id"],
        ),
        (decode_node, {k: v for k, v in JOB_RESULT.items() if k != "success"}, ["job_result", "success"]),
        (decode_node, {"type": "job_ack", "job_id": "j", "attempt_id": 1}, ["job_ack", "node_id"]),
        (decode_session, {"type": "session_init", "src_lang": "zh"}, ["session_init", "tgt_lang"]),
        (decode_session, {"type": "audio_chunk", "seq": 1}, ["audio_chunk", "is_final"]),
        (decode_session, {k: v for k, v in UTTERANCE.items() if k != "audio"}, ["utterance", "audio"]),
        # wrong types
        (decode_node, {**JOB_RESULT, "success": "yes"}, ["job_result", "bool", "$.success"]),
        (decode_node, {**JOB_RESULT, "attempt_id": "1"}, ["job_result", "int", "$.attempt_id"]),
        (decode_node, {"type": "node_register", "hardware": []}, ["node_register", "object", "$.hardware"]),
        (
            decode_node,
            {"type": "node_register", "installed_services": [{"service_id": "a"}]},
            ["node_register", "type", "$.installed_services[0]"],
        ),
        (decode_session, {"type": "audio_chunk", "seq": 1, "is_final": False, "payload": 3}, ["$.payload"]),
        # limits
        (
            decode_node,
            {"type": "node_register", "max_concurrency": 0},
            ["node_register", ">= 1", "$.max_concurrency"],
        ),
        (decode_node, {"type": "node_register", "max_concurrency": 1025}, ["<= 1024", "$.max_concurrency"]),
        (decode_node, {"type": "node_register", "max_concurrency": 2.5}, ["int", "$.max_concurrency"]),
        (
            decode_node,
            {"type": "node_register", "language_pairs": [["zh"]]},
            ["length 2", "$.language_pairs[0]"],
        ),
        (
            decode_node,
            {"type": "node_register", "language_pairs": [["zh", "en", "ja"]]},
            ["length 2", "$.language_pairs[0]"],
        ),
        (
            decode_node,
            {"type": "node_register", "language_pairs": ["zh-en"]},
            ["array", "$.language_pairs[0]"],
        ),
        (
            decode_node,
            {"type": "node_register", "language_pairs": [["", "en"]]},
            ["length >= 1", "$.language_pairs[0][0]"],
        ),
        (
            decode_node,
            {"type": "node_register", "language_capabilities": {"asr_languages": ["x" * 17]}},
            ["length <= 16", "$.language_capabilities.asr_languages[0]"],
        ),
        (decode_node, {**JOB_RESULT, "attempt_id": 0}, [">= 1", "$.attempt_id"]),
        (decode_node, {**JOB_RESULT, "utterance_index": -1}, [">= 0", "$.utterance_index"]),
        (decode_session, {**SESSION_INIT, "tgt_lang": ""}, ["length >= 1", "$.tgt_lang"]),
        (decode_session, {**SESSION_INIT, "src_lang": "a" * 17}, ["length <= 16", "$.src_lang"]),
        (decode_session, {**SESSION_INIT, "tgt_langs": ["en", ""]}, ["$.tgt_langs[1]"]),
        (
            decode_session,
            {**SESSION_INIT, "audio_format": "mp3"},
            ["session_init", "'mp3'", "$.audio_format"],
        ),
        (decode_session, {**SESSION_INIT, "sample_rate": 4000}, [">= 8000", "$.sample_rate"]),
        (decode_session, {**SESSION_INIT, "sample_rate": 96000}, ["<= 48000", "$.sample_rate"]),
        (decode_session, {**UTTERANCE, "audio_format": "wav"}, ["utterance", "'wav'", "$.audio_format"]),
        (decode_session, {**UTTERANCE, "utterance_index": -1}, [">= 0", "$.utterance_index"]),
        (decode_session, {"type": "audio_chunk", "seq": -1, "is_final": False}, [">= 0", "$.seq"]),
    ],
)
def test_invalid_messages_name_the_message_and_the_field(
    decode: Decoder, frame: dict[str, Any], fragments: list[str]
) -> None:
    message = _error(decode, frame).message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_max_concurrency_bounds_are_inclusive() -> None:
    for value in (1, 1024):
        msg = decode_node(json.dumps({"type": "node_register", "max_concurrency": value}))
        assert isinstance(msg, NodeRegister)
        assert msg.max_concurrency == value


def test_error_frame_builds_the_error_message() -> None:
    assert json.loads(error_frame("INVALID_MESSAGE", "bad frame")) == {
        "type": "error",
        "code": "INVALID_MESSAGE",
        "message": "bad frame",
    }
    details = {"utterance_index": 3, "tgt_lang": "en", "job_id": "j1"}
    frame = error_frame("JOB_TIMEOUT", "timed out", details)
    assert json.loads(frame)["details"] == details
    # both planes can read it
    assert decode_session_outbound(frame) == decode_node_outbound(frame)


def test_protocol_error_chains_the_msgspec_cause() -> None:
    error = _error(decode_node, {"type": "node_register", "max_concurrency": 0})
    assert error.__cause__ is not None
