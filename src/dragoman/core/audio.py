"""Audio payload arithmetic: framing, durations, and WAV helpers for test and demo audio.

Two formats cross the wire (PROTOCOL.md section 2, ``audio_chunk.payload``):

* ``"opus"``, the web client's "Plan A" framing: a sequence of packets, each prefixed by its length
  as 2 little-endian bytes, each packet holding 20 ms of audio. Durations are counted, never decoded,
  so the scheduler needs no codec. Because every packet carries its own prefix, concatenating framed
  payloads is itself a valid framed payload: cutting at a packet boundary loses and duplicates nothing.
* ``"pcm16"``: little-endian signed 16-bit mono samples at ``sample_rate``.

Everything here is pure except ``read_wav_pcm16``/``write_wav_pcm16``, which touch only the file
they are given (stdlib ``wave`` and ``array``; no numpy, so the core stays dependency-free). The node
agent's engines use these helpers too, so framing and duration rules are the same on every side.
"""

from __future__ import annotations

import array
import io
import os
import sys
import wave
from collections.abc import Iterable
from typing import IO, Literal

AudioFormat = Literal["opus", "pcm16"]
AUDIO_FORMATS: tuple[AudioFormat, ...] = ("opus", "pcm16")

OPUS_PACKET_MS = 20
"""Every Plan A packet is one 20 ms Opus frame."""

OPUS_LENGTH_PREFIX_BYTES = 2
OPUS_MAX_PACKET_BYTES = 0xFFFF
PCM16_SAMPLE_BYTES = 2
DEFAULT_SAMPLE_RATE = 16_000


# -- Opus Plan A framing ------------------------------------------------------------------------------


def opus_frame_ends(payload: bytes) -> list[int]:
    """Validate a framed payload and return where each framed packet ends (byte offsets, ascending).

    ``payload[ends[i - 1]:ends[i]]`` is packet ``i`` with its 2-byte length prefix (``ends[-1]`` is
    ``len(payload)``); nothing is copied, so a buffer can hold a chunk whole and still be cut at any
    packet boundary. Raises ``ValueError`` on a truncated prefix, a length pointing past the end,
    or a zero length (an empty Opus packet carries no audio and would count 20 ms that are not there).
    """
    ends: list[int] = []
    offset = 0
    end = len(payload)
    while offset < end:
        if end - offset < OPUS_LENGTH_PREFIX_BYTES:
            raise ValueError(f"invalid opus framing: truncated length prefix at byte {offset} of {end}")
        length = payload[offset] | (payload[offset + 1] << 8)
        if length == 0:
            raise ValueError(f"invalid opus framing: zero-length packet at byte {offset}")
        offset += OPUS_LENGTH_PREFIX_BYTES + length
        if offset > end:
            raise ValueError(
                f"invalid opus framing: packet at byte {offset - OPUS_LENGTH_PREFIX_BYTES - length} "
                f"claims {length} bytes but only {end - offset + length} remain"
            )
        ends.append(offset)
    return ends


def split_opus_frames(payload: bytes) -> list[bytes]:
    """Split a framed payload into framed packets (each still carrying its 2-byte length prefix).

    Keeping the prefix lets a buffer be cut at any packet boundary and re-joined by plain
    concatenation. Raises ``ValueError`` for bad framing, as ``opus_frame_ends`` does.
    """
    view = memoryview(payload)
    start = 0
    frames: list[bytes] = []
    for stop in opus_frame_ends(payload):
        frames.append(bytes(view[start:stop]))
        start = stop
    return frames


def split_opus_packets(payload: bytes) -> list[bytes]:
    """Split a framed payload into bare Opus packets (prefixes removed). See ``split_opus_frames``."""
    return [frame[OPUS_LENGTH_PREFIX_BYTES:] for frame in split_opus_frames(payload)]


def frame_opus_packet(packet: bytes) -> bytes:
    """Prefix one bare packet with its 2-byte little-endian length."""
    if not 1 <= len(packet) <= OPUS_MAX_PACKET_BYTES:
        raise ValueError(
            f"opus packet must be 1..{OPUS_MAX_PACKET_BYTES} bytes to be framed, got {len(packet)}"
        )
    return len(packet).to_bytes(OPUS_LENGTH_PREFIX_BYTES, "little") + packet


def join_opus(packets: Iterable[bytes]) -> bytes:
    """Frame bare packets into one Plan A payload (inverse of ``split_opus_packets``)."""
    return b"".join(frame_opus_packet(packet) for packet in packets)


def opus_duration_ms(payload: bytes) -> int:
    """Duration of a framed payload: packet count x 20 ms. Raises ``ValueError`` on bad framing."""
    return len(opus_frame_ends(payload)) * OPUS_PACKET_MS


# -- PCM16 ----------------------------------------------------------------------------------------------


def _check_sample_rate(sample_rate: int) -> None:
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")


