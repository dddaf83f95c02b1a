"""What every inference engine takes, returns and promises, plus the small helpers they share.

The node agent turns a ``job_assign`` into an :class:`EngineJob`, awaits ``engine.run(job)`` and turns
the :class:`EngineResult` into a ``job_result``. Engines are swappable (``make_engine``) so the same
agent can fake inference for demos and load tests or call a real node's ASR/MT/TTS services.

Contract: ``run`` never raises for a bad job or a broken service; it returns a failure result, so the
agent always has a ``job_result`` to send. Only cancellation (``asyncio.CancelledError``) propagates.
Audio framing, durations and WAV wrapping come from :mod:`dragoman.core.audio` (pure stdlib), so the
engines count and split audio exactly as the scheduler does.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from dragoman.core.audio import PCM16_SAMPLE_BYTES
from dragoman.errors import ConfigError


class EngineErrorCode(StrEnum):
    """Error codes an engine puts in ``job_result.error.code``.

    ``NODE_UNAVAILABLE`` and ``PROCESSING_ERROR`` are wire codes (PROTOCOL.md section 3) so the
    scheduler and clients understand them; the two audio codes are node-side details that say exactly
    what this node cannot take, which a generic ``PROCESSING_ERROR`` would hide.
    """

    NODE_UNAVAILABLE = "NODE_UNAVAILABLE"
    PROCESSING_ERROR = "PROCESSING_ERROR"
    UNSUPPORTED_AUDIO_FORMAT = "UNSUPPORTED_AUDIO_FORMAT"
    UNSUPPORTED_SAMPLE_RATE = "UNSUPPORTED_SAMPLE_RATE"


@dataclass(frozen=True, slots=True)
class EngineJob:
    """One utterance to process, with the audio already base64-decoded.

    ``src_lang`` may be ``"auto"``: the engine detects the spoken language. With ``lang_a``/``lang_b``
    set (two-way mode) the target is the other language of the pair (see :func:`resolve_target`).
    """

    job_id: str
    session_id: str
    utterance_index: int
    src_lang: str
    tgt_lang: str
    audio: bytes
    audio_format: str = "pcm16"
    sample_rate: int = 16_000
    use_asr: bool = True
    use_nmt: bool = True
    use_tts: bool = True
    lang_a: str | None = None
    lang_b: str | None = None
    trace_id: str = ""

    @classmethod
    def from_assign(cls, msg: Mapping[str, Any]) -> EngineJob:
        """Build a job from a decoded ``job_assign`` dict; raise ``ValueError`` on bad audio base64.

        Only the fields an engine needs are read; unknown fields are ignored, as the protocol asks.
        """
        try:
            audio = base64.b64decode(msg.get("audio") or "", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"job {msg.get('job_id')!r}: audio is not valid base64") from exc
        pipeline = msg.get("pipeline") or {}
        return cls(
            job_id=str(msg["job_id"]),
            session_id=str(msg["session_id"]),
            utterance_index=int(msg["utterance_index"]),
            src_lang=str(msg["src_lang"]),
            tgt_lang=str(msg["tgt_lang"]),
            audio=audio,
            audio_format=str(msg.get("audio_format") or "opus"),
            sample_rate=int(msg.get("sample_rate") or 16_000),
            use_asr=bool(pipeline.get("use_asr", True)),
            use_nmt=bool(pipeline.get("use_nmt", True)),
            use_tts=bool(pipeline.get("use_tts", True)),
            lang_a=msg.get("lang_a") or None,
            lang_b=msg.get("lang_b") or None,
            trace_id=str(msg.get("trace_id") or ""),
        )


@dataclass(slots=True)
class EngineResult:
    """The outcome of one job, shaped like the payload fields of ``job_result``.

    Three kinds: a translation (``success`` and text), the "empty ack" (``success`` with
    ``extra["reason"]`` and no text: the scheduler sends the client a ``missing_result``), and a
    failure (``success`` false with ``error_code``/``error_message``, never any text).
    """

    success: bool
    text_asr: str = ""
    text_translated: str = ""
    tts_audio: bytes = b""
    tts_format: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    processing_time_ms: int = 0
    error_code: str | None = None
    error_message: str | None = None
    error_details: dict[str, Any] | None = None

    @classmethod
    def empty(cls, reason: str = "ASR_EMPTY", **extra: Any) -> EngineResult:
        """The "empty ack": the job is done but there is nothing to translate (e.g. silence)."""
        return cls(success=True, extra={"reason": reason, **extra})

    @classmethod
    def failure(cls, code: str, message: str, details: Mapping[str, Any] | None = None) -> EngineResult:
        """A failed job; ``message`` should name the service or input at fault."""
        return cls(
            success=False,
            error_code=str(code),
            error_message=message,
            error_details=dict(details) if details else None,
        )

    def to_job_result_fields(self) -> dict[str, Any]:
        """The result's part of a ``job_result`` message (the agent adds ids and ``type``)."""
        fields: dict[str, Any] = {
            "success": self.success,
            "text_asr": self.text_asr,
            "text_translated": self.text_translated,
            "tts_audio": base64.b64encode(self.tts_audio).decode("ascii"),
            "tts_format": self.tts_format,
            "extra": dict(self.extra),
            "processing_time_ms": self.processing_time_ms,
        }
        if not self.success:
            error: dict[str, Any] = {
                "code": self.error_code or EngineErrorCode.PROCESSING_ERROR,
                "message": self.error_message or "",
            }
            if self.error_details:
                error["details"] = dict(self.error_details)
            fields["error"] = error
        return fields


