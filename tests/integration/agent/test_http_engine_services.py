"""HttpEngine against real sockets: stand-in ASR/MT/TTS services served by uvicorn on 127.0.0.1.

One uvicorn server (in a background thread, on a socket the test binds itself, so there is no
free-port race) hosts all three stand-ins; each test sets how they answer and reads what they got.
Readiness is waited on by polling the socket with a deadline.
"""

from __future__ import annotations

import array
import base64
import math
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import opuslib_next
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dragoman.agent.engines.base import EngineJob
from dragoman.agent.engines.http import HttpEngine
from dragoman.core.audio import join_opus, wav_bytes

WAV = wav_bytes(b"\x00\x00" * 1600, 16_000)
PCM = (b"\x10\x00\xf0\xff" * 8000)[:32_000]  # one second of pcm16 at 16 kHz

Answer = Callable[[dict[str, Any]], Response]


def ok_asr(body: dict[str, Any]) -> Response:
    return JSONResponse({"text": " ni hao shi jie ", "language": "zh", "duration": 1.0})


def ok_nmt(body: dict[str, Any]) -> Response:
    return JSONResponse({"ok": True, "text": "hello world"})


def ok_tts(body: dict[str, Any]) -> Response:
    return Response(WAV, media_type="audio/wav")


@dataclass
class StandIns:
    """What the stand-in services answer, and every JSON body they received, by service."""

    answers: dict[str, Answer] = field(default_factory=dict)
    received: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def reset(self) -> None:
        self.answers = {"asr": ok_asr, "nmt": ok_nmt, "tts": ok_tts}
        self.received = {"asr": [], "nmt": [], "tts": []}

    def app(self) -> Starlette:
        def endpoint(service: str) -> Callable[[Request], Any]:
            async def handle(request: Request) -> Response:
                body = await request.json()
                self.received[service].append(body)
                return self.answers[service](body)

            return handle

        return Starlette(
            routes=[
                Route("/utterance", endpoint("asr"), methods=["POST"]),
                Route("/v1/translate", endpoint("nmt"), methods=["POST"]),
                Route("/tts", endpoint("tts"), methods=["POST"]),
            ]
        )


class ServerThread:
    """uvicorn in a daemon thread on a socket bound here; ``start`` returns once it accepts."""

    def __init__(self, app: Starlette) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("stand-in server thread exited during startup")
            if self.server.started and _accepts(self.port):
                return
            time.sleep(0.01)  # polling interval, bounded by the deadline above
        raise TimeoutError(f"stand-in server on port {self.port} not ready after {timeout_s} s")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def stand_in_server() -> Iterator[tuple[StandIns, ServerThread]]:
    stand_ins = StandIns()
    stand_ins.reset()
    server = ServerThread(stand_ins.app())
    server.start()
    yield stand_ins, server
    server.stop()


@pytest.fixture
def stand_ins(stand_in_server: tuple[StandIns, ServerThread]) -> StandIns:
    stand_in_server[0].reset()
    return stand_in_server[0]


@pytest.fixture
async def engine(stand_in_server: tuple[StandIns, ServerThread]) -> AsyncIterator[HttpEngine]:
    url = stand_in_server[1].url
    eng = HttpEngine(asr_url=url, nmt_url=url, tts_url=url, timeout_s=5.0, opus_decoder=None)
    yield eng
    await eng.aclose()


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port bound but never listened on: connections to it are refused, and nobody can take it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def job(**overrides: Any) -> EngineJob:
    fields: dict[str, Any] = {
        "job_id": "job-1",
        "session_id": "sess-1",
        "utterance_index": 3,
        "src_lang": "zh",
        "tgt_lang": "en",
        "audio": PCM,
        "audio_format": "pcm16",
        "sample_rate": 16_000,
        "trace_id": "trace-1",
    }
    fields.update(overrides)
    return EngineJob(**fields)


def assert_no_text(result: Any) -> None:
    assert (result.text_asr, result.text_translated, result.tts_audio, result.tts_format) == ("", "", b"", "")


async def test_happy_path_asr_mt_tts(engine: HttpEngine, stand_ins: StandIns) -> None:
    result = await engine.run(job())

    assert result.success and result.error_code is None
    assert result.text_asr == "ni hao shi jie"
    assert result.text_translated == "hello world"
    assert result.tts_audio == WAV and result.tts_format == "wav"
    assert set(result.extra["service_timings"]) == {"asr_ms", "nmt_ms", "tts_ms"}
    assert result.processing_time_ms >= 0

    assert stand_ins.received["asr"] == [
        {
            "job_id": "job-1",
            "src_lang": "zh",
            "tgt_lang": "en",
            "audio": base64.b64encode(PCM).decode(),
            "audio_format": "pcm16",
            "sample_rate": 16_000,
            "task": "transcribe",
            "beam_size": 5,
        }
    ]
    assert stand_ins.received["nmt"] == [{"text": "ni hao shi jie", "src_lang": "zh", "tgt_lang": "en"}]
    assert stand_ins.received["tts"] == [{"text": "hello world", "voice": "default", "language": "en"}]


