"""Cut one session's audio stream into utterances (PROTOCOL.md section 2, "Utterances").

A sans-I/O state machine: it never reads a clock, sleeps, or sends anything. The session shell feeds
it events with the time they happened and forwards the utterances it returns (one job per target).

How to drive it::

    seg = Segmenter(SegmenterConfig(audio_format="opus"))
    utts = seg.feed_chunk(payload, is_final, now_ms)  # on every audio_chunk
    utts = seg.tts_started(now_ms)                    # on tts_started: stops the pause clock
    seg.tts_ended(now_ms)                             # on tts_play_ended: restarts it from now_ms
    utts = seg.poll(now_ms)                           # when the timer fires
    deadline = seg.next_deadline_ms()                 # re-arm the timer after EVERY call (None: disarm)
    utts = seg.close(now_ms)                          # on session_close: flushes the buffer

Every call that returns utterances returns them in index order; hand each to dispatch. Invalid audio
makes ``feed_chunk`` raise ``ValueError`` (answer ``INVALID_MESSAGE``) and leaves the state untouched.

Resume points. Given each chunk's ``seq``, every utterance says where the audio after it starts
(``Utterance.next_seq`` / ``next_skip``: that chunk, minus its first ``next_skip`` payload bytes).
A session records it once the utterance is dispatched; a client that resumes the session sends its
chunks again from ``next_seq``, and a segmenter built with ``start_index`` and ``skip`` (the first
chunk's bytes already dispatched) goes on exactly where the lost one stopped.

Cut rules, in the order ``feed_chunk`` applies them:

1. **pause**: if ``pause_ms`` or more passed since the last audio (TTS playback excluded), what was
   buffered is cut first; the arriving chunk starts the next utterance. ``poll`` cuts the same way
   when the deadline passes without a chunk. Only a chunk carrying audio restarts the pause clock:
   an empty chunk (a keep-alive, or the web client's closing ``is_final``) is not speech.
2. the chunk's audio is appended.
3. **max_duration** / **max_buffer**: while the buffer holds ``max_duration_ms`` of audio or more than
   ``max_buffer_bytes``, the longest allowed prefix is cut (at an Opus packet or PCM sample boundary)
   and the rest stays buffered. These forced cuts split one long turn, so they and the cut that
   finally ends the turn (pause, final, close) share a ``turn_id``. A buffer of exactly
   ``max_duration_ms`` is left for rule 4 when the chunk is final, so it is cut as the manual cut it is.
4. **final**: an ``is_final`` chunk's own audio belongs to the utterance it ends.

An empty cut creates no utterance and takes no index, but still ends the turn.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from dragoman.core.audio import (
    AUDIO_FORMATS,
    OPUS_PACKET_MS,
    PCM16_SAMPLE_BYTES,
    AudioFormat,
    opus_frame_ends,
)
from dragoman.errors import ProtocolError
from dragoman.wire.codes import ErrorCode


class CutReason(StrEnum):
    """Why an utterance ended; a ``StrEnum`` so it compares equal to its wire spelling."""

    FINAL = "final"
    PAUSE = "pause"
    MAX_DURATION = "max_duration"
    MAX_BUFFER = "max_buffer"
    CLOSE = "close"


_FORCED = (CutReason.MAX_DURATION, CutReason.MAX_BUFFER)


@dataclass(frozen=True, slots=True)
class SegmenterConfig:
    """Per-session limits; defaults are PROTOCOL.md's. Validated so every cut can make progress."""

    pause_ms: int = 3_000
    max_duration_ms: int = 10_000
    max_buffer_bytes: int = 500 * 1024
    audio_format: AudioFormat = "opus"
    sample_rate: int = 16_000

    def __post_init__(self) -> None:
        if self.audio_format not in AUDIO_FORMATS:
            raise ValueError(f"audio_format must be one of {AUDIO_FORMATS}, got {self.audio_format!r}")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")
        if self.pause_ms <= 0:
            raise ValueError(f"pause_ms must be positive, got {self.pause_ms}")
        if self.max_units < 1:
            raise ValueError(
                f"max_duration_ms={self.max_duration_ms} is shorter than one "
                f"{'packet' if self.audio_format == 'opus' else 'sample'}"
            )
        if self.max_buffer_bytes < PCM16_SAMPLE_BYTES:
            raise ValueError(f"max_buffer_bytes must be at least 2, got {self.max_buffer_bytes}")

    @property
    def max_units(self) -> int:
        """``max_duration_ms`` in whole buffer units: Opus packets or PCM samples."""
        if self.audio_format == "opus":
            return self.max_duration_ms // OPUS_PACKET_MS
        return self.max_duration_ms * self.sample_rate // 1000

    def units_to_ms(self, units: int) -> int:
        if self.audio_format == "opus":
            return units * OPUS_PACKET_MS
        return units * 1000 // self.sample_rate


@dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class Utterance:
    """One cut of the stream, ready to become one job per target language.

    ``audio`` is framed Opus packets or pcm16 bytes, in the session's format. ``started_at_ms`` is when
    its first audio arrived, ``ended_at_ms`` when it was cut (the ``now_ms`` of the call returning it).
    """

    index: int
    audio: bytes = field(repr=False)
    duration_ms: int
    reason: CutReason
    turn_id: str | None
    started_at_ms: int
    ended_at_ms: int
    next_seq: int = 0
    next_skip: int = 0

    @property
    def is_manual_cut(self) -> bool:
        return self.reason is CutReason.FINAL

    @property
    def is_timeout_triggered(self) -> bool:
        return self.reason is CutReason.PAUSE

    @property
    def is_max_duration_triggered(self) -> bool:
        return self.reason is CutReason.MAX_DURATION


@dataclass(slots=True)
class _Piece:
    at_ms: int
    data: bytes
    units: int
    seq: int = 0
    offset: int = 0  # where ``data`` starts in its chunk's payload
    ends: list[int] | None = None  # opus: where each framed packet ends in ``data`` (one per unit)

    def split_at(self, units: int) -> int:
        """Byte offset in ``data`` where its first ``units`` units end."""
        return self.ends[units - 1] if self.ends is not None else units * PCM16_SAMPLE_BYTES


