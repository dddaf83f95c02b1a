"""Generated messages survive encode -> decode unchanged."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dragoman.errors import ProtocolError
from dragoman.wire import (
    MAX_INDEX,
    AudioChunk,
    CapabilityByType,
    InstalledService,
    JobResult,
    LanguageCapabilities,
    Message,
    NodeHeartbeat,
    NodeRegister,
    ResourceUsage,
    SessionInit,
    decode_node,
    decode_session,
    encode,
)

text = st.text(max_size=20)
ids = st.text(min_size=1, max_size=12)
langs = st.from_regex(r"\A[A-Za-z0-9_.\-]{1,16}\Z")
maybe_text = st.none() | text
finite = st.floats(allow_nan=False, allow_infinity=False)
millis = st.integers(min_value=0, max_value=2**53) | st.floats(min_value=0, max_value=1e13, allow_nan=False)

# JSON values as a peer would send them in free-form fields (extra, quality fields).
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | finite | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=10,
)

services = st.lists(
    st.builds(
        InstalledService, service_id=ids, type=text, device=maybe_text, status=maybe_text, version=maybe_text
    ),
    max_size=3,
)
capabilities = st.lists(
    st.builds(CapabilityByType, type=text, ready=st.booleans(), reason=maybe_text),
    max_size=3,
)
language_capabilities = st.builds(
    LanguageCapabilities,
    asr_languages=st.none() | st.lists(langs, max_size=3),
    semantic_languages=st.none() | st.lists(langs, max_size=3),
    tts_languages=st.none() | st.lists(langs, max_size=3),
    semantic_core_ready=st.none() | st.booleans(),
)

node_registers = st.builds(
    NodeRegister,
    node_id=st.none() | ids,
    version=maybe_text,
    capability_schema_version=st.none() | text | st.integers(0, 100),
    installed_services=services,
    capability_by_type=capabilities,
    features_supported=st.dictionaries(text, json_values, max_size=3),
    accept_public_jobs=st.none() | st.booleans(),
    language_capabilities=st.none() | language_capabilities,
    max_concurrency=st.none() | st.integers(1, 1024),
    language_pairs=st.none() | st.lists(st.tuples(langs, langs), max_size=4),
)

node_heartbeats = st.builds(
    NodeHeartbeat,
    node_id=ids,
    timestamp=st.none() | millis,
    resource_usage=st.none()
    | st.builds(
        ResourceUsage,
        cpu_percent=st.none() | finite,
        gpu_percent=st.none() | finite,
        mem_percent=st.none() | finite,
        running_jobs=st.none() | st.integers(0, 1024),
    ),
    installed_services=st.none() | services,
    capability_by_type=st.none() | capabilities,
    language_capabilities=st.none() | language_capabilities,
    draining=st.booleans(),
)

job_results = st.builds(
    JobResult,
    job_id=ids,
    attempt_id=st.integers(1, MAX_INDEX),
    node_id=ids,
    success=st.booleans(),
    session_id=st.none() | ids,
    utterance_index=st.none() | st.integers(0, MAX_INDEX),
    text_asr=maybe_text,
    text_translated=maybe_text,
    tts_audio=maybe_text,
    extra=st.none() | st.dictionaries(text, json_values, max_size=4),
    processing_time_ms=st.none() | millis,
    asr_quality_level=json_values,
    reason_codes=json_values,
    quality_score=json_values,
    rerun_count=json_values,
    segments_meta=json_values,
)

session_inits = st.builds(
    SessionInit,
    src_lang=langs,
    tgt_lang=langs,
    mode=maybe_text,
    lang_a=st.none() | langs,
    lang_b=st.none() | langs,
    tgt_langs=st.none() | st.lists(langs, max_size=4),
    audio_format=st.sampled_from(["opus", "pcm16"]),
    sample_rate=st.integers(8000, 48000),
)

audio_chunks = st.builds(
    AudioChunk,
    seq=st.integers(0, MAX_INDEX),
    is_final=st.booleans(),
    session_id=st.none() | ids,
    payload=maybe_text,
    client_timestamp_ms=st.none() | millis,
)


@given(st.one_of(node_registers, node_heartbeats, job_results))
def test_node_messages_round_trip(msg: Message) -> None:
    assert decode_node(encode(msg)) == msg


@given(st.one_of(session_inits, audio_chunks))
def test_session_messages_round_trip(msg: Message) -> None:
    assert decode_session(encode(msg)) == msg


@given(st.integers(MAX_INDEX + 1, 2**63 - 1) | st.integers(-(2**63), -1))
def test_numbers_past_the_bound_are_refused_naming_the_field(n: int) -> None:
    """Poison numbers: an index Lua's JSON would turn into a float never gets past the edge."""
    for frame, field in ((f'{{"type":"audio_chunk","seq":{n},"is_final":false}}', "$.seq"),
                         (f'{{"type":"utterance","utterance_index":{n},"src_lang":"zh","tgt_lang":"en",'
                          f'"audio":""}}', "$.utterance_index")):
        with pytest.raises(ProtocolError, match=re.escape(field)):
            decode_session(frame)
    with pytest.raises(ProtocolError, match=re.escape("$.attempt_id")):
        decode_node(f'{{"type":"job_result","job_id":"j","attempt_id":{n},"node_id":"n","success":true}}')


@given(st.text(min_size=1, max_size=16).filter(lambda t: not re.fullmatch(r"[A-Za-z0-9_.\-]+", t)))
def test_language_codes_with_separators_are_refused(code: str) -> None:
    """A language becomes part of a pool id and a key: spaces, ':' '>' '{' and the like never pass."""
    import json

    with pytest.raises(ProtocolError, match="tgt_lang"):
        decode_session(json.dumps({"type": "session_init", "src_lang": "zh", "tgt_lang": code}))
