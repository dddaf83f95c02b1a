"""A fake engine for demos and load tests: no models, deterministic text, a realistic-looking delay.

It lets the whole network (scheduler, agents, clients) run on a laptop or CI box and makes results
checkable: the text names the utterance and its measured duration, so a test can tell which audio
produced which result. Nothing here pretends to be a real translation: every text starts ``[sim``.
"""

from __future__ import annotations

import array
import asyncio
import functools
import math
import random
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from dragoman.agent.engines.base import (
    EngineErrorCode,
    EngineJob,
    EngineResult,
    resolve_target,
    whole_pcm16_samples,
)
from dragoman.core.audio import duration_ms as audio_duration_ms
from dragoman.core.audio import wav_bytes

Sleep = Callable[[float], Awaitable[Any]]

# How the simulated latency is split between the three stages in ``service_timings``.
_STAGE_SHARES = {"asr_ms": 0.6, "nmt_ms": 0.15, "tts_ms": 0.25}


class SimulatedEngine:
    """Fakes ASR -> MT -> TTS.

    Latency model: ``(latency_base_ms + latency_factor * duration_ms) * (1 +- jitter) / speed``,
    slept with ``sleep`` (injectable so unit tests need not wait). ``fail_rate`` makes that share of
    jobs fail with ``PROCESSING_ERROR``; jitter and failures draw from one ``random.Random(seed)`` so a
    run is reproducible. In two-way mode (``src_lang="auto"`` with ``lang_a``/``lang_b``) the
    "detected" language alternates by utterance: even indexes speak ``lang_a``, odd ones ``lang_b``.
    """

    name = "simulated"

    def __init__(
        self,
        *,
        latency_base_ms: float = 50.0,
        latency_factor: float = 0.05,
        jitter: float = 0.0,
        speed: float = 1.0,
        fail_rate: float = 0.0,
        seed: int | None = 0,
        tts_sample_rate: int = 16_000,
        tts_ms_per_char: int = 20,
        tts_max_ms: int = 1_000,
        tts_tone_hz: float = 440.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be positive, got {speed}")
        if not 0.0 <= jitter <= 1.0:
            raise ValueError(f"jitter must be within [0, 1], got {jitter}")
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be within [0, 1], got {fail_rate}")
        self.latency_base_ms = latency_base_ms
        self.latency_factor = latency_factor
        self.jitter = jitter
        self.speed = speed
        self.fail_rate = fail_rate
        self.tts_sample_rate = tts_sample_rate
        self.tts_ms_per_char = tts_ms_per_char
        self.tts_max_ms = tts_max_ms
        self.tts_tone_hz = tts_tone_hz
        self._rng = random.Random(seed)
        self._sleep = sleep

    def latency_ms(self, duration_ms: int) -> float:
        """The delay for audio of ``duration_ms``, after jitter and ``speed`` (draws from the RNG)."""
        base = self.latency_base_ms + self.latency_factor * duration_ms
        if self.jitter:
            base *= 1.0 + self.jitter * self._rng.uniform(-1.0, 1.0)
        return max(0.0, base) / self.speed

    async def run(self, job: EngineJob) -> EngineResult:
        audio = whole_pcm16_samples(job.audio) if job.audio_format == "pcm16" else job.audio
        try:
            duration_ms = audio_duration_ms(job.audio_format, audio, job.sample_rate)
        except ValueError as exc:
            return EngineResult.failure(EngineErrorCode.PROCESSING_ERROR, f"simulated engine: {exc}")
        if duration_ms == 0:
            return EngineResult.empty("ASR_EMPTY")
        if not job.use_asr:
            return EngineResult.failure(
                EngineErrorCode.PROCESSING_ERROR, "audio jobs need ASR but pipeline.use_asr is false"
            )

        delay_ms = self.latency_ms(duration_ms)
        failed = self.fail_rate > 0 and self._rng.random() < self.fail_rate
        await self._sleep(delay_ms / 1000.0)
        elapsed = round(delay_ms)
        if failed:
            result = EngineResult.failure(
                EngineErrorCode.PROCESSING_ERROR,
                f"simulated failure (fail_rate={self.fail_rate}) for job {job.job_id}",
            )
            result.processing_time_ms = elapsed
            return result

        src = self._detected_language(job)
        tgt = resolve_target(job, src)
        text_asr = f"[sim {src}] utterance {job.utterance_index} ({duration_ms} ms)"
        text_translated = (
            f"[sim {src}->{tgt}] utterance {job.utterance_index} ({duration_ms} ms)" if job.use_nmt else ""
        )
        tts_audio = self._tone(len(text_translated or text_asr)) if job.use_tts else b""
        extra: dict[str, Any] = {
            "service_timings": {k: round(delay_ms * share) for k, share in _STAGE_SHARES.items()},
            "simulated": True,
        }
        if job.src_lang == "auto":
            extra["detected_language"] = src
        return EngineResult(
            success=True,
            text_asr=text_asr,
            text_translated=text_translated,
            tts_audio=tts_audio,
            tts_format="wav" if tts_audio else "",
            extra=extra,
            processing_time_ms=elapsed,
        )

    async def aclose(self) -> None:
        """Nothing to release; present to satisfy the ``Engine`` protocol."""

    def _detected_language(self, job: EngineJob) -> str:
        """Stand-in for language detection: alternate the two-way pair so demos show both directions."""
        if job.src_lang != "auto":
            return job.src_lang
        if job.lang_a and job.lang_b:
            return job.lang_a if job.utterance_index % 2 == 0 else job.lang_b
        return "auto"

    def _tone(self, n_chars: int) -> bytes:
        """A quiet sine (or silence at ``tts_tone_hz=0``) whose length grows with the text, as WAV."""
        ms = min(self.tts_max_ms, max(self.tts_ms_per_char, n_chars * self.tts_ms_per_char))
        return _tone_wav(self.tts_sample_rate, ms, self.tts_tone_hz)


@functools.lru_cache(maxsize=256)
def _tone_wav(sample_rate: int, ms: int, hz: float) -> bytes:
    """Cached: load tests ask for the same few lengths thousands of times."""
    n = sample_rate * ms // 1000
    amplitude = 3000  # about -20 dBFS: audible in a demo, not startling
    step = 2 * math.pi * hz / sample_rate
    samples = array.array("h", (int(amplitude * math.sin(step * i)) if hz > 0 else 0 for i in range(n)))
    if sys.byteorder == "big":
        samples.byteswap()
    return wav_bytes(samples.tobytes(), sample_rate)
