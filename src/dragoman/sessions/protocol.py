"""The session plane as a sans-I/O state machine: one client session's rules, with no socket, no
Redis and no clock of its own.

Events go in, each with ``now`` (monotonic ms); actions come out, for the shell (``actor.py``) to
carry out in order::

    proto = SessionProtocol(spec, config, now=..., wall_offset_ms=...)     # or resume=ResumeState(...)
    actions = proto.start(now)                       # the session_init_ack (and a resume's backlog)
    actions = proto.receive(frame, now)              # a client frame (decoded wire struct)
    actions = proto.dispatched(request, result, now) # what a Dispatch action's store call answered
    actions = proto.outcome(outcome, now)            # a job's outcome (an effect from Redis)
    actions = proto.checked(statuses, now)           # what a CheckJobs action found
    actions = proto.tick(now)                        # when next_deadline() has passed
    actions = proto.socket_lost(now) / superseded() / redis_reset(now)
    deadline = proto.next_deadline()                 # re-arm the timer after EVERY call

What it owns: cutting audio into utterances (``core.segmentation``), numbering them, one job per
target language for each (dispatched one at a time, so each target avoids the nodes running the
others), mapping every job's outcome to the client's messages, and releasing them in utterance
order per target (``core.ordering``), each exactly once.

Every owed outcome has a deadline (I10): a job waited on for ``outcome_check_ms`` is checked in
Redis (``CheckJobs``): an ended job's kept outcome is delivered, a job Redis lost is dispatched again
once from the audio kept here, a running one is waited for; past ``job_bound_ms`` (longer than Redis
itself lets a job live) the session answers it with JOB_TIMEOUT and cancels it.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import random
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any, TypeAlias

import msgspec

from dragoman.core.ordering import ResultOrderer
from dragoman.core.ratelimit import TokenBucket
from dragoman.core.segmentation import CutReason, Segmenter, SegmenterConfig
from dragoman.core.segmentation import Utterance as Cut
from dragoman.errors import ProtocolError
from dragoman.ids import new_id
from dragoman.store.replies import JobState, JobStatus, RoomMemberRecord, Status
from dragoman.wire import (
    EMPTY_RESULT_REASONS,
    PROTOCOL_VERSION,
    AudioChunk,
    Backpressure,
    ClientHeartbeat,
    ErrorCode,
    ErrorMessage,
    JobAssignBody,
    JobResult,
    Message,
    MissingResult,
    Pipeline,
    RoomCreate,
    RoomCreateAck,
    RoomError,
    RoomErrorCode,
    RoomExpired,
    RoomJoin,
    RoomLeave,
    RoomMember,
    RoomMembers,
    RoomRawVoicePreference,
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
    WebrtcAnswer,
    WebrtcIce,
    WebrtcOffer,
    encode,
)

from .spec import SessionConfig, SessionSpec

Lane: TypeAlias = tuple[str, str]  # (the speaking session's id, target language)
_result_decoder = msgspec.json.Decoder(JobResult)


# ---------------------------------------------------------------------------------------- actions


@dataclasses.dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class JobRequest:
    """One job to dispatch: one utterance, one target."""

    lane: Lane
    utt: int
    tgt: str
    pool: str
    body: str  # encoded JobAssignBody
    unique: str
    avoid: tuple[str, ...] = ()
    commit: tuple[int, int, int, int] | None = None  # the resume point once this one is dispatched
    listeners: tuple[str, ...] = ()  # a room job: "session@process" of each member it is for


@dataclasses.dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class Send:
    message: Message
    soon: bool = False  # nobody waits on it (a ui_event): it may leave with the next frame (Transport.send_soon)


@dataclasses.dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class Dispatch:
    request: JobRequest


@dataclasses.dataclass(frozen=True, slots=True)
class CheckJobs:
    job_ids: tuple[str, ...]


@dataclasses.dataclass(frozen=True, slots=True)
class Ack:
    """Outcomes delivered: ``job_ids`` are read before they are forgotten (a job that has not ended
    is left as it is); ``ended`` are the session's own jobs whose outcome Redis gave it (so ended
    for sure), forgotten unread."""

    job_ids: tuple[str, ...]
    ended: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class CancelJob:
    job_id: str
    code: str


@dataclasses.dataclass(frozen=True, slots=True)
class RoomCall:
    """One room transition (``Store.room``); its answer comes back through ``room_answered``."""

    op: str  # create | join | leave | prefer | speak | signal
    code: str
    arg5: str = ""
    arg6: str = ""
    rejoin: bool = False  # a join of the room this session is in, after Redis may have lost it


@dataclasses.dataclass(frozen=True, slots=True)
class Reopen:
    """Redis lost the session's record, or declared this process dead: make it live here again."""


@dataclasses.dataclass(frozen=True, slots=True)
class Detach:
    """The socket is gone: keep the session for a client that resumes (the grace period)."""


@dataclasses.dataclass(frozen=True, slots=True)
class End:
    """The session is over: forget it in Redis."""


@dataclasses.dataclass(frozen=True, slots=True)
class CloseSocket:
    code: int = 1000


@dataclasses.dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class Observe:
    """A measurement for the metrics: ``name`` in seconds."""

    name: str
    seconds: float


@dataclasses.dataclass(frozen=True, slots=True)
class Count:
    """Something worth counting happened (for the metrics), e.g. ``lost_job_rerun``."""

    name: str


