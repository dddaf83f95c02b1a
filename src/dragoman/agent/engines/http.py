"""An engine that calls a node's existing ASR, MT and TTS services over HTTP.

Default service addresses (each overridable; they are the local ports of the existing worker's
services, all on the node itself):

    ASR  http://127.0.0.1:6007   POST /utterance        JSON -> {text, language?, duration, ...}
    MT   http://127.0.0.1:5008   POST /v1/translate     JSON -> {ok, text}
    TTS  http://127.0.0.1:5006   POST /tts              JSON -> WAV bytes

Why the failure rules are strict: the client shows whatever text comes back, so this engine never
fills a gap with made-up or partial text. A service it cannot reach gives ``NODE_UNAVAILABLE`` (the
job can run elsewhere); a service that answers badly gives ``PROCESSING_ERROR``; both messages name
the service and URL so an operator knows where to look.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import httpx

from dragoman.agent.engines.base import (
    EngineErrorCode,
    EngineJob,
    EngineResult,
    resolve_target,
    same_language,
    whole_pcm16_samples,
)
from dragoman.core.audio import split_opus_packets

DEFAULT_ASR_URL = "http://127.0.0.1:6007"
DEFAULT_NMT_URL = "http://127.0.0.1:5008"
DEFAULT_TTS_URL = "http://127.0.0.1:5006"
ASR_SAMPLE_RATE = 16_000
"""The ASR service takes pcm16 mono at 16 kHz only."""
OPUS_MAX_FRAME_MS = 120
"""The longest frame one Opus packet can hold; the decoder's output buffer is sized for it."""
OPUS_MODULES = ("opuslib_next", "opuslib")
"""libopus bindings tried in order by ``opus_decoder="auto"``: the bundled one (a project
dependency that ships libopus), then classic ``opuslib`` over a system libopus. Same API."""


class OpusDecoder(Protocol):
    """Turns opus packets into little-endian int16 mono samples at ``sample_rate``."""

    def decode(self, packets: Sequence[bytes], sample_rate: int) -> bytes: ...