@runtime_checkable
class Engine(Protocol):
    """An inference backend. One instance serves many concurrent ``run`` calls."""

    name: str

    async def run(self, job: EngineJob) -> EngineResult:
        """Process one job. Returns a failure result instead of raising (cancellation excepted)."""
        ...

    async def aclose(self) -> None:
        """Release connections and other resources; the engine is unusable afterwards."""
        ...


def make_engine(spec: str, **options: Any) -> Engine:
    """Build the engine named by ``spec`` (``"simulated"`` or ``"http"``) with its keyword options.

    Imports are deferred so that choosing the simulated engine does not import httpx.
    """
    kind = spec.strip().lower()
    if kind == "simulated":
        from dragoman.agent.engines.simulated import SimulatedEngine

        return SimulatedEngine(**options)
    if kind == "http":
        from dragoman.agent.engines.http import HttpEngine

        return HttpEngine(**options)
    raise ConfigError(f"unknown engine {spec!r}; choose 'simulated' or 'http'")


# --- language helpers ---------------------------------------------------------------------------


def same_language(a: str | None, b: str | None) -> bool:
    """Compare primary language subtags, so ``"zh-CN"`` matches ``"zh"`` and case does not matter."""
    if not a or not b:
        return False
    return a.replace("_", "-").split("-")[0].lower() == b.replace("_", "-").split("-")[0].lower()


def resolve_target(job: EngineJob, detected_src: str | None) -> str:
    """The language to translate into.

    Two-way mode (``lang_a`` and ``lang_b`` set): the other language of the pair from the detected
    one. If the detected language is not in the pair (or unknown), fall back to ``job.tgt_lang``.
    """
    if job.lang_a and job.lang_b and detected_src:
        if same_language(detected_src, job.lang_a):
            return job.lang_b
        if same_language(detected_src, job.lang_b):
            return job.lang_a
    return job.tgt_lang


# --- audio helpers ------------------------------------------------------------------------------


def whole_pcm16_samples(pcm16: bytes) -> bytes:
    """``pcm16`` cut to whole 2-byte samples: a torn final byte is dropped, not rejected.

    ``dragoman.core.audio`` rejects an odd byte count; engines are lenient on purpose, because half a
    sample at the end of an utterance carries nothing audible and failing the job over it would lose
    the whole utterance. (The scheduler's segmenter never sends one.)
    """
    return pcm16[: len(pcm16) - len(pcm16) % PCM16_SAMPLE_BYTES]