@dataclasses.dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class Settled:
    """A job's one outcome was taken (for the metrics: counted once, whatever repeats arrive)."""

    state: str
    code: str


Action: TypeAlias = (Send | Dispatch | CheckJobs | Ack | CancelJob | RoomCall | Reopen | Detach | End | CloseSocket
                     | Observe | Count | Settled)


# ----------------------------------------------------------------------------------------- inputs


@dataclasses.dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class Outcome:
    """A job's one outcome. ``result`` is the node's decoded job_result when the caller had it;
    else ``payload`` (its JSON) is decoded here, once."""

    job: str
    state: str
    code: str = ""
    result: JobResult | None = None
    payload: str | None = None


@dataclasses.dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class DispatchResult:
    status: str  # a store Status, or "error" when the store could not be reached
    job_id: str = ""
    node: str = ""
    code: str = ""
    message: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class RoomAnswer:
    status: str  # a store Status ("created", "joined", "error"...), or "unreachable"
    code: str = ""  # a room error code (status "error")
    room_id: str = ""
    members: tuple[RoomMemberRecord, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class RoomNews:
    """A room's news for this session (a "room" effect): members changed, it expired, or signalling."""

    room: str
    event: str  # members | expired | signal
    sender: str = ""
    payload: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _Fanout:
    """A cut made in a room: who hears it is asked of the room (``RoomCall("speak")``) first."""

    cut: Cut
    audio: str


@dataclasses.dataclass(frozen=True, slots=True)
class ResumeState:
    """What Redis kept of a session taken over (``Store.resume_session``)."""

    epoch: int
    next_utt: int
    seq: int
    skip: int
    jobs: tuple[JobStatus, ...]


# ---------------------------------------------------------------------------------------- the rules


@dataclasses.dataclass(slots=True)
class _Slot:
    lane: Lane
    utt: int
    tgt: str
    body: str
    cut_at: int
    job_id: str = ""
    pool: str = ""  # another speaker's job (a room listener's slot): that speaker's pool
    room: bool = False  # another speaker's job: its listeners, together, own it
    check_at: int = 0
    hard_at: int = 0
    redispatched: bool = False
    checking: bool = False


# Room codes come from the system's randomness; one instance for every session (a Random instance
# carries 2.5 kB of generator state, unused by SystemRandom but allocated all the same).
_SYSTEM_RANDOM = random.SystemRandom()

_FAILURE_TEXT = {
    ErrorCode.NO_AVAILABLE_NODE: "no node serves {pool}",
    ErrorCode.JOB_TIMEOUT: "the job did not finish in time",
    ErrorCode.NODE_OVERLOADED: "every node of the pool is busy and its queue is full",
    ErrorCode.NODE_UNAVAILABLE: "no node of the pool could be reached",
    ErrorCode.JOB_CANCELLED: "the job was cancelled",
    ErrorCode.SCHEDULER_DEPENDENCY_DOWN: "the scheduler's store is unreachable",
}


class SessionProtocol:
    def __init__(self, spec: SessionSpec, config: SessionConfig, *, now: int, wall_offset_ms: int = 0,
                 resume: ResumeState | None = None, resume_token: str | None = None,
                 rng: random.Random | None = None) -> None:
        self.spec = spec
        self._resume_token = resume_token
        self._rng = rng or _SYSTEM_RANDOM
        self.room: str | None = None  # the room this session is in
        self._room_call: RoomCall | None = None  # a create/join/leave waiting for its answer
        self._room_display: tuple[str | None, str | None] = (None, None)
        self._create_tries = 0
        self._rejoin_at: int | None = None  # when to join self.room again (the store was out of reach)
        self._rejoin_tries = 0
        self.config = config
        self._wall_offset = wall_offset_ms
        self.resume = resume
        self.epoch = resume.epoch if resume else 1
        start_utt = resume.next_utt if resume else 0
        self._start_seq = resume.seq if resume else 0
        self.segmenter = Segmenter(SegmenterConfig(
            pause_ms=config.pause_ms, max_duration_ms=config.max_duration_ms,
            max_buffer_bytes=config.max_buffer_bytes, audio_format=spec.audio_format,  # type: ignore[arg-type]
            sample_rate=spec.sample_rate), start_index=start_utt, start_seq=self._start_seq,
            skip=resume.skip if resume else 0)
        # (each outcome with its job's id, and whether its ack may skip the read: see Ack)
        self.orderer: ResultOrderer[Lane, tuple[list[Message], str, bool]] = ResultOrderer()
        self._slots: dict[tuple[Lane, int], _Slot] = {}
        self._by_job: dict[str, tuple[Lane, int]] = {}
        self._queue: deque[JobRequest | _Fanout] = deque()
        self._in_flight: JobRequest | _Fanout | None = None
        self._avoid: dict[int, list[str]] = {}
        self._acks: list[str] = []
        self._acks_ended: list[str] = []
        self._ack_at: int | None = None
        self._chunks = TokenBucket(config.chunks_per_s, burst=config.chunks_per_s, now_ms=now)
        self.streaming: bool | None = None  # audio_chunk (True) or whole utterances (False)
        self._last_client_index = start_utt - 1
        self.closing = False
        self.finished = False
        self.utterances = 0
        self.late_outcomes = 0
        self.opened_at_ms = self._wall(now)

    # ------------------------------------------------------------------ views
    @property
    def session_id(self) -> str:
        return self.spec.session_id

    def owed(self) -> int:
        """Outcomes this session's client is still owed (a cut waiting for its room's fan-out counts one)."""
        waiting = [*self._queue, self._in_flight]
        return self.orderer.owed() + sum(isinstance(item, _Fanout) for item in waiting)

    def job_ids(self) -> list[str]:
        return list(self._by_job)

    def next_deadline(self) -> int | None:
        best = self.segmenter.next_deadline_ms()
        for t in (self._ack_at, self._rejoin_at):
            if t is not None and (best is None or t < best):
                best = t
        for slot in self._slots.values():
            if slot.job_id and not slot.checking and (best is None or slot.check_at < best):
                best = slot.check_at
            if slot.hard_at and (best is None or slot.hard_at < best):
                best = slot.hard_at
        return best

    def describe(self) -> dict[str, Any]:
        return {"session_id": self.spec.session_id, "src_lang": self.spec.src_lang,
                "tgt_langs": list(self.spec.tgt_langs), "utterances": self.utterances,
                "owed": self.owed(), "opened_at_ms": self.opened_at_ms, "epoch": self.epoch}

    def _wall(self, now: int) -> int:
        return now + self._wall_offset

    # ------------------------------------------------------------------ start
    def start(self, now: int) -> list[Action]:
        """The session_init_ack; for a resumed session, what it is still owed follows."""
        resume = self.resume
        out: list[Action] = [Send(SessionInitAck(
            session_id=self.spec.session_id, message="session resumed" if resume else "session ready",
            trace_id=self.spec.trace_id, protocol_version=PROTOCOL_VERSION, use_binary_frame=False,
            negotiated_codec=self.spec.audio_format, negotiated_audio_format=self.spec.audio_format,
            negotiated_sample_rate=self.spec.sample_rate, negotiated_channel_count=1,
            resumed=True if resume else None, resume_from_seq=resume.seq if resume else None,
            resume_from_utterance_index=resume.next_utt if resume else None, resume_token=self._resume_token))]
        if resume is None:
            return out
        # Jobs of utterances past the recorded resume point were never committed: the client sends
        # that audio again, so they are redone, not owed twice.
        for status in sorted(resume.jobs, key=lambda s: (s.tgt, s.utt)):
            if status.utt >= resume.next_utt or status.tgt not in self.spec.tgt_langs:
                if status.state != JobState.MISSING and not status.state.terminal:
                    out.append(CancelJob(status.job, ErrorCode.SESSION_CLOSED))
                self._acks.append(status.job)
                continue
            lane = (self.spec.session_id, status.tgt)
            last = self.orderer.last_expected(lane)
            if last is not None and status.utt <= last:
                continue
            self.orderer.expect(lane, status.utt)
            slot = _Slot(lane, status.utt, status.tgt, "", now)
            self._track(slot, status.job, now)
            if status.state.terminal:
                self._on_outcome(Outcome(status.job, status.state, status.code, None, status.result), now, out)
            elif status.state == JobState.MISSING:
                # Redis lost it together with the audio that made it: nothing to run again.
                self._settle(slot, self._failure(slot, ErrorCode.JOB_TIMEOUT,
                                                 "the job was lost by the scheduler's store", status.job), now, out)
        self._flush_acks(now, out, force=True)
        return out

    def _track(self, slot: _Slot, job_id: str, now: int) -> None:
        slot.job_id = job_id
        slot.check_at = now + self.config.outcome_check_ms
        slot.hard_at = slot.hard_at or now + self.config.job_bound_ms
        self._slots[(slot.lane, slot.utt)] = slot
        self._by_job[job_id] = (slot.lane, slot.utt)

    # ------------------------------------------------------------------ client frames
    def receive(self, msg: Message, now: int) -> list[Action]:
        out: list[Action] = []
        try:
            if isinstance(msg, AudioChunk):
                self._on_chunk(msg, now, out)
            elif isinstance(msg, Utterance):
                self._on_utterance(msg, now, out)
            elif isinstance(msg, TtsStarted):
                self._cuts(self.segmenter.tts_started(now), now)
            elif isinstance(msg, TtsPlayEnded):
                self.segmenter.tts_ended(now)
            elif isinstance(msg, ClientHeartbeat):
                out.append(Send(ServerHeartbeat(session_id=self.spec.session_id, timestamp=self._wall(now))))
            elif isinstance(msg, SessionClose):
                self._on_close(now, out)
            elif isinstance(msg, RoomCreate | RoomJoin | RoomLeave | RoomRawVoicePreference
                            | WebrtcOffer | WebrtcAnswer | WebrtcIce):
                self._on_room_message(msg, out)
            elif isinstance(msg, SessionInit):
                raise ProtocolError("session already initialised")
            else:
                raise ProtocolError(f"unexpected message {type(msg).__name__}")
        except ProtocolError as exc:
            out.append(Send(ErrorMessage(code=exc.code, message=exc.message)))
        self._pump(now, out)
        return out

    def _mode(self, streaming: bool) -> None:
        """A session either streams audio (the scheduler numbers utterances) or sends whole
        utterances (the client numbers them); mixing the two would mix two numberings."""
        if self.streaming is None:
            self.streaming = streaming
        elif self.streaming != streaming:
            raise ProtocolError("this session " + ("streams audio_chunk" if self.streaming else "sends utterance")
                                + " messages; do not mix audio_chunk and utterance in one session")

    def _on_chunk(self, msg: AudioChunk, now: int, out: list[Action]) -> None:
        if self.closing:
            raise ProtocolError("session is closing", code=ErrorCode.SESSION_CLOSED)
        self._mode(streaming=True)
        if msg.seq < self._start_seq:
            return  # sent again after a resume, but already made into jobs
        if not self._chunks.allow(now):
            out.append(Send(Backpressure(action="SLOW_DOWN", resume_after_ms=1000, message="too many chunks")))
            raise ProtocolError("audio_chunk rate limit exceeded; chunk dropped", code=ErrorCode.RATE_LIMITED)
        audio = _b64(msg.payload or "", "audio_chunk payload")
        try:
            cuts = self.segmenter.feed_chunk(audio, msg.is_final, now, seq=msg.seq)
        except ValueError as exc:
            raise ProtocolError(f"audio_chunk payload: {exc}") from None
        self._cuts(cuts, now)

    def _on_utterance(self, msg: Utterance, now: int, out: list[Action]) -> None:
        """A client-cut utterance: one job per target, numbered by the client."""
        if self.closing:
            raise ProtocolError("session is closing", code=ErrorCode.SESSION_CLOSED)
        self._mode(streaming=False)
        audio = _b64(msg.audio, "utterance audio")
        if msg.audio_format != self.spec.audio_format:
            raise ProtocolError("utterance audio_format differs from the session's")
        if len(audio) > self.config.max_buffer_bytes:
            raise ProtocolError("utterance audio is larger than max_buffer_bytes")
        if msg.utterance_index <= self._last_client_index:
            if self.resume is not None and msg.utterance_index < self.resume.next_utt:
                return  # sent again after a resume, but already made into jobs
            raise ProtocolError(f"utterance_index must increase: {msg.utterance_index} after "
                                f"{self._last_client_index}")
        self._last_client_index = msg.utterance_index
        if audio:
            self._cuts([Cut(index=msg.utterance_index, audio=audio, duration_ms=0, reason=CutReason.FINAL,
                            turn_id=None, started_at_ms=now, ended_at_ms=now)], now)

    def _on_close(self, now: int, out: list[Action]) -> None:
        if self.closing:
            return
        self._cuts(self.segmenter.close(now), now)
        self.closing = True

    # ------------------------------------------------------------------ jobs
    def _cuts(self, cuts: list[Cut], now: int) -> None:
        for cut in cuts:
            self.utterances += 1
            audio = base64.b64encode(cut.audio).decode()
            if self.room is not None:
                self._queue.append(_Fanout(cut, audio))
            else:
                self._own_jobs(cut, audio)

    def _own_jobs(self, cut: Cut, audio: str, front: bool = False) -> None:
        """One job per target language of the session, for the session itself."""
        tgts = self.spec.tgt_langs
        requests = []
        for i, tgt in enumerate(tgts):
            lane = (self.spec.session_id, tgt)
            self.orderer.expect(lane, cut.index)
            body = self._body(cut, tgt, audio)
            self._slots[(lane, cut.index)] = _Slot(lane, cut.index, tgt, body, cut.ended_at_ms)
            commit = None
            if i == len(tgts) - 1:  # once every target of the cut is a job, the cut is committed
                commit = (cut.index + 1, cut.next_seq, cut.next_skip, -1)
            requests.append(JobRequest(lane, cut.index, tgt, self.spec.pool_for(tgt), body, new_id(),
                                       commit=commit))
        self._enqueue(requests, front)

    def _enqueue(self, requests: Sequence[JobRequest], front: bool) -> None:
        if front:
            self._queue.extendleft(reversed(requests))
        else:
            self._queue.extend(requests)

    def _room_jobs(self, fanout: _Fanout, members: Sequence[RoomMemberRecord]) -> None:
        """One job per language the other members hear, each for the members who hear it; alone in
        the room, the session's own targets, as outside one. The speaker hears none of it."""
        cut, me = fanout.cut, self.spec.session_id
        by_lang: dict[str, list[str]] = {}
        for m in members:
            if m.session_id != me and m.lang:
                by_lang.setdefault(m.lang, []).append(f"{m.session_id}@{m.proc}")
        if not by_lang:
            self._own_jobs(cut, fanout.audio, front=True)
            return
        requests = []
        langs = sorted(by_lang)
        for i, lang in enumerate(langs):
            commit = (cut.index + 1, cut.next_seq, cut.next_skip, -1) if i == len(langs) - 1 else None
            requests.append(JobRequest((me, lang), cut.index, lang, self.spec.pool_for(lang),
                                       self._body(cut, lang, fanout.audio), new_id(), commit=commit,
                                       listeners=tuple(by_lang[lang])))
        self._enqueue(requests, front=True)

    def _body(self, cut: Cut, tgt: str, audio: str) -> str:
        spec = self.spec
        two_way = spec.src_lang == "auto"
        return encode(JobAssignBody(
            session_id=spec.session_id, utterance_index=cut.index, src_lang=spec.src_lang, tgt_lang=tgt,
            pipeline=Pipeline(), audio=audio, audio_format=spec.audio_format,  # type: ignore[arg-type]
            sample_rate=spec.sample_rate, trace_id=spec.trace_id, padding_ms=self.config.padding_ms,
            is_manual_cut=cut.is_manual_cut, is_timeout_triggered=cut.is_timeout_triggered,
            is_max_duration_triggered=cut.is_max_duration_triggered, dialect=spec.dialect,
            features=spec.features, turn_id=cut.turn_id,
            mode=spec.mode or ("two_way_auto" if two_way else None),
            lang_a=spec.lang_a if two_way else None, lang_b=spec.lang_b if two_way else None,
            auto_langs=list(spec.auto_langs or (spec.lang_a, spec.lang_b)) if two_way else None))  # type: ignore[arg-type]

    def _pump(self, now: int, out: list[Action]) -> None:
        """One dispatch at a time: the next target of an utterance avoids the nodes of the ones before."""
        if self._in_flight is None and self._queue and not self.finished:
            item = self._queue.popleft()
            self._in_flight = item
            if isinstance(item, _Fanout):
                out.append(RoomCall("speak", self.room or ""))
            else:
                avoid = self._avoid.get(item.utt)
                out.append(Dispatch(dataclasses.replace(item, avoid=tuple(avoid)) if avoid else item))
        self._maybe_finish(now, out)

    def dispatched(self, request: JobRequest, result: DispatchResult, now: int) -> list[Action]:
        out: list[Action] = []
        if isinstance(self._in_flight, JobRequest) and self._in_flight.unique == request.unique:
            self._in_flight = None
        if result.status == Status.SUPERSEDED:
            return self.superseded()
        if result.node:  # the next target of the utterance avoids this node
            self._avoid.setdefault(request.utt, []).append(result.node)
        slot = self._slots.get((request.lane, request.utt))
        if slot is None:  # a room job: its listeners own its outcome, not the speaker
            if request.commit is not None:
                self._avoid.pop(request.utt, None)
            self._pump(now, out)
            return out
        if result.status == "error":
            self._settle(slot, self._failure(slot, ErrorCode.SCHEDULER_DEPENDENCY_DOWN, result.message, ""), now, out)
        else:
            self._track(slot, result.job_id, now)
            if result.status == Status.ASSIGNED:
                out.append(Send(UiEvent(trace_id=self.spec.trace_id, session_id=self.spec.session_id,
                                        job_id=result.job_id, utterance_index=request.utt, event="DISPATCHED",
                                        status="ok"), soon=True))
            elif result.code == ErrorCode.NODE_OVERLOADED:
                out.append(Send(Backpressure(action="BUSY", resume_after_ms=1000,
                                             message=f"queue full for {request.pool}")))
        if request.commit is not None:
            self._avoid.pop(request.utt, None)
        self._pump(now, out)
        return out

    # ------------------------------------------------------------------ outcomes
    def outcome(self, outcome: Outcome, now: int) -> list[Action]:
        out: list[Action] = []
        self._on_outcome(outcome, now, out)
        self._pump(now, out)
        return out

    def _on_outcome(self, outcome: Outcome, now: int, out: list[Action]) -> None:
        key = self._by_job.get(outcome.job)
        slot = self._slots.get(key) if key else None
        if slot is None or slot.job_id != outcome.job:
            self.late_outcomes += 1  # already answered (a repeat after a lost reply, a check)
            return
        result = outcome.result
        if result is None and outcome.payload:
            try:
                result = _result_decoder.decode(outcome.payload)
            except msgspec.DecodeError:
                result = None
        if outcome.state == JobState.COMPLETED:
            out.append(Observe("e2e", max(0, now - slot.cut_at) / 1000))
        out.append(Settled(outcome.state, outcome.code))
        self._settle(slot, self._messages(slot, outcome, result, now), now, out, ended=True)

    def _messages(self, slot: _Slot, outcome: Outcome, result: JobResult | None, now: int) -> list[Message]:
        sid, utt, wall = slot.lane[0], slot.utt, self._wall(now)
        if outcome.state == JobState.COMPLETED and result is not None:
            timings = (result.extra or {}).get("service_timings")
            return [TranslationResult(
                session_id=sid, utterance_index=utt, job_id=outcome.job, text_asr=result.text_asr or "",
                text_translated=result.text_translated or "", tts_audio=result.tts_audio or "",
                tts_format=result.tts_format or "", trace_id=self.spec.trace_id, extra=result.extra,
                service_timings=timings if isinstance(timings, dict) else None, scheduler_sent_at_ms=wall,
                tgt_lang=slot.tgt, asr_quality_level=result.asr_quality_level, reason_codes=result.reason_codes,
                quality_score=result.quality_score, rerun_count=result.rerun_count,
                segments_meta=result.segments_meta)]
        if outcome.state == JobState.COMPLETED_EMPTY:
            reason = EMPTY_RESULT_REASONS.get((result.extra_reason if result else None) or "", "asr_empty")
            return [MissingResult(session_id=sid, utterance_index=utt, reason=reason, created_at_ms=wall,
                                  trace_id=self.spec.trace_id, tgt_lang=slot.tgt)]
        code = outcome.code or ErrorCode.INTERNAL_ERROR
        pool = slot.pool or self.spec.pool_for(slot.tgt)  # (another speaker's job: that speaker's pool)
        message = _FAILURE_TEXT.get(code, "the job failed").format(pool=pool)  # type: ignore[call-overload]
        node_code = None
        if result is not None and result.error is not None:
            message = result.error.message or message
            node_code = result.error.code
        return self._failure(slot, code, message, outcome.job, node_code)

    def _failure(self, slot: _Slot, code: str, message: str, job_id: str, node_code: str | None = None) -> list[Message]:
        # session_id (ext): whose utterance it was; inside a room, a listener hears of others' failures
        details: dict[str, Any] = {"session_id": slot.lane[0], "utterance_index": slot.utt, "tgt_lang": slot.tgt,
                                   "trace_id": self.spec.trace_id}
        if job_id:
            details["job_id"] = job_id
        if node_code and node_code != code:
            details["node_error_code"] = node_code
        return [
            ErrorMessage(code=code, message=message, details=details),
            UiEvent(trace_id=self.spec.trace_id, session_id=self.spec.session_id, job_id=job_id,
                    utterance_index=slot.utt, event="ERROR", status="error", error_code=code),
        ]

    def _settle(self, slot: _Slot, messages: list[Message], now: int, out: list[Action], ended: bool = False) -> None:
        """The slot has its one outcome: forget the slot, release what is now in order. ``ended``:
        the outcome is the job's own, from Redis (not one this session gave it: a deadline's)."""
        self._slots.pop((slot.lane, slot.utt), None)
        if slot.job_id:
            self._by_job.pop(slot.job_id, None)
        for released in self.orderer.push(slot.lane, slot.utt, (messages, slot.job_id, ended and not slot.room)):
            messages_out, job_id, unread = released.outcome
            out.extend(Send(m) for m in messages_out)
            if job_id:
                (self._acks_ended if unread else self._acks).append(job_id)
        self._flush_acks(now, out)

    def _flush_acks(self, now: int, out: list[Action], force: bool = False) -> None:
        owed = len(self._acks) + len(self._acks_ended)
        if not owed:
            self._ack_at = None
        elif force or owed >= self.config.ack_batch or (self._ack_at is not None and now >= self._ack_at):
            out.append(Ack(tuple(self._acks), tuple(self._acks_ended)))
            self._acks, self._acks_ended, self._ack_at = [], [], None
        elif self._ack_at is None:
            self._ack_at = now + self.config.ack_interval_ms


    # ------------------------------------------------------------------ rooms
    def _room_error(self, code: str, message: str) -> RoomError:
        return RoomError(code=code, message=message)

    def _member(self, display_name: str | None, preferred_lang: str | None) -> str:
        """What the room keeps of this member; it hears its preferred language, else its target."""
        return encode_json({"display_name": display_name, "preferred_lang": preferred_lang,
                            "lang": preferred_lang or self.spec.tgt_langs[0]})

    def _new_code(self) -> str:
        return f"{self._rng.randrange(100_000, 1_000_000)}"

    def _on_room_message(self, msg: Any, out: list[Action]) -> None:
        if isinstance(msg, RoomCreate | RoomJoin):
            if self.room is not None or self._room_call is not None:
                out.append(Send(self._room_error(RoomErrorCode.ALREADY_IN_ROOM, "leave the room you are in first")))
                return
            if msg.preferred_lang is not None:
                self.spec.pool_for(msg.preferred_lang)  # a language nobody could translate into: refused now
            self._room_display = (msg.display_name, msg.preferred_lang)
            if isinstance(msg, RoomCreate):
                self._create_tries = 0
                call = RoomCall("create", self._new_code(), self._member(*self._room_display),
                                str(uuid.UUID(int=self._rng.getrandbits(128), version=4)))
            else:
                if not _is_room_code(msg.room_code):
                    out.append(Send(self._room_error(RoomErrorCode.INVALID_ROOM_CODE, "a room code is 6 digits")))
                    return
                call = RoomCall("join", msg.room_code, self._member(*self._room_display), str(self.config.room_max_members))
            self._room_call = call
            out.append(call)
            return
        if self.room is None or msg.room_code != self.room:
            out.append(Send(self._room_error(RoomErrorCode.NOT_IN_ROOM, f"this session is not in room {msg.room_code}")))
            return
        if isinstance(msg, RoomLeave):
            out.append(self._leave_room())
        elif isinstance(msg, RoomRawVoicePreference):
            out.append(RoomCall("prefer", self.room, msg.target_session_id, "1" if msg.receive_raw_voice else "0"))
        else:  # WebRTC signalling: relayed to `to` (who will see `to` set to this session)
            out.append(RoomCall("signal", self.room, msg.to, encode(msg)))

    def _leave_room(self) -> RoomCall:
        """Leave now: what other members say from here on is not owed to this session any more."""
        return RoomCall("leave", self._drop_room())

    def _drop_room(self) -> str:
        """Out of room mode (left, expired, or lost): other members' speech is not owed any more."""
        code = self.room or ""
        for lane in [lane for lane in list(self._lanes_heard()) if lane[0] != self.spec.session_id]:
            self._forget_lane(lane)
        self.room = None
        self._rejoin_at = None
        return code

    def _rejoin_call(self) -> RoomCall:
        """Join self.room again, as this session first joined it (name, preferred language)."""
        self._rejoin_tries += 1
        self._rejoin_at = None
        return RoomCall("join", self.room or "", self._member(*self._room_display), str(self.config.room_max_members),
                        rejoin=True)

    def _rejoined(self, call: RoomCall, answer: RoomAnswer, now: int, out: list[Action]) -> None:
        """What joining the room again found. The member list itself follows as room news."""
        if answer.status == Status.JOINED or (answer.status == Status.ERROR
                                              and answer.code == RoomErrorCode.ALREADY_IN_ROOM):
            joining = self._room_call is not None and self._room_call.code == call.code
            if answer.status == Status.JOINED and self.room != call.code and not joining:
                out.append(RoomCall("leave", call.code))  # the client left meanwhile
            return
        if self.room != call.code:
            return
        if answer.status == "unreachable":
            if self._rejoin_tries < _REJOIN_TRIES:
                self._rejoin_at = now + self.config.outcome_check_ms
                return
            why = "the scheduler's store could not be reached to rejoin it"
        elif answer.code == RoomErrorCode.ROOM_FULL:
            why = "the scheduler's store lost this session's place in it, and it filled up meanwhile"
        else:
            why = "the scheduler's store lost it"
        self._drop_room()
        # room_expired, not room_error: the web client leaves room mode on it (room_error is only logged)
        out.append(Send(RoomExpired(room_code=call.code, message=f"the room is closed for this session: {why}; "
                                    "create or join a room again")))

    def _lanes_heard(self) -> set[Lane]:
        return {slot.lane for slot in self._slots.values()}

    def _forget_lane(self, lane: Lane) -> None:
        for key in [k for k in self._slots if k[0] == lane]:
            slot = self._slots.pop(key)
            self._by_job.pop(slot.job_id, None)
        self.orderer.drop(lane)

    def room_answered(self, call: RoomCall, answer: RoomAnswer, now: int) -> list[Action]:
        """What a ``RoomCall`` found."""
        out: list[Action] = []
        if call.rejoin:
            self._rejoined(call, answer, now, out)
            self._pump(now, out)
            return out
        if answer.status == "unreachable":
            out.append(Send(ErrorMessage(code=ErrorCode.SCHEDULER_DEPENDENCY_DOWN,
                                         message=f"room {call.op} failed: the scheduler's store is unreachable")))
        if call.op in ("create", "join") and self._room_call == call:
            self._room_call = None
            if answer.status == Status.COLLISION and self._create_tries < 5:
                self._create_tries += 1
                retry = dataclasses.replace(call, code=self._new_code())
                self._room_call = retry
                out.append(retry)
            elif answer.status in (Status.CREATED, Status.JOINED):
                self.room = call.code
                if call.op == "create":
                    out.append(Send(RoomCreateAck(room_code=call.code, room_id=answer.room_id or None)))
            elif answer.status == Status.ERROR:
                out.append(Send(self._room_error(answer.code, _ROOM_ERROR_TEXT.get(answer.code, "room refused"))))
        elif call.op == "speak":
            fanout = self._in_flight
            self._in_flight = None
            if isinstance(fanout, _Fanout):
                if answer.status == Status.OK:
                    self._room_jobs(fanout, answer.members)
                else:  # the room is gone (expired, left meanwhile): the session's own targets
                    self._own_jobs(fanout.cut, fanout.audio, front=True)
        elif answer.status == Status.ERROR and call.op in ("prefer", "signal"):
            out.append(Send(self._room_error(answer.code, _ROOM_ERROR_TEXT.get(answer.code, "room refused"))))
        self._pump(now, out)
        return out

    def room_news(self, news: RoomNews, now: int) -> list[Action]:
        """A room's news for this session (another member joined, left, signalled; it expired)."""
        out: list[Action] = []
        if news.room != self.room:
            return out  # a room this session has left
        if news.event == "members":
            raw = msgspec.json.decode(news.payload or "[]")
            members = [RoomMember(participant_id=m["session_id"], session_id=m["session_id"],
                                  joined_at=int(m.get("joined_at") or 0), display_name=m.get("display_name"),
                                  preferred_lang=m.get("preferred_lang"),
                                  raw_voice_preferences=m.get("prefs") if isinstance(m.get("prefs"), dict) else {})
                       for m in raw]
            out.append(Send(RoomMembers(room_code=news.room, members=members)))
        elif news.event == "expired":
            self._drop_room()
            out.append(Send(RoomExpired(room_code=news.room, message="no one spoke in the room for "
                                        f"{self.config.room_expiry_ms // 60_000} minutes: it is closed")))
        elif news.event == "signal" and news.payload:
            try:
                signal = _signal_decoder.decode(news.payload)
            except msgspec.DecodeError:
                return out
            out.append(Send(msgspec.structs.replace(signal, to=news.sender)))
        return out

    def expect_room_job(self, job: str, speaker: str, utt: int, tgt: str, now: int, pool: str = "") -> list[Action]:
        """A member of this session's room spoke: the outcome of ``job`` (in ``pool``: the speaker's
        languages, not this session's) is owed to this session, in that speaker's utterance order."""
        out: list[Action] = []
        if self.room is None or self.finished:
            return out
        lane = (speaker, tgt)
        last = self.orderer.last_expected(lane)
        if last is not None and utt <= last:
            return out
        self.orderer.expect(lane, utt)
        self._track(_Slot(lane, utt, tgt, "", now, pool=pool, room=True), job, now)
        return out

    # ------------------------------------------------------------------ deadlines
    def tick(self, now: int) -> list[Action]:
        out: list[Action] = []
        if not self.segmenter.closed:
            self._cuts(self.segmenter.poll(now), now)
        if self._rejoin_at is not None and now >= self._rejoin_at and self.room is not None:
            out.append(self._rejoin_call())
        due = []
        for slot in list(self._slots.values()):
            if slot.hard_at and now >= slot.hard_at:
                if slot.job_id:
                    out.append(CancelJob(slot.job_id, ErrorCode.JOB_TIMEOUT))
                self._settle(slot, self._failure(slot, ErrorCode.JOB_TIMEOUT,
                                                 "the job did not finish in time", slot.job_id), now, out)
            elif slot.job_id and not slot.checking and now >= slot.check_at:
                slot.checking = True
                due.append(slot.job_id)
        if due:
            out.append(CheckJobs(tuple(due)))
        self._flush_acks(now, out)
        self._pump(now, out)
        return out

    def checked(self, statuses: dict[str, JobStatus], now: int) -> list[Action]:
        """What Redis says of jobs waited on long (``CheckJobs``). ``statuses`` may miss some ids
        (the check failed): those are checked again later."""
        out: list[Action] = []
        for job_id in [j for j, key in self._by_job.items() if self._slots.get(key) and self._slots[key].checking]:
            slot = self._slots[self._by_job[job_id]]
            status = statuses.get(job_id)
            slot.checking = False
            slot.check_at = now + self.config.outcome_check_ms
            if status is None or not (status.state.terminal or status.state == JobState.MISSING):
                continue  # still queued or running (or unknown for now): it has its own deadlines
            if status.state.terminal:
                self._on_outcome(Outcome(job_id, status.state, status.code, None, status.result), now, out)
            elif not slot.redispatched and slot.body:
                # Redis lost the job (a restart without persistence, a failover that lost writes): run
                # it again, once, from the audio kept here, under a new id (a late result for the
                # lost one is then unknown to Redis, never delivered twice).
                slot.redispatched = True
                out.append(Count("lost_job_rerun"))
                self._by_job.pop(job_id, None)
                slot.job_id = ""
                self._queue.appendleft(JobRequest(slot.lane, slot.utt, slot.tgt, self.spec.pool_for(slot.tgt),
                                                  slot.body, new_id()))
            else:
                out.append(Count("lost_job_failed"))
                self._settle(slot, self._failure(slot, ErrorCode.JOB_TIMEOUT,
                                                 "the job was lost by the scheduler's store", job_id), now, out)
        self._pump(now, out)
        return out

    # ------------------------------------------------------------------ the session's end
    def _maybe_finish(self, now: int, out: list[Action]) -> None:
        if self.finished or not self.closing or self._queue or self._in_flight or self.orderer.owed():
            return
        self.finished = True
        if self.room is not None:
            out.append(self._leave_room())
        out.append(Send(SessionCloseAck(session_id=self.spec.session_id)))
        out.append(End())
        out.append(CloseSocket())

    def socket_lost(self, now: int) -> list[Action]:
        """The client's socket is gone: what it was owed waits in Redis for a resume."""
        if self.finished:
            return []
        self.finished = True
        out: list[Action] = []
        self._flush_acks(now, out, force=True)
        if self.room is not None:
            out.append(self._leave_room())  # a closed socket leaves the room
        out.append(Detach())
        return out

    def superseded(self) -> list[Action]:
        """A resume elsewhere took this session over: it no longer speaks for it."""
        if self.finished:
            return []
        self.finished = True
        return [Send(ErrorMessage(code=ErrorCode.SESSION_CLOSED, message="this session was resumed on another "
                                  "connection")), CloseSocket(4000)]

    def redis_reset(self, now: int) -> list[Action]:
        """Redis lost its data (or declared this process dead while it stalled): make the session's
        record live here again, check every job it is owed, and join its room again (Redis may have
        lost the room's member list, or the room; a room it cannot join again is over for the client)."""
        if self.finished:
            return []
        out: list[Action] = [Reopen()]
        due = []
        for slot in self._slots.values():
            if slot.job_id and not slot.checking:
                slot.checking = True
                due.append(slot.job_id)
        if due:
            out.append(CheckJobs(tuple(due)))
        if self.room is not None:
            self._rejoin_tries = 0
            out.append(self._rejoin_call())
        return out


_REJOIN_TRIES = 3  # joining a room again after a reset, while the store is out of reach

_ROOM_ERROR_TEXT = {
    RoomErrorCode.ROOM_NOT_FOUND: "no such room (closed, or never opened)",
    RoomErrorCode.ROOM_FULL: "the room is full",
    RoomErrorCode.ALREADY_IN_ROOM: "this session is already in that room",
    RoomErrorCode.NOT_IN_ROOM: "this session is not in that room (or that member is not)",
    RoomErrorCode.INVALID_ROOM_CODE: "a room code is 6 digits",
}
_signal_decoder = msgspec.json.Decoder(WebrtcOffer | WebrtcAnswer | WebrtcIce)


def _is_room_code(code: str) -> bool:
    return len(code) == 6 and code.isascii() and code.isdigit()


def encode_json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"{what} is not valid base64") from None
