"""Turning a recording into what a live client streams: utterance boundaries found at silences,
audio paced in chunks, and Opus "Plan A" framing (20 ms packets with 2-byte little-endian lengths)."""

from __future__ import annotations

import array
import asyncio
import math
from collections.abc import Callable, Iterator
from typing import Any

from dragoman.client.session import OUTCOMES, SessionClient
from dragoman.core.audio import join_opus
from dragoman.wire import ErrorMessage, SessionCloseAck

FRAME_MS = 20


def frame_rms(pcm: bytes, sample_rate: int = 16000, frame_ms: int = FRAME_MS) -> list[float]:
    samples = array.array("h", pcm[: len(pcm) - len(pcm) % 2])
    n = sample_rate * frame_ms // 1000
    return [math.sqrt(sum(s * s for s in samples[i:i + n]) / max(1, len(samples[i:i + n])))
            for i in range(0, len(samples), n)]


def split_on_silence(pcm: bytes, sample_rate: int = 16000, min_silence_ms: int = 300,
                     threshold: float | None = None) -> list[bytes]:
    """Cut pcm16 at silences of at least ``min_silence_ms`` (energy below ``threshold``, by default
    10% of the loudest frame). Every byte lands in exactly one piece; silent stretches stay attached
    to the speech before them, so pieces concatenate back to the input."""
    rms = frame_rms(pcm, sample_rate)
    if not rms:
        return []
    limit = threshold if threshold is not None else 0.1 * max(rms)
    frame_bytes = sample_rate * FRAME_MS // 1000 * 2
    need = max(1, min_silence_ms // FRAME_MS)
    cuts, quiet, spoke = [], 0, False
    for i, level in enumerate(rms):
        if level > limit:
            if spoke and quiet >= need:
                cuts.append(i * frame_bytes)
            spoke, quiet = True, 0
        else:
            quiet += 1
    bounds = [0, *cuts, len(pcm)]
    return [pcm[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


class OpusPlanA:
    """Encodes 16 kHz mono pcm16 into the web client's framing: each 20 ms packet length-prefixed."""

    def __init__(self, sample_rate: int = 16000) -> None:
        import opuslib_next as opus

        self.sample_rate = sample_rate
        self.samples = sample_rate * FRAME_MS // 1000
        self._enc = opus.Encoder(sample_rate, 1, opus.APPLICATION_VOIP)

    def encode(self, pcm: bytes) -> bytes:
        frame = self.samples * 2
        packets = []
        for piece in chunks(pcm, frame):
            if len(piece) < frame:
                piece = piece + b"\x00" * (frame - len(piece))
            packets.append(self._enc.encode(piece, self.samples))
        return join_opus(packets)


CHUNK_MS = 256  # what the existing web client sends per audio_chunk


def outcome_index(msg: Any) -> int:
    """The utterance an outcome is about (an ``error`` names it in ``details``)."""
    if isinstance(msg, ErrorMessage):
        return int((msg.details or {}).get("utterance_index", -1))
    return int(msg.utterance_index)


async def send_utterances(client: SessionClient, pieces: list[bytes], sample_rate: int, audio_format: str,
                          speed: float | None, on_final: Callable[[int], None] | None = None) -> None:
    """Stream pcm16 ``pieces`` as a live client: ``CHUNK_MS`` chunks (Opus Plan A when asked), the
    last chunk of each piece marked ``is_final``, paced at ``speed`` x real time (``None``: at once).
    ``on_final(index)`` is called as each piece's final chunk goes out."""
    encoder = OpusPlanA(sample_rate) if audio_format == "opus" else None
    chunk_bytes = sample_rate * CHUNK_MS // 1000 * 2
    for index, piece in enumerate(pieces):
        parts = list(chunks(piece, chunk_bytes))
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            await client.send_audio(encoder.encode(part) if encoder else part, is_final=last)
            if last and on_final is not None:
                on_final(index)
            if speed:  # pace like a microphone (a duty cycle, not synchronisation)
                await asyncio.sleep(len(part) / 2 / sample_rate / speed)


async def follow_outcomes(client: SessionClient, on_outcome: Callable[[Any], None]) -> None:
    """Call ``on_outcome`` for every outcome the session receives, until ``session_close_ack``."""
    async for msg in client.follow():
        if isinstance(msg, SessionCloseAck):
            return
        if isinstance(msg, OUTCOMES):
            on_outcome(msg)
