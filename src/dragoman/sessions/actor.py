"""The session actor: the single owner of one client session's per-connection state.

Every input (client frames, job outcomes, timer ticks) arrives through one inbox and is handled by
one task, so the segmenter and the result orderer need no locks. Shared facts (jobs, slots, nodes)
live in Redis and change only through the Store.

Per utterance and target language the client hears exactly one of: ``translation_result``,
``missing_result``, or ``error`` (+ ``ui_event`` ERROR), in utterance order per target.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import time
import uuid
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog

from dragoman.core.ordering import GapTimeout, ResultOrderer
from dragoman.core.pools import pool_for_job
from dragoman.core.ratelimit import TokenBucket
from dragoman.core.segmentation import Segmenter, SegmenterConfig
from dragoman.core.segmentation import Utterance as Cut
from dragoman.errors import DependencyDown, DragomanError, ProtocolError
from dragoman.store.api import Effect, JobSpec
from dragoman.store.keys import check_pool
from dragoman.wire import (
    PROTOCOL_VERSION,
    AudioChunk,
    Backpressure,
    ClientHeartbeat,
    ErrorMessage,
    JobResult,
    Message,
    MissingResult,
    Pipeline,
    ServerHeartbeat,
    SessionClose,
    SessionCloseAck,
    SessionInit,
    SessionInitAck,
    TranslationResult,
    TtsPlayEnded,
    TtsStarted,
    UiEvent,
    Utterance,
    encode,
)

if TYPE_CHECKING:
    from dragoman.app.hub import Hub

log = structlog.get_logger(__name__)
_result_decoder = msgspec.json.Decoder(JobResult)
EMPTY_REASONS = {"ASR_EMPTY": "asr_empty", "NO_TEXT_ASSIGNED": "no_text_assigned"}


class Sink(Protocol):
    def send(self, text: str) -> bool: ...


def now_ms() -> int:
    return int(time.monotonic() * 1000)


@dataclasses.dataclass(frozen=True)
class SessionSpec:
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

    @classmethod
    def from_init(cls, msg: SessionInit) -> SessionSpec:
        tgts = tuple(dict.fromkeys(msg.tgt_langs or [msg.tgt_lang]))
        if not tgts or len(tgts) > 8:
            raise ProtocolError("tgt_langs must name 1 to 8 target languages")
        spec = cls(
            session_id=uuid.uuid4().hex, trace_id=msg.trace_id or uuid.uuid4().hex, src_lang=msg.src_lang,
            tgt_langs=tgts, audio_format=msg.audio_format, sample_rate=msg.sample_rate, mode=msg.mode,
            lang_a=msg.lang_a, lang_b=msg.lang_b,
            auto_langs=tuple(msg.auto_langs) if msg.auto_langs else None, dialect=msg.dialect, features=msg.features)
        for tgt in tgts:
            spec.pool_for(tgt)
        return spec

    def pool_for(self, tgt: str) -> str:
        try:
            return check_pool(pool_for_job(self.src_lang, tgt, self.lang_a, self.lang_b))
        except ValueError as exc:
            raise ProtocolError(f"unusable languages: {exc}") from None


@dataclasses.dataclass
class _Job:
    utt: int
    tgt: str
    cut_at_ms: int
    dispatched_at_ms: int


class SessionActor:
    def __init__(self, hub: Hub, spec: SessionSpec, sink: Sink, api_key: str = "") -> None:
        self.hub = hub
        self.spec = spec
        self.sink = sink
        self.api_key = api_key
        s = hub.settings
        self.segmenter = Segmenter(SegmenterConfig(
            pause_ms=s.pause_ms, max_duration_ms=s.max_duration_ms, max_buffer_bytes=s.max_buffer_bytes,
            audio_format=spec.audio_format, sample_rate=spec.sample_rate))  # type: ignore[arg-type]
        self.orderer: ResultOrderer[list[Message]] = ResultOrderer(gap_ms=s.result_gap_ms)
        self.jobs: dict[str, _Job] = {}
        self.inbox: asyncio.Queue[tuple[str, Any, Any]] = asyncio.Queue()
        # Client frames waiting in the inbox are bounded: the socket reader takes a slot before
        # posting one, so a client that sends faster than we dispatch is slowed down by TCP.
        self.frame_slots = asyncio.Semaphore(64)
        self.streaming: bool | None = None  # audio_chunk (True) or whole utterances (False)
        self._last_client_index = -1
        self.opened_at_ms = int(time.time() * 1000)
        self.utterances = 0
        self.closing_deadline: int | None = None
        self.finished = asyncio.Event()
        self._chunks = TokenBucket(s.chunks_per_s, burst=s.chunks_per_s, now_ms=now_ms())
        self._strikes = 0

    # ------------------------------------------------------------------ inbox
    def post_frame(self, msg: Message) -> None:
        """Post a client frame (the caller holds one of ``frame_slots``; it is released when handled)."""
        self.inbox.put_nowait(("frame", msg, None))

    def post_outcome(self, effect: Effect, payload: str | None) -> None:
        self.inbox.put_nowait(("outcome", effect, payload))

    def post_disconnect(self) -> None:
        self.inbox.put_nowait(("gone", None, None))

    def ack(self) -> None:
        self.send(SessionInitAck(
            session_id=self.spec.session_id, message="session ready", trace_id=self.spec.trace_id,
            protocol_version=PROTOCOL_VERSION, use_binary_frame=False,
            negotiated_codec=self.spec.audio_format, negotiated_audio_format=self.spec.audio_format,
            negotiated_sample_rate=self.spec.sample_rate, negotiated_channel_count=1))

    async def run(self) -> None:
        """Handle inbox items and timers until the session is closed and everything owed was sent,
        or the client went away."""
        try:
            while True:
                deadline = self._next_deadline()
                timeout = None if deadline is None else max(0.0, (deadline - now_ms()) / 1000)
                try:
                    kind, item, extra = await asyncio.wait_for(self.inbox.get(), timeout)
                except TimeoutError:
                    await self._tick()
                else:
                    if kind == "gone":
                        await self._abandon_waiting_jobs()
                        return
                    if kind == "frame":
                        try:
                            await self._on_frame(item)
                        finally:
                            self.frame_slots.release()
                    else:
                        self._on_outcome(item, extra)
                if self._maybe_finish():
                    return
        except Exception:
            log.exception("session actor failed", session=self.spec.session_id)
            self.error("INTERNAL_ERROR", "the session failed; please reconnect")
            raise
        finally:
            self.finished.set()

    async def _abandon_waiting_jobs(self) -> None:
        """The client went away: jobs already running finish and free their slots, but jobs still
        waiting in a queue would take a slot for nobody, so they are cancelled."""
        for job_id in list(self.jobs):
            try:
                job = await self.hub.store.job(job_id)
                if job is not None and job.get("state") == "queued":
                    await self.hub.store.cancel(job_id, "SESSION_CLOSED")
            except DragomanError as exc:
                log.warning("could not cancel a waiting job", job=job_id, error=str(exc))

    def _next_deadline(self) -> int | None:
        times = [t for t in (self.segmenter.next_deadline_ms(), self.orderer.next_deadline_ms(),
                             self.closing_deadline) if t is not None]
        return min(times) if times else None

    async def _tick(self) -> None:
        now = now_ms()
        if not self.segmenter.closed:
            await self._dispatch_cuts(self.segmenter.poll(now))
        self._deliver(self.orderer.poll(now))
        if self.closing_deadline is not None and now >= self.closing_deadline:
            self._deliver(self.orderer.drain(now, force=True))

    def _maybe_finish(self) -> bool:
        if self.closing_deadline is None or self.orderer.owed() > 0:
            return False
        self.send(SessionCloseAck(session_id=self.spec.session_id))
        return True

    # ------------------------------------------------------------------ client frames
    def send(self, msg: Message) -> None:
        self.sink.send(encode(msg))

    def error(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.send(ErrorMessage(code=code, message=message, details=details))

    async def _on_frame(self, msg: Message) -> None:
        try:
            if isinstance(msg, AudioChunk):
                await self._on_chunk(msg)
            elif isinstance(msg, Utterance):
                await self._on_utterance(msg)
            elif isinstance(msg, TtsStarted):
                await self._dispatch_cuts(self.segmenter.tts_started(now_ms()))
            elif isinstance(msg, TtsPlayEnded):
                self.segmenter.tts_ended(now_ms())
            elif isinstance(msg, ClientHeartbeat):
                self.send(ServerHeartbeat(session_id=self.spec.session_id, timestamp=int(time.time() * 1000)))
            elif isinstance(msg, SessionClose):
                await self._on_close()
            elif isinstance(msg, SessionInit):
                raise ProtocolError("session already initialised")
            else:
                raise ProtocolError(f"unexpected message {type(msg).__name__}")
        except ProtocolError as exc:
            self.error(exc.code, exc.message)

    def _mode(self, streaming: bool) -> None:
        """A session either streams audio (the scheduler numbers utterances) or sends whole
        utterances (the client numbers them); mixing the two would mix two numberings."""
        if self.streaming is None:
            self.streaming = streaming
        elif self.streaming != streaming:
            raise ProtocolError("this session " + ("streams audio_chunk" if self.streaming else "sends utterance")
                                + " messages; do not mix audio_chunk and utterance in one session")

    async def _on_chunk(self, msg: AudioChunk) -> None:
        if self.closing_deadline is not None:
            raise ProtocolError("session is closing", code="SESSION_CLOSED")
        self._mode(streaming=True)
        if not self._chunks.allow(now_ms()):
            self.send(Backpressure(action="SLOW_DOWN", resume_after_ms=1000, message="too many chunks"))
            raise ProtocolError("audio_chunk rate limit exceeded; chunk dropped", code="RATE_LIMITED")
        try:
            audio = base64.b64decode(msg.payload or "", validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("audio_chunk payload is not valid base64") from None
        try:
            cuts = self.segmenter.feed_chunk(audio, msg.is_final, now_ms())
        except ValueError as exc:
            raise ProtocolError(f"audio_chunk payload: {exc}") from None
        await self._dispatch_cuts(cuts)

    async def _on_utterance(self, msg: Utterance) -> None:
        """A client-cut utterance: one job per target, numbered by the client."""
        if self.closing_deadline is not None:
            raise ProtocolError("session is closing", code="SESSION_CLOSED")
        self._mode(streaming=False)
        try:
            audio = base64.b64decode(msg.audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("utterance audio is not valid base64") from None
        if msg.audio_format != self.spec.audio_format:
            raise ProtocolError("utterance audio_format differs from the session's")
        if len(audio) > self.hub.settings.max_buffer_bytes:
            raise ProtocolError("utterance audio is larger than max_buffer_bytes")
        if not audio:
            return
        now = now_ms()
        cut = Cut(index=msg.utterance_index, audio=audio, duration_ms=0, reason="final",  # type: ignore[arg-type]
                  turn_id=None, started_at_ms=now, ended_at_ms=now)
        owed = self.orderer.unsettled()
        last = max((i for _, i in owed), default=-1)
        if msg.utterance_index <= max(last, self._last_client_index):
            raise ProtocolError(f"utterance_index must increase: {msg.utterance_index} after "
                                f"{max(last, self._last_client_index)}")
        self._last_client_index = msg.utterance_index
        for tgt in self.spec.tgt_langs:
            self.orderer.expect(tgt, msg.utterance_index, now)
        await self._dispatch(cut, expected=True)

    async def _on_close(self) -> None:
        if self.closing_deadline is not None:
            return
        now = now_ms()
        await self._dispatch_cuts(self.segmenter.close(now))
        # Everything owed is bounded by its job's own timeouts; this is a backstop.
        s = self.hub.settings
        self.closing_deadline = now + s.result_gap_ms + s.pending_timeout_ms + s.job_timeout_ms

    # ------------------------------------------------------------------ jobs
    async def _dispatch_cuts(self, cuts: list[Cut]) -> None:
        for cut in cuts:
            await self._dispatch(cut)

    def _job_body(self, cut: Cut, tgt: str) -> str:
        spec = self.spec
        two_way = spec.src_lang == "auto"
        body: dict[str, Any] = {
            "type": "job_assign", "session_id": spec.session_id, "utterance_index": cut.index,
            "src_lang": spec.src_lang, "tgt_lang": tgt,
            "pipeline": msgspec.structs.asdict(Pipeline()),
            "audio": base64.b64encode(cut.audio).decode(), "audio_format": spec.audio_format,
            "sample_rate": spec.sample_rate, "trace_id": spec.trace_id,
            "padding_ms": self.hub.settings.padding_ms,
            "is_manual_cut": cut.is_manual_cut, "is_timeout_triggered": cut.is_timeout_triggered,
            "is_max_duration_triggered": cut.is_max_duration_triggered,
        }
        optional = {
            "dialect": spec.dialect, "features": spec.features, "turn_id": cut.turn_id,
            "mode": spec.mode or ("two_way_auto" if two_way else None),
            "lang_a": spec.lang_a if two_way else None, "lang_b": spec.lang_b if two_way else None,
            "auto_langs": list(spec.auto_langs or (spec.lang_a, spec.lang_b)) if two_way else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        return msgspec.json.encode(body).decode()

    async def _dispatch(self, cut: Cut, expected: bool = False) -> None:
        self.utterances += 1
        avoid: list[str] = []
        for tgt in self.spec.tgt_langs:
            now = now_ms()
            if not expected:
                self.orderer.expect(tgt, cut.index, now)
            data = self._job_body(cut, tgt)
            spec = JobSpec(pool=self.spec.pool_for(tgt), session_id=self.spec.session_id,
                           utterance_index=cut.index, tgt_lang=tgt, data=data, avoid=tuple(avoid))
            started = time.perf_counter()
            try:
                reply = await self.hub.store.dispatch(spec)
            except (DependencyDown, DragomanError) as exc:
                code = "SCHEDULER_DEPENDENCY_DOWN" if isinstance(exc, DependencyDown) else "INTERNAL_ERROR"
                log.error("dispatch failed", session=self.spec.session_id, error=str(exc))
                self._settle(tgt, cut.index, self._failure(code, str(exc), cut.index, tgt, None))
                continue
            self.hub.metrics.dispatch_latency.observe(time.perf_counter() - started)
            self.jobs[reply.job_id] = _Job(cut.index, tgt, cut.ended_at_ms, now)
            if reply.node:
                avoid.append(reply.node)
            if reply.status == "assigned":
                self.send(UiEvent(trace_id=self.spec.trace_id, session_id=self.spec.session_id,
                                  job_id=reply.job_id, utterance_index=cut.index, event="DISPATCHED", status="ok"))
            elif reply.code == "NODE_OVERLOADED":
                self.send(Backpressure(action="BUSY", resume_after_ms=1000,
                                       message=f"queue full for {spec.pool}"))
            await self.hub.deliver(reply.effects, payloads={reply.job_id: data})

    def _failure(self, code: str, message: str, utt: int, tgt: str, job_id: str | None,
                 node_code: str | None = None) -> list[Message]:
        details: dict[str, Any] = {"utterance_index": utt, "tgt_lang": tgt, "trace_id": self.spec.trace_id}
        if job_id:
            details["job_id"] = job_id
        if node_code and node_code != code:
            details["node_error_code"] = node_code
        return [
            ErrorMessage(code=code, message=message, details=details),
            UiEvent(trace_id=self.spec.trace_id, session_id=self.spec.session_id, job_id=job_id or "",
                    utterance_index=utt, event="ERROR", status="error", error_code=code),
        ]

    def _on_outcome(self, effect: Effect, payload: str | None) -> None:
        job = self.jobs.pop(effect.job, None)
        if job is None:
            return
        messages = self._outcome_messages(effect, payload, job)
        if effect.state == "completed":
            self.hub.metrics.e2e_latency.observe(max(0, now_ms() - job.cut_at_ms) / 1000)
        self._settle(job.tgt, job.utt, messages)

    def _outcome_messages(self, effect: Effect, payload: str | None, job: _Job) -> list[Message]:
        result: JobResult | None = None
        if payload:
            try:
                result = _result_decoder.decode(payload)
            except msgspec.DecodeError:
                result = None
        sid, utt = self.spec.session_id, job.utt
        if effect.state == "completed" and result is not None:
            timings = (result.extra or {}).get("service_timings")
            return [TranslationResult(
                session_id=sid, utterance_index=utt, job_id=effect.job, text_asr=result.text_asr or "",
                text_translated=result.text_translated or "", tts_audio=result.tts_audio or "",
                tts_format=result.tts_format or "", trace_id=self.spec.trace_id, extra=result.extra,
                service_timings=timings if isinstance(timings, dict) else None,
                scheduler_sent_at_ms=int(time.time() * 1000), tgt_lang=job.tgt,
                asr_quality_level=result.asr_quality_level, reason_codes=result.reason_codes,
                quality_score=result.quality_score, rerun_count=result.rerun_count,
                segments_meta=result.segments_meta)]
        if effect.state == "completed_empty":
            reason = EMPTY_REASONS.get((result.extra_reason if result else None) or "", "asr_empty")
            return [MissingResult(session_id=sid, utterance_index=utt, reason=reason,
                                  created_at_ms=int(time.time() * 1000), trace_id=self.spec.trace_id,
                                  tgt_lang=job.tgt)]
        code = effect.code or "INTERNAL_ERROR"
        message = {
            "NO_AVAILABLE_NODE": f"no node serves {self.spec.pool_for(job.tgt)}",
            "JOB_TIMEOUT": "the job did not finish in time",
            "NODE_OVERLOADED": "every node of the pool is busy and its queue is full",
            "JOB_CANCELLED": "the job was cancelled",
        }.get(code, "the job failed")
        node_code = None
        if result is not None and result.error is not None:
            message = result.error.message or message
            node_code = result.error.code
        return self._failure(code, message, utt, job.tgt, effect.job, node_code)

    def _settle(self, tgt: str, utt: int, messages: list[Message]) -> None:
        self._deliver(self.orderer.push(tgt, utt, messages, now_ms()))

    def _deliver(self, deliveries: list[Any]) -> None:
        for item in deliveries:
            if isinstance(item, GapTimeout):
                self.send(MissingResult(session_id=self.spec.session_id, utterance_index=item.utterance_index,
                                        reason="gap_timeout", created_at_ms=int(time.time() * 1000),
                                        trace_id=self.spec.trace_id, tgt_lang=item.tgt_lang))
            else:
                for msg in item.outcome:
                    self.send(msg)

    def describe(self) -> dict[str, Any]:
        return {"session_id": self.spec.session_id, "src_lang": self.spec.src_lang,
                "tgt_langs": list(self.spec.tgt_langs), "utterances": self.utterances,
                "owed": self.orderer.owed(), "opened_at_ms": self.opened_at_ms}
