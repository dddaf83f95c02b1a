"""HttpEngine's rules for odd answers and inputs, over an in-memory transport (no sockets).

The real-socket behaviour (stand-in services, a dead port) is in tests/integration/agent.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Sequence

import httpx
import pytest

from dragoman.agent.engines.base import EngineJob
from dragoman.agent.engines.http import HttpEngine, OpuslibDecoder, load_opus_decoder
from dragoman.core.audio import join_opus, wav_bytes

WAV = wav_bytes(b"\x00\x00" * 160, 16_000)
PCM = b"\x01\x00" * 1600
Handler = Callable[[httpx.Request], httpx.Response]


def job(**overrides: object) -> EngineJob:
    fields: dict[str, object] = {
        "job_id": "j1",
        "session_id": "s1",
        "utterance_index": 0,
        "src_lang": "zh",
        "tgt_lang": "en",
        "audio": PCM,
        "audio_format": "pcm16",
        "sample_rate": 16_000,
    }
    fields.update(overrides)
    return EngineJob(**fields)  # type: ignore[arg-type]


class Services:
    """Routes by path to per-service handlers and keeps every request it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, object]]] = []
        self.asr: Handler = lambda r: httpx.Response(200, json={"text": "ni hao", "language": "zh"})
        self.nmt: Handler = lambda r: httpx.Response(200, json={"ok": True, "text": "hello"})
        self.tts: Handler = lambda r: httpx.Response(200, content=WAV)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.seen.append((request.url.path, json.loads(request.content)))
        handler = {"/utterance": self.asr, "/v1/translate": self.nmt, "/tts": self.tts}[request.url.path]
        return handler(request)

    def paths(self) -> list[str]:
        return [path for path, _ in self.seen]


@pytest.fixture
def services() -> Services:
    return Services()


def make_engine(services: Services, **options: object) -> HttpEngine:
    client = httpx.AsyncClient(transport=httpx.MockTransport(services))
    return HttpEngine(client=client, opus_decoder=None, **options)  # type: ignore[arg-type]


async def test_malformed_asr_json_is_a_processing_error(services: Services) -> None:
    services.asr = lambda r: httpx.Response(200, content=b"{not json")
    result = await make_engine(services).run(job())
    assert not result.success and result.error_code == "PROCESSING_ERROR"
    assert "asr" in (result.error_message or "") and "malformed JSON" in (result.error_message or "")
    assert services.paths() == ["/utterance"]


async def test_asr_answer_without_text_is_a_processing_error(services: Services) -> None:
    services.asr = lambda r: httpx.Response(200, json={"duration": 1.0})
    result = await make_engine(services).run(job())
    assert not result.success and result.error_code == "PROCESSING_ERROR"
    assert result.text_asr == ""


async def test_timeout_is_node_unavailable(services: Services) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("too slow", request=request)

    services.nmt = slow
    result = await make_engine(services).run(job())
    assert not result.success and result.error_code == "NODE_UNAVAILABLE"
    assert "nmt" in (result.error_message or "") and "timed out" in (result.error_message or "")
    assert result.error_details == {"service": "nmt", "url": "http://127.0.0.1:5008/v1/translate"}
    assert (result.text_asr, result.text_translated) == ("", "")


async def test_non_wav_tts_answer_is_a_processing_error(services: Services) -> None:
    services.tts = lambda r: httpx.Response(200, json={"error": "no voice"})
    result = await make_engine(services).run(job())
    assert not result.success and result.error_code == "PROCESSING_ERROR"
    assert "tts" in (result.error_message or "")


async def test_pcm16_at_another_rate_fails_before_any_request(services: Services) -> None:
    result = await make_engine(services).run(job(sample_rate=48_000))
    assert not result.success and result.error_code == "UNSUPPORTED_SAMPLE_RATE"
    assert "16000" in (result.error_message or "")
    assert services.seen == []


async def test_pluggable_opus_decoder_feeds_asr(services: Services) -> None:
    class FakeDecoder:
        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        def decode(self, packets: Sequence[bytes], sample_rate: int) -> bytes:
            self.calls.append((len(packets), sample_rate))
            return b"\x02\x00" * 320 * len(packets)

    decoder = FakeDecoder()
    engine = make_engine(services)
    engine.opus_decoder = decoder
    opus = join_opus([b"p"] * 5)
    result = await engine.run(job(audio=opus, audio_format="opus", sample_rate=48_000))
    assert result.success
    assert decoder.calls == [(5, 16_000)]
    asr_body = services.seen[0][1]
    assert base64.b64decode(str(asr_body["audio"])) == b"\x02\x00" * 1600
    assert asr_body["audio_format"] == "pcm16"


async def test_zero_length_opus_packet_fails_before_any_request(services: Services) -> None:
    engine = make_engine(services)
    engine.opus_decoder = OpuslibDecoder(object())  # never reached: framing is checked first
    result = await engine.run(job(audio=b"\x01\x00p\x00\x00", audio_format="opus"))
    assert not result.success and result.error_code == "PROCESSING_ERROR"
    assert "zero-length packet at byte 3" in (result.error_message or "")
    assert services.seen == []


def test_auto_opus_decoder_prefers_the_bundled_binding() -> None:
    decoder = load_opus_decoder()
    assert isinstance(decoder, OpuslibDecoder)
    assert decoder.module.__name__ == "opuslib_next"


def test_opus_decoder_loader_falls_back_in_order_then_gives_none() -> None:
    decoder = load_opus_decoder(("dragoman_no_such_binding", "opuslib_next"))
    assert isinstance(decoder, OpuslibDecoder) and decoder.module.__name__ == "opuslib_next"
    assert load_opus_decoder(("dragoman_no_such_binding", "dragoman_nor_this_one")) is None


async def test_engine_default_loads_the_bundled_opus_decoder() -> None:
    engine = HttpEngine()
    try:
        assert isinstance(engine.opus_decoder, OpuslibDecoder)
        assert engine.opus_decoder.module.__name__ == "opuslib_next"
    finally:
        await engine.aclose()


async def test_same_language_skips_mt(services: Services) -> None:
    services.asr = lambda r: httpx.Response(200, json={"text": "hello there", "language": "en"})
    result = await make_engine(services).run(job(src_lang="auto", tgt_lang="en"))
    assert result.success and result.text_translated == "hello there"
    assert services.paths() == ["/utterance", "/tts"]


async def test_without_nmt_speaks_the_recognised_text(services: Services) -> None:
    result = await make_engine(services).run(job(use_nmt=False))
    assert result.success and result.text_asr == "ni hao" and result.text_translated == ""
    assert services.seen[-1] == ("/tts", {"text": "ni hao", "voice": "default", "language": "zh"})


async def test_voice_per_language(services: Services) -> None:
    engine = make_engine(services, tts_voices={"en": "en_female_1"})
    await engine.run(job())
    assert services.seen[-1][1]["voice"] == "en_female_1"


async def test_injected_client_is_not_closed(services: Services) -> None:
    client = httpx.AsyncClient(transport=httpx.MockTransport(services))
    await HttpEngine(client=client, opus_decoder=None).aclose()
    assert not client.is_closed
    await client.aclose()
