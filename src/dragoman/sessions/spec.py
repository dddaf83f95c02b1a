"""What a session is: its validated settings (from ``session_init``), and the scheduler settings
that shape it. Both are plain data; the spec is stored with the session in Redis, so a process that
resumes the session knows it."""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from typing import Any

import msgspec

from dragoman.config import Settings
from dragoman.core.pools import pool_for_job
from dragoman.errors import ProtocolError
from dragoman.store.keys import check_pool
from dragoman.wire import ErrorCode, SessionInit

MAX_TARGETS = 8


class SessionSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a session_init asked for, validated."""

    session_id: str
    trace_id: str
    src_lang: str
    tgt_langs: tuple[str, ...]
    audio_format: str
    sample_rate: int
    mode: str | None = None
    lang_a: str | None = None
    lang_b: str | None = None
    auto_langs: tuple[str, ...] | None = None
    dialect: str | None = None
    features: dict[str, Any] | None = None
    key: str = ""  # digest of the API key that opened it: only that key may resume it
    resume: str = ""  # digest of its resume token: only the client that has it may resume it

    @classmethod
    def from_init(cls, msg: SessionInit, api_key: str = "", session_id: str | None = None,
                  resume_token: str = "") -> SessionSpec:
        tgts = tuple(dict.fromkeys(msg.tgt_langs or [msg.tgt_lang]))
        if not tgts or len(tgts) > MAX_TARGETS:
            raise ProtocolError(f"tgt_langs must name 1 to {MAX_TARGETS} target languages")
        spec = cls(
            session_id=session_id or uuid.uuid4().hex, trace_id=msg.trace_id or uuid.uuid4().hex,
            src_lang=msg.src_lang, tgt_langs=tgts, audio_format=msg.audio_format, sample_rate=msg.sample_rate,
            mode=msg.mode, lang_a=msg.lang_a, lang_b=msg.lang_b,
            auto_langs=tuple(msg.auto_langs) if msg.auto_langs else None, dialect=msg.dialect,
            features=msg.features, key=key_digest(api_key), resume=key_digest(resume_token))
        for tgt in tgts:
            spec.pool_for(tgt)
        return spec

    def pool_for(self, tgt: str) -> str:
        try:
            return check_pool(pool_for_job(self.src_lang, tgt, self.lang_a, self.lang_b))
        except ValueError as exc:
            raise ProtocolError(f"unusable languages: {exc}") from None

    def to_json(self) -> str:
        return msgspec.json.encode(self).decode()

    @classmethod
    def from_json(cls, text: str) -> SessionSpec:
        try:
            return msgspec.json.decode(text, type=cls)
        except msgspec.DecodeError:
            raise ProtocolError("the session's stored settings are unreadable", code=ErrorCode.INVALID_SESSION) from None


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else ""


@dataclasses.dataclass(frozen=True, slots=True)
class SessionConfig:
    """The scheduler settings a session follows (defaults are PROTOCOL.md's)."""

    pause_ms: int = 3_000
    max_duration_ms: int = 10_000
    max_buffer_bytes: int = 500 * 1024
    chunks_per_s: float = 50.0
    outcome_check_ms: int = 5_000
    job_timeout_ms: int = 60_000
    pending_timeout_ms: int = 10_000
    max_attempts: int = 3
    padding_ms: int = 0
    ack_interval_ms: int = 1_000
    ack_batch: int = 64
    room_max_members: int = 16
    room_expiry_ms: int = 1_800_000

    @classmethod
    def from_settings(cls, s: Settings) -> SessionConfig:
        return cls(pause_ms=s.pause_ms, max_duration_ms=s.max_duration_ms, max_buffer_bytes=s.max_buffer_bytes,
                   chunks_per_s=s.chunks_per_s, outcome_check_ms=s.outcome_check_ms,
                   job_timeout_ms=s.job_timeout_ms, pending_timeout_ms=s.pending_timeout_ms,
                   max_attempts=s.max_attempts, padding_ms=s.padding_ms, room_max_members=s.room_max_members,
                   room_expiry_ms=s.room_expiry_ms)

    @property
    def job_bound_ms(self) -> int:
        """The longest a job can take before Redis itself ends it (every attempt waits in a queue
        and then runs to its lease), plus two checks: past it, the session answers for the job."""
        return self.max_attempts * (self.job_timeout_ms + self.pending_timeout_ms) + 2 * self.outcome_check_ms