class _AudioBuffer:
    """Buffered audio as pieces stamped with their arrival time, counted in indivisible units.

    A piece is what one chunk brought: pcm16 samples, or framed Opus packets with the offsets where
    each ends. Units are packets or samples, and a piece is split only between two of them, so cuts
    never tear a packet or sample.
    """

    def __init__(self, audio_format: AudioFormat) -> None:
        self._opus = audio_format == "opus"
        self._pieces: deque[_Piece] = deque()
        self.units = 0
        self.nbytes = 0

    def __bool__(self) -> bool:
        return self.units > 0

    def append(self, pieces: list[_Piece]) -> None:
        self._pieces.extend(pieces)
        self.units += sum(p.units for p in pieces)
        self.nbytes += sum(len(p.data) for p in pieces)

    def units_within(self, max_bytes: int) -> int:
        """How many leading units fit in ``max_bytes`` (at least one, by config validation)."""
        if not self._opus:
            return min(self.units, max_bytes // PCM16_SAMPLE_BYTES)
        total = count = 0
        for piece in self._pieces:
            if total + len(piece.data) > max_bytes:
                assert piece.ends is not None
                return count + bisect_right(piece.ends, max_bytes - total)
            total += len(piece.data)
            count += piece.units
        return count

    def start(self) -> tuple[int, int] | None:
        """(seq, offset) of the first buffered byte, or None when empty."""
        return (self._pieces[0].seq, self._pieces[0].offset) if self._pieces else None

    def take(self, units: int) -> tuple[bytes, int]:
        """Remove the first ``units`` units; return their bytes and the arrival time of the first."""
        started_at_ms = self._pieces[0].at_ms
        parts: list[bytes] = []
        remaining = units
        while remaining:
            piece = self._pieces[0]
            if piece.units <= remaining:
                self._pieces.popleft()
                parts.append(piece.data)
                remaining -= piece.units
            else:
                split = piece.split_at(remaining)
                parts.append(piece.data[:split])
                ends = None if piece.ends is None else [e - split for e in piece.ends[remaining:]]
                self._pieces[0] = _Piece(piece.at_ms, piece.data[split:], piece.units - remaining,
                                         piece.seq, piece.offset + split, ends)
                remaining = 0
        audio = b"".join(parts)
        self.units -= units
        self.nbytes -= len(audio)
        return audio, started_at_ms


class Segmenter:
    """The utterance cutter of one session. See the module docstring for the calling sequence."""

    def __init__(self, config: SegmenterConfig | None = None, start_index: int = 0,
                 start_seq: int = 0, skip: int = 0) -> None:
        self._config = config or SegmenterConfig()
        self._buffer = _AudioBuffer(self._config.audio_format)
        self._next_index = start_index
        # The resume point when nothing is buffered: the chunk whose bytes come next, and how many
        # of its first bytes were already dispatched (only ever for the first chunk of a resume).
        self._cursor_seq = start_seq
        self._skip = (start_seq, skip) if skip else None
        self._turn_id: str | None = None
        # Arrival of the last audio still able to end in a pause; None once a turn-ending cut settled it.
        self._last_audio_ms: int | None = None
        self._tts_playing = False
        self._closed = False

    # -- observation ------------------------------------------------------------------------------------

    @property
    def config(self) -> SegmenterConfig:
        return self._config

    @property
    def next_index(self) -> int:
        """Index the next utterance will get (= number of utterances emitted so far)."""
        return self._next_index

    @property
    def buffered_ms(self) -> int:
        return self._config.units_to_ms(self._buffer.units)

    @property
    def buffered_bytes(self) -> int:
        return self._buffer.nbytes

    @property
    def tts_playing(self) -> bool:
        return self._tts_playing

    @property
    def closed(self) -> bool:
        return self._closed

    def next_deadline_ms(self) -> int | None:
        """When ``poll`` should run next; None when no pause cut can happen (nothing buffered, TTS)."""
        if self._closed or self._tts_playing or not self._buffer or self._last_audio_ms is None:
            return None
        return self._last_audio_ms + self._config.pause_ms

    # -- events -----------------------------------------------------------------------------------------

    def feed_chunk(self, payload: bytes, is_final: bool, now_ms: int, seq: int | None = None) -> list[Utterance]:
        """Take one ``audio_chunk``; return the utterances it completes (possibly several, or none).
        ``seq`` (the chunk's ``audio_chunk.seq``) places resume points; without it chunks count from 0."""
        if self._closed:
            raise ProtocolError("audio_chunk after session_close", code=ErrorCode.SESSION_CLOSED)
        seq = self._cursor_seq if seq is None else seq
        offset = 0
        if self._skip is not None and self._skip[0] == seq:
            offset = min(self._skip[1], len(payload))
            payload = payload[offset:]
        pieces = self._parse(payload, now_ms, seq, offset)  # raises before anything changes
        self._skip = None
        self._cursor_seq = seq
        out = self._cut_if_paused(now_ms)
        if pieces:
            self._buffer.append(pieces)
            self._last_audio_ms = now_ms
        self._cursor_seq = seq + 1
        out += self._cut_over_limits(now_ms, is_final)
        if is_final:
            out += self._end_turn(CutReason.FINAL, now_ms)
        return out

    def poll(self, now_ms: int) -> list[Utterance]:
        """Timer tick: cut on a pause whose deadline has passed. Safe to call at any time."""
        if self._closed:
            return []
        return self._cut_if_paused(now_ms)

    def tts_started(self, now_ms: int) -> list[Utterance]:
        """The client started playing TTS: stop the pause clock.

        A pause that had already elapsed (the timer simply had not fired yet) is cut first, so a late
        timer cannot merge the speech before and after the playback into one utterance.
        """
        out = self.poll(now_ms)
        self._tts_playing = True
        return out

    def tts_ended(self, now_ms: int) -> None:
        """The client finished playing TTS: the pause clock restarts from ``now_ms``.

        A stray end without a start changes nothing, so a duplicated message cannot postpone a cut.
        """
        if not self._tts_playing:
            return
        self._tts_playing = False
        if self._last_audio_ms is not None:
            self._last_audio_ms = now_ms

    def close(self, now_ms: int) -> list[Utterance]:
        """``session_close``: flush the buffer as a last utterance; later calls return nothing."""
        if self._closed:
            return []
        out = self._end_turn(CutReason.CLOSE, now_ms)
        self._closed = True
        return out

    # -- internals --------------------------------------------------------------------------------------

    def _parse(self, payload: bytes, now_ms: int, seq: int, offset: int) -> list[_Piece]:
        if self._config.audio_format == "opus":
            ends = opus_frame_ends(payload)
            if not ends:
                return []
            limit = self._config.max_buffer_bytes
            if len(payload) > limit:  # only then can one packet be over the limit
                for start, stop in zip([0, *ends], ends, strict=False):
                    if stop - start > limit:
                        raise ValueError(
                            f"opus packet of {stop - start} bytes exceeds max_buffer_bytes={limit}"
                        )
            return [_Piece(now_ms, bytes(payload), len(ends), seq, offset, ends)]
        if len(payload) % PCM16_SAMPLE_BYTES:
            raise ValueError(f"pcm16 audio must have an even byte count, got {len(payload)}")
        if not payload:
            return []
        return [_Piece(now_ms, bytes(payload), len(payload) // PCM16_SAMPLE_BYTES, seq, offset)]

    def _cut_if_paused(self, now_ms: int) -> list[Utterance]:
        if (
            self._tts_playing
            or self._last_audio_ms is None
            or now_ms - self._last_audio_ms < self._config.pause_ms
        ):
            return []
        return self._end_turn(CutReason.PAUSE, now_ms)

    def _cut_over_limits(self, now_ms: int, is_final: bool) -> list[Utterance]:
        config = self._config
        out: list[Utterance] = []
        while True:
            units = self._buffer.units
            over_duration = units > config.max_units or (units == config.max_units and not is_final)
            over_bytes = self._buffer.nbytes > config.max_buffer_bytes
            if not (over_duration or over_bytes):
                return out
            take, reason = min(units, config.max_units), CutReason.MAX_DURATION
            fit = self._buffer.units_within(config.max_buffer_bytes)
            if fit < take:
                take, reason = fit, CutReason.MAX_BUFFER
            if self._turn_id is None:
                self._turn_id = f"turn-{self._next_index}"
            out.append(self._emit(take, reason, now_ms))

    def _end_turn(self, reason: CutReason, now_ms: int) -> list[Utterance]:
        out = [self._emit(self._buffer.units, reason, now_ms)] if self._buffer else []
        self._turn_id = None
        self._last_audio_ms = None
        return out

    def _emit(self, units: int, reason: CutReason, now_ms: int) -> Utterance:
        audio, started_at_ms = self._buffer.take(units)
        next_seq, next_skip = self._buffer.start() or (self._cursor_seq, 0)
        utterance = Utterance(
            index=self._next_index,
            audio=audio,
            duration_ms=self._config.units_to_ms(units),
            reason=reason,
            turn_id=self._turn_id,
            started_at_ms=started_at_ms,
            ended_at_ms=now_ms,
            next_seq=next_seq,
            next_skip=next_skip,
        )
        self._next_index += 1
        return utterance