def pcm16_duration_ms(nbytes: int, sample_rate: int) -> int:
    """Duration in whole milliseconds (rounded down) of ``nbytes`` of mono 16-bit PCM.

    An odd byte count is a torn sample, so it is rejected rather than rounded.
    """
    _check_sample_rate(sample_rate)
    if nbytes < 0:
        raise ValueError(f"byte count must not be negative, got {nbytes}")
    if nbytes % PCM16_SAMPLE_BYTES:
        raise ValueError(f"pcm16 audio must have an even byte count, got {nbytes}")
    return (nbytes // PCM16_SAMPLE_BYTES) * 1000 // sample_rate


def pcm16_silence(ms: int, sample_rate: int = DEFAULT_SAMPLE_RATE) -> bytes:
    """``ms`` milliseconds of silence (rounded down to whole samples), for building test audio."""
    _check_sample_rate(sample_rate)
    if ms < 0:
        raise ValueError(f"duration must not be negative, got {ms}")
    return bytes(PCM16_SAMPLE_BYTES * (ms * sample_rate // 1000))


def duration_ms(audio_format: str, payload: bytes, sample_rate: int = DEFAULT_SAMPLE_RATE) -> int:
    """Duration of ``payload`` in ``audio_format``; ``ValueError`` for bad audio or an unknown format."""
    if audio_format == "opus":
        return opus_duration_ms(payload)
    if audio_format == "pcm16":
        return pcm16_duration_ms(len(payload), sample_rate)
    raise ValueError(f"unknown audio_format {audio_format!r}; expected one of {AUDIO_FORMATS}")


# -- WAV files ------------------------------------------------------------------------------------------


def _samples_from_le(data: bytes) -> array.array[int]:
    samples = array.array("h")
    samples.frombytes(data)
    if sys.byteorder == "big":  # WAV is little-endian; array uses the host's order
        samples.byteswap()
    return samples


def _samples_to_le(samples: array.array[int]) -> bytes:
    if sys.byteorder == "big":
        samples = array.array("h", samples)
        samples.byteswap()
    return samples.tobytes()


def _downmix(samples: array.array[int], channels: int) -> array.array[int]:
    """Average interleaved channels into one; rounding toward minus infinity is inaudible."""
    if channels == 1:
        return samples
    lanes = [samples[c::channels] for c in range(channels)]
    return array.array("h", (sum(frame) // channels for frame in zip(*lanes, strict=True)))


def resample_linear(samples: array.array[int], src_rate: int, dst_rate: int) -> array.array[int]:
    """Resample mono int16 samples by linear interpolation.

    Good enough for feeding ASR test audio; it does no anti-alias filtering, which is why it is not
    used on the live path. Integer position arithmetic keeps the result exact and reproducible.
    """
    _check_sample_rate(src_rate)
    _check_sample_rate(dst_rate)
    if src_rate == dst_rate or not samples:
        return array.array("h", samples)
    n_in = len(samples)
    n_out = n_in * dst_rate // src_rate
    last = n_in - 1
    out = array.array("h", bytes(PCM16_SAMPLE_BYTES * n_out))
    for i in range(n_out):
        j, rem = divmod(i * src_rate, dst_rate)
        a = samples[j]
        b = samples[j + 1] if j < last else a
        # Round half away from zero in integers; the result lies between a and b, so it fits int16.
        delta = (b - a) * rem
        step = (abs(delta) * 2 + dst_rate) // (2 * dst_rate)
        out[i] = a + step if delta >= 0 else a - step
    return out


def read_wav_pcm16(path: str | os.PathLike[str] | IO[bytes],
                   target_rate: int = DEFAULT_SAMPLE_RATE) -> tuple[bytes, int]:
    """Read a 16-bit PCM WAV (a path, or a binary file object such as ``io.BytesIO``) as mono pcm16 at
    ``target_rate``; returns ``(pcm_bytes, target_rate)``.

    Multi-channel audio is averaged to mono and other rates are linearly resampled, so any ordinary
    recording can be used as session audio. Other sample widths (8-, 24-, 32-bit) and non-PCM
    encodings are rejected with ``ValueError`` instead of being guessed at.
    """
    _check_sample_rate(target_rate)
    name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else "WAV data"
    source = name if isinstance(path, (str, os.PathLike)) else path
    try:
        with wave.open(source, "rb") as wav:
            channels = wav.getnchannels()
            width = wav.getsampwidth()
            rate = wav.getframerate()
            data = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"{name}: not a PCM WAV file we can read ({exc})") from exc
    if width != PCM16_SAMPLE_BYTES:
        raise ValueError(f"{name}: {8 * width}-bit samples are not supported; convert to 16-bit PCM")
    usable = len(data) - len(data) % (PCM16_SAMPLE_BYTES * channels)  # drop a torn final frame
    mono = _downmix(_samples_from_le(data[:usable]), channels)
    return _samples_to_le(resample_linear(mono, rate, target_rate)), target_rate


def wav_bytes(pcm16: bytes, sample_rate: int) -> bytes:
    """Mono pcm16 bytes wrapped in an in-memory WAV container (what clients play as ``"wav"``).

    Raises ``ValueError`` for a non-positive ``sample_rate`` or an odd byte count (a torn sample).
    """
    _check_sample_rate(sample_rate)
    if len(pcm16) % PCM16_SAMPLE_BYTES:
        raise ValueError(f"pcm16 audio must have an even byte count, got {len(pcm16)}")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(PCM16_SAMPLE_BYTES)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm16)
    return buf.getvalue()


def write_wav_pcm16(path: str | os.PathLike[str], pcm: bytes, sample_rate: int = DEFAULT_SAMPLE_RATE) -> None:
    """Write mono pcm16 bytes as a WAV file (the inverse of ``read_wav_pcm16`` at the same rate).

    Bad audio raises ``ValueError`` (see ``wav_bytes``) before the file is created.
    """
    data = wav_bytes(pcm, sample_rate)
    with open(os.fspath(path), "wb") as f:
        f.write(data)