class OpuslibDecoder:
    """:class:`OpusDecoder` over an opuslib-style module (``opuslib_next`` or ``opuslib``)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def decode(self, packets: Sequence[bytes], sample_rate: int) -> bytes:
        # A fresh decoder per utterance: opus decoders are stateful and utterances are independent.
        decoder = self.module.Decoder(sample_rate, 1)
        # ``frame_size`` is the output capacity in samples; libopus returns what the packet holds
        # (20 ms for Plan A), so room for the longest legal frame costs nothing and rejects nothing.
        max_samples = sample_rate * OPUS_MAX_FRAME_MS // 1000
        return b"".join(decoder.decode(bytes(p), max_samples) for p in packets)


def load_opus_decoder(modules: Sequence[str] = OPUS_MODULES) -> OpusDecoder | None:
    """A decoder over the first of ``modules`` that imports (with its libopus), else ``None``."""
    for name in modules:
        try:
            module = importlib.import_module(name)
        except Exception:  # ImportError, or libopus missing (the bindings raise other errors then)
            continue
        return OpuslibDecoder(module)
    return None


class StageError(Exception):
    """A pipeline stage failed; carries the error code and message for the failure result."""

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = dict(details or {})


class HttpEngine:
    """ASR -> MT -> TTS through the node's HTTP services, one ``httpx.AsyncClient`` per engine.

    Options: service base URLs, ``timeout_s`` (per request) and ``connect_timeout_s``, ``beam_size``
    for ASR, TTS voices (``tts_voices`` by language, else ``tts_default_voice``), and
    ``opus_decoder``: ``"auto"`` loads ``opuslib_next`` (else ``opuslib``; see :data:`OPUS_MODULES`),
    ``None`` disables opus input, or pass any :class:`OpusDecoder`. ``client`` lets tests or callers
    share a client (then not closed here).
    """

    name = "http"

    def __init__(
        self,
        *,
        asr_url: str = DEFAULT_ASR_URL,
        nmt_url: str = DEFAULT_NMT_URL,
        tts_url: str = DEFAULT_TTS_URL,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 2.0,
        beam_size: int = 5,
        tts_voices: Mapping[str, str] | None = None,
        tts_default_voice: str = "default",
        opus_decoder: OpusDecoder | Literal["auto"] | None = "auto",
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.asr_url = asr_url.rstrip("/")
        self.nmt_url = nmt_url.rstrip("/")
        self.tts_url = tts_url.rstrip("/")
        self.beam_size = beam_size
        self.tts_voices = dict(tts_voices or {})
        self.tts_default_voice = tts_default_voice
        self.opus_decoder = load_opus_decoder() if opus_decoder == "auto" else opus_decoder
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s)
        )

    async def run(self, job: EngineJob) -> EngineResult:
        started = time.perf_counter()
        timings: dict[str, int] = {"asr_ms": 0, "nmt_ms": 0, "tts_ms": 0}
        try:
            result = await self._pipeline(job, timings)
        except StageError as exc:
            result = EngineResult.failure(exc.code, exc.message, exc.details or None)
        except Exception as exc:  # a bug must still produce a job_result, not a silent lease timeout
            result = EngineResult.failure(
                EngineErrorCode.PROCESSING_ERROR, f"http engine internal error: {exc!r}"
            )
        result.extra.setdefault("service_timings", timings)
        result.processing_time_ms = round((time.perf_counter() - started) * 1000)
        return result

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # --- the pipeline ---------------------------------------------------------------------------

    async def _pipeline(self, job: EngineJob, timings: dict[str, int]) -> EngineResult:
        if not job.use_asr:
            raise StageError(
                EngineErrorCode.PROCESSING_ERROR, "audio jobs need ASR but pipeline.use_asr is false"
            )
        pcm = await self._pcm16_for_asr(job)
        if not pcm:
            return EngineResult.empty("ASR_EMPTY")

        asr = await self._asr(job, pcm, timings)
        text_asr = asr["text"].strip()
        extra: dict[str, Any] = {"service_timings": timings}
        if "language_probability" in asr:
            extra["language_probability"] = asr["language_probability"]
        detected = asr.get("language") if isinstance(asr.get("language"), str) else None
        if detected:
            extra["detected_language"] = detected
        if not text_asr:
            return EngineResult.empty("ASR_EMPTY", **extra)

        src = detected if job.src_lang == "auto" and detected else job.src_lang
        tgt = resolve_target(job, src)
        text_translated = ""
        if job.use_nmt:
            text_translated = await self._translate(text_asr, src, tgt, timings)

        tts_audio = b""
        speak_text, speak_lang = (text_translated, tgt) if job.use_nmt else (text_asr, src)
        if job.use_tts and speak_text:
            tts_audio = await self._tts(speak_text, speak_lang, timings)

        return EngineResult(
            success=True,
            text_asr=text_asr,
            text_translated=text_translated,
            tts_audio=tts_audio,
            tts_format="wav" if tts_audio else "",
            extra=extra,
        )

    async def _pcm16_for_asr(self, job: EngineJob) -> bytes:
        """The job's audio as pcm16 at 16 kHz, or a StageError saying why it cannot be.

        pcm16 must already be 16 kHz (no resampling here). Opus is decoded straight to 16 kHz, which
        libopus does whatever rate it was encoded at, so its ``sample_rate`` is not checked.
        """
        if job.audio_format == "pcm16":
            if job.sample_rate != ASR_SAMPLE_RATE:
                raise StageError(
                    EngineErrorCode.UNSUPPORTED_SAMPLE_RATE,
                    f"ASR needs {ASR_SAMPLE_RATE} Hz pcm16, job has {job.sample_rate} Hz (no resampling here)",
                )
            return whole_pcm16_samples(job.audio)
        if job.audio_format != "opus":
            raise StageError(
                EngineErrorCode.UNSUPPORTED_AUDIO_FORMAT, f"unknown audio_format {job.audio_format!r}"
            )
        try:
            packets = split_opus_packets(job.audio)
        except ValueError as exc:
            raise StageError(EngineErrorCode.PROCESSING_ERROR, str(exc)) from exc
        if not packets:
            return b""
        if self.opus_decoder is None:
            raise StageError(
                EngineErrorCode.UNSUPPORTED_AUDIO_FORMAT,
                "opus input needs a decoder: install 'opuslib-next-bundled' (or 'opuslib' and libopus)"
                " or send pcm16",
            )
        try:
            return await asyncio.to_thread(self.opus_decoder.decode, packets, ASR_SAMPLE_RATE)
        except Exception as exc:
            raise StageError(EngineErrorCode.PROCESSING_ERROR, f"opus decoding failed: {exc!r}") from exc

    async def _asr(self, job: EngineJob, pcm: bytes, timings: dict[str, int]) -> dict[str, Any]:
        payload = {
            "job_id": job.job_id,
            "src_lang": job.src_lang,
            "tgt_lang": job.tgt_lang,
            "audio": base64.b64encode(pcm).decode("ascii"),
            "audio_format": "pcm16",
            "sample_rate": ASR_SAMPLE_RATE,
            "task": "transcribe",
            "beam_size": self.beam_size,
        }
        url = f"{self.asr_url}/utterance"
        body = _json_object("asr", url, await self._post("asr", url, payload, timings, "asr_ms"))
        if not isinstance(body.get("text"), str):
            raise StageError(
                EngineErrorCode.PROCESSING_ERROR, f"asr service at {url} answered without a 'text' string"
            )
        return body

    async def _translate(self, text: str, src: str, tgt: str, timings: dict[str, int]) -> str:
        if same_language(src, tgt):
            timings["nmt_ms"] = 0  # nothing to translate; the text is already in the target language
            return text
        url = f"{self.nmt_url}/v1/translate"
        payload = {"text": text, "src_lang": src, "tgt_lang": tgt}
        body = _json_object("nmt", url, await self._post("nmt", url, payload, timings, "nmt_ms"))
        if body.get("ok") is not True:
            reason = body.get("error") or body.get("message") or "no reason given"
            raise StageError(
                EngineErrorCode.PROCESSING_ERROR, f"nmt service at {url} answered ok:false ({reason})"
            )
        if not isinstance(body.get("text"), str):
            raise StageError(
                EngineErrorCode.PROCESSING_ERROR, f"nmt service at {url} answered without a 'text' string"
            )
        return str(body["text"]).strip()

    async def _tts(self, text: str, lang: str, timings: dict[str, int]) -> bytes:
        url = f"{self.tts_url}/tts"
        voice = self.tts_voices.get(lang, self.tts_default_voice)
        payload = {"text": text, "voice": voice, "language": lang}
        audio = (await self._post("tts", url, payload, timings, "tts_ms")).content
        if not (audio[:4] == b"RIFF" and audio[8:12] == b"WAVE"):
            raise StageError(
                EngineErrorCode.PROCESSING_ERROR, f"tts service at {url} did not answer WAV audio"
            )
        return audio

    async def _post(
        self, service: str, url: str, payload: dict[str, Any], timings: dict[str, int], timing_key: str
    ) -> httpx.Response:
        """POST JSON; map transport failures to NODE_UNAVAILABLE and non-2xx to PROCESSING_ERROR."""
        started = time.perf_counter()
        try:
            response = await self._client.post(url, json=payload)
        except httpx.TimeoutException as exc:
            raise StageError(
                EngineErrorCode.NODE_UNAVAILABLE,
                f"{service} service at {url} timed out ({type(exc).__name__})",
                {"service": service, "url": url},
            ) from exc
        except httpx.TransportError as exc:
            raise StageError(
                EngineErrorCode.NODE_UNAVAILABLE,
                f"{service} service unreachable at {url}: {type(exc).__name__}: {exc}",
                {"service": service, "url": url},
            ) from exc
        finally:
            timings[timing_key] = round((time.perf_counter() - started) * 1000)
        if not response.is_success:
            snippet = response.text[:200]
            raise StageError(
                EngineErrorCode.PROCESSING_ERROR,
                f"{service} service at {url} answered HTTP {response.status_code}: {snippet}",
                {"service": service, "url": url, "status": response.status_code},
            )
        return response


def _json_object(service: str, url: str, response: httpx.Response) -> dict[str, Any]:
    """The response body as a JSON object, or a PROCESSING_ERROR naming the service."""
    try:
        body = response.json()
    except ValueError as exc:
        raise StageError(
            EngineErrorCode.PROCESSING_ERROR,
            f"{service} service at {url} answered malformed JSON (HTTP {response.status_code})",
        ) from exc
    if not isinstance(body, dict):
        raise StageError(
            EngineErrorCode.PROCESSING_ERROR,
            f"{service} service at {url} answered JSON that is not an object",
        )
    return body