async def test_two_way_auto_uses_the_detected_language(engine: HttpEngine, stand_ins: StandIns) -> None:
    stand_ins.answers["asr"] = lambda body: JSONResponse(
        {"text": "good morning", "language": "en", "language_probability": 0.97, "duration": 1.0}
    )
    stand_ins.answers["nmt"] = lambda body: JSONResponse({"ok": True, "text": "zao shang hao"})

    result = await engine.run(job(src_lang="auto", tgt_lang="en", lang_a="zh", lang_b="en"))

    assert result.success and result.text_translated == "zao shang hao"
    assert result.extra["language_probability"] == 0.97
    assert stand_ins.received["asr"][0]["src_lang"] == "auto"
    assert stand_ins.received["nmt"] == [{"text": "good morning", "src_lang": "en", "tgt_lang": "zh"}]
    assert stand_ins.received["tts"][0]["language"] == "zh"


async def test_asr_service_down_is_node_unavailable(
    stand_in_server: tuple[StandIns, ServerThread], stand_ins: StandIns, dead_port: int
) -> None:
    url = stand_in_server[1].url
    dead = f"http://127.0.0.1:{dead_port}"
    eng = HttpEngine(asr_url=dead, nmt_url=url, tts_url=url, connect_timeout_s=2.0, opus_decoder=None)
    try:
        result = await eng.run(job())
    finally:
        await eng.aclose()

    assert not result.success
    assert result.error_code == "NODE_UNAVAILABLE"
    assert "asr" in (result.error_message or "") and f"{dead}/utterance" in (result.error_message or "")
    assert_no_text(result)
    assert stand_ins.received["nmt"] == [] and stand_ins.received["tts"] == []


async def test_mt_http_500_is_a_processing_error(engine: HttpEngine, stand_ins: StandIns) -> None:
    stand_ins.answers["nmt"] = lambda body: JSONResponse({"detail": "model crashed"}, status_code=500)

    result = await engine.run(job())

    assert not result.success and result.error_code == "PROCESSING_ERROR"
    assert "nmt" in (result.error_message or "") and "500" in (result.error_message or "")
    assert_no_text(result)
    assert stand_ins.received["tts"] == []


async def test_mt_ok_false_is_a_processing_error(engine: HttpEngine, stand_ins: StandIns) -> None:
    stand_ins.answers["nmt"] = lambda body: JSONResponse({"ok": False, "error": "unsupported pair"})

    result = await engine.run(job())

    assert not result.success and result.error_code == "PROCESSING_ERROR"
    assert "ok:false" in (result.error_message or "") and "unsupported pair" in (result.error_message or "")
    assert_no_text(result)
    assert stand_ins.received["tts"] == []


async def test_empty_asr_text_gives_an_empty_ack(engine: HttpEngine, stand_ins: StandIns) -> None:
    stand_ins.answers["asr"] = lambda body: JSONResponse({"text": "   ", "language": "zh", "duration": 1.0})

    result = await engine.run(job())

    assert result.success and result.extra["reason"] == "ASR_EMPTY"
    assert_no_text(result)
    assert stand_ins.received["nmt"] == [] and stand_ins.received["tts"] == []


async def test_opus_without_a_decoder_is_unsupported(engine: HttpEngine, stand_ins: StandIns) -> None:
    assert engine.opus_decoder is None  # the fixture disables decoding explicitly
    result = await engine.run(job(audio=join_opus([b"\xfc\xff\xfe"] * 10), audio_format="opus"))

    assert not result.success and result.error_code == "UNSUPPORTED_AUDIO_FORMAT"
    assert "opuslib" in (result.error_message or "")
    assert_no_text(result)
    assert stand_ins.received["asr"] == []


def tone_opus_packets(n_packets: int, hz: float = 440.0) -> list[bytes]:
    """``n_packets`` real 20 ms Opus packets of a sine at 16 kHz, as a browser would send them."""
    samples = array.array(
        "h", (int(8000 * math.sin(2 * math.pi * hz * i / 16_000)) for i in range(320 * n_packets))
    )
    if sys.byteorder == "big":
        samples.byteswap()
    pcm = samples.tobytes()
    encoder = opuslib_next.Encoder(16_000, 1, opuslib_next.APPLICATION_VOIP)
    return [encoder.encode(pcm[i : i + 640], 320) for i in range(0, len(pcm), 640)]


async def test_real_opus_is_decoded_to_16k_pcm16_for_asr(
    stand_in_server: tuple[StandIns, ServerThread], stand_ins: StandIns
) -> None:
    url = stand_in_server[1].url
    eng = HttpEngine(asr_url=url, nmt_url=url, tts_url=url, timeout_s=5.0)  # opus_decoder="auto"
    packets = tone_opus_packets(10)
    try:
        result = await eng.run(job(audio=join_opus(packets), audio_format="opus", sample_rate=48_000))
    finally:
        await eng.aclose()

    assert result.success and result.text_translated == "hello world"
    (asr_body,) = stand_ins.received["asr"]
    assert (asr_body["audio_format"], asr_body["sample_rate"]) == ("pcm16", 16_000)
    pcm = base64.b64decode(asr_body["audio"])
    assert len(pcm) == 640 * len(packets)  # 20 ms per packet at 16 kHz, 2 bytes a sample
    samples = array.array("h")
    samples.frombytes(pcm)
    if sys.byteorder == "big":
        samples.byteswap()
    assert max(abs(v) for v in samples[1600:]) > 4000  # the tone came through, not decoded silence
