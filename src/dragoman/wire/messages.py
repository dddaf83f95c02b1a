"""Every v1 wire message (PROTOCOL.md) as a msgspec Struct.

Two rules shape this module, both from the compatibility promise in PROTOCOL.md:

* **Lenient in.** Unmodified workers and web clients of the existing network must work, so unknown
  fields are ignored (msgspec's default), enum-like strings (service ``type``, ``status``, ``mode``...)
  are plain ``str``, and a field is required only when the scheduler cannot act without it. Optional
  fields accept ``null`` too, because the existing peers are JavaScript and often send it.
* **Complete out.** Every top-level message omits fields left at their default
  (``omit_defaults=True``), so a field the existing peers *read* must never have a default in the
  messages we send (``job_assign``, ``session_init_ack``, ``translation_result``...): it is required
  in the constructor and therefore always on the wire. Nested objects (``pipeline``, ``hardware``...)
  do not omit defaults, for the same reason: a worker that reads ``pipeline.use_tts`` must see it.

Limits (language code length, ``max_concurrency``, ``attempt_id``...) are ``msgspec.Meta``
constraints, so they are checked while decoding and the error names the field. msgspec does not check
them when a Struct is built in Python: our own messages are trusted.

Wire ``type`` strings are the msgspec tags (``tag_field="type"``); the endpoint unions at the bottom
are what the decoders in ``codec`` dispatch on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias

import msgspec
from msgspec import Meta

PROTOCOL_VERSION = "1.0"
"""What ``session_init_ack.protocol_version`` always says (PROTOCOL.md fixes it at ``"1.0"``)."""

# --- constrained scalars ------------------------------------------------------------------------

LangCode = Annotated[str, Meta(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9_.\-]+\Z")]  # (\Z: "$" lets a final newline through)
"""A language code such as ``zh``, ``en-US`` or ``auto``: letters, digits, ``_.-``, at most 16. It
becomes part of a pool id and a Redis key, so nothing that separates words or keys gets through."""

LanguagePair = tuple[LangCode, LangCode]
"""A directed ``[src, tgt]`` pair; a tuple so that it can key a dict or sit in a set."""

AudioFormat = Literal["opus", "pcm16"]
"""The audio encodings the segmenter can cut; anything else is refused at the door."""

SampleRate = Annotated[int, Meta(ge=8000, le=48000)]
MaxConcurrency = Annotated[int, Meta(ge=1, le=1024)]
MAX_INDEX = 2**31 - 1
"""Largest utterance index, chunk seq and attempt a peer may send. Numbers cross Lua, whose JSON
encoder turns integers past about 10^14 into floats; bounding them at the edge keeps every number
that reaches a script exact (and far below 2^53)."""

AttemptId = Annotated[int, Meta(ge=1, le=MAX_INDEX)]
UtteranceIndex = Annotated[int, Meta(ge=0, le=MAX_INDEX)]
Seq = Annotated[int, Meta(ge=0, le=MAX_INDEX)]

Millis = int | float
"""A time or duration in ms. JavaScript peers may send ``performance.now()`` values (floats); ints
stay ints so that what we relay is byte-for-byte what we received."""

QUALITY_FIELDS = ("asr_quality_level", "reason_codes", "quality_score", "rerun_count", "segments_meta")
"""Quality fields a node may add to ``job_result``; the scheduler copies them, unread, into
``translation_result``. Listed once here so the copy and the Structs cannot drift."""


# --- nested objects -----------------------------------------------------------------------------
# Not tagged, and without omit_defaults (see the module docstring). Everything the scheduler can
# live without has a default, because the existing worker does not always send every key.


class GpuInfo(msgspec.Struct, kw_only=True):
    """One entry of ``hardware.gpus``; informational only."""

    name: str | None = None
    memory_gb: float | None = None


class Hardware(msgspec.Struct, kw_only=True):
    """``node_register.hardware``; informational only, so nothing in it is required."""

    cpu_cores: int | None = None
    memory_gb: float | None = None
    gpus: list[GpuInfo] | None = None


class InstalledService(msgspec.Struct, kw_only=True):
    """One entry of ``installed_services``.

    ``type``, ``device`` and ``status`` are open-ended strings: the existing worker already has
    service types (``"lexicon"``) that this scheduler does not know, and must still register.
    """

    service_id: str
    type: str
    device: str | None = None
    status: str | None = None
    version: str | None = None


class CapabilityByType(msgspec.Struct, kw_only=True):
    """One entry of ``capability_by_type``: whether the node can run a service kind right now."""

    type: str
    ready: bool = False
    reason: str | None = None


class LanguageCapabilities(msgspec.Struct, kw_only=True):
    """What languages each stage of a node handles; the source of its pools when it does not send
    ``language_pairs``."""

    asr_languages: list[LangCode] | None = None
    semantic_languages: list[LangCode] | None = None
    tts_languages: list[LangCode] | None = None
    semantic_core_ready: bool | None = None

    def default_language_pairs(self) -> list[LanguagePair]:
        """The protocol's fallback pairs: every ASR source x every semantic target, self-pairs
        included, in a stable order and without duplicates (so pool membership is deterministic)."""
        pairs: dict[LanguagePair, None] = {}
        for src in self.asr_languages or ():
            for tgt in self.semantic_languages or ():
                pairs[(src, tgt)] = None
        return list(pairs)


class ResourceUsage(msgspec.Struct, kw_only=True):
    """``node_heartbeat.resource_usage``; load hints, never trusted for slot accounting."""

    cpu_percent: float | None = None
    gpu_percent: float | None = None
    gpu_mem_percent: float | None = None
    mem_percent: float | None = None
    running_jobs: int | None = None


class Pipeline(msgspec.Struct, kw_only=True):
    """Which stages a job runs. Defaults are a plain speech translation, for a client that sends a
    partial ``pipeline``; the scheduler always sends every key to the node."""

    use_asr: bool = True
    use_nmt: bool = True
    use_tts: bool = True
    use_semantic: bool = False
    use_tone: bool = False


class ErrorInfo(msgspec.Struct, kw_only=True):
    """``job_result.error``: why a node failed a job; its ``code`` is passed through to the client.
    Fully defaulted: a malformed error object must not cost us the result that carries it."""

    code: str = "PROCESSING_ERROR"
    message: str = ""
    details: Any = None


# --- message base -------------------------------------------------------------------------------


class Message(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type"):
    """Base of every top-level frame; subclasses set ``tag`` to their wire ``type``."""


# --- node -> scheduler (/ws/node) ---------------------------------------------------------------


class NodeRegister(Message, tag="node_register"):
    """A node (re)joins. Nothing is required: the existing worker's message varies by version, and
    the scheduler can fall back on defaults for every field (a fresh ``node_id``, the configured
    concurrency, pairs derived from ``language_capabilities``)."""

    node_id: str | None = None
    version: str | None = None
    capability_schema_version: str | int | None = None
    platform: str | None = None
    hardware: Hardware | None = None
    installed_models: list[Any] = []
    installed_services: list[InstalledService] = []
    capability_by_type: list[CapabilityByType] = []
    features_supported: dict[str, Any] = {}
    accept_public_jobs: bool | None = None
    language_capabilities: LanguageCapabilities | None = None
    max_concurrency: MaxConcurrency | None = None
    language_pairs: list[LanguagePair] | None = None

    def effective_language_pairs(self) -> list[LanguagePair]:
        """The pairs the node serves: its own list when it sent one (ext), else the protocol's
        default derived from ``language_capabilities``."""
        if self.language_pairs is not None:
            return list(dict.fromkeys(self.language_pairs))
        if self.language_capabilities is None:
            return []
        return self.language_capabilities.default_language_pairs()


class NodeHeartbeat(Message, tag="node_heartbeat"):
    """Liveness plus a capability refresh. ``None`` means "not reported", which is different from an
    empty list: a heartbeat that omits ``installed_services`` must not wipe the node's services."""

    node_id: str
    timestamp: Millis | None = None
    resource_usage: ResourceUsage | None = None
    installed_services: list[InstalledService] | None = None
    capability_by_type: list[CapabilityByType] | None = None
    language_capabilities: LanguageCapabilities | None = None
    draining: bool = False


class JobAck(Message, tag="job_ack"):
    """Optional confirmation of an assignment; the existing worker never sends it, so no rule may
    depend on it."""

    job_id: str
    attempt_id: AttemptId
    node_id: str
    session_id: str | None = None
    trace_id: str | None = None


class JobStarted(Message, tag="job_started"):
    """Same shape as ``job_ack``; sent when processing actually begins."""

    job_id: str
    attempt_id: AttemptId
    node_id: str
    session_id: str | None = None
    trace_id: str | None = None


class NodeAsrPartial(Message, tag="asr_partial"):
    """An interim transcript from a node; relayed to the client as ``AsrPartial``."""

    job_id: str
    node_id: str
    text: str
    is_final: bool = False
    session_id: str | None = None
    utterance_index: UtteranceIndex | None = None
    trace_id: str | None = None


class JobResult(Message, tag="job_result"):
    """The outcome of one attempt. ``job_id``/``attempt_id``/``node_id`` are required because the
    completion fence (I2) is built on them; everything else is passed through or may be absent on an
    "empty ack" (``extra.reason`` of ``ASR_EMPTY`` / ``NO_TEXT_ASSIGNED``)."""

    job_id: str
    attempt_id: AttemptId
    node_id: str
    success: bool
    session_id: str | None = None
    utterance_index: UtteranceIndex | None = None
    trace_id: str | None = None
    text_asr: str | None = None
    text_translated: str | None = None
    tts_audio: str | None = None
    tts_format: str | None = None
    extra: dict[str, Any] | None = None
    processing_time_ms: Millis | None = None
    error: ErrorInfo | None = None
    asr_quality_level: Any = None
    reason_codes: Any = None
    quality_score: Any = None
    rerun_count: Any = None
    segments_meta: Any = None

    @property
    def extra_reason(self) -> str | None:
        """``extra.reason`` when it is a string: how a node says "nothing to translate"."""
        reason = (self.extra or {}).get("reason")
        return reason if isinstance(reason, str) else None


class NodeError(Message, tag="node_error"):
    """A node-level failure report. ``node_id`` is optional: the socket already identifies the node."""

    code: str
    message: str
    node_id: str | None = None
    details: Any = None


# --- scheduler -> node --------------------------------------------------------------------------


class NodeRegisterAck(Message, tag="node_register_ack"):
    """Tells the node its id. The ext timings let our agent follow the scheduler's settings; the
    existing worker ignores them and keeps its own 15 s heartbeat."""

    node_id: str
    message: str
    status: str
    heartbeat_interval_ms: Annotated[int, Meta(ge=1)] | None = None
    lease_ms: Annotated[int, Meta(ge=1)] | None = None


class JobAssignBody(Message, tag="job_assign"):
    """A ``job_assign`` without its ``job_id`` and ``attempt_id``: what a session decides once per job.
    The scheduler keeps it encoded (for reassignment) and adds the two ids when it sends it, see
    ``codec.assign_frame``; ``JobAssign`` is the whole frame as a node decodes it."""

    session_id: str
    utterance_index: UtteranceIndex
    src_lang: LangCode
    tgt_lang: LangCode
    pipeline: Pipeline
    audio: str
    audio_format: AudioFormat
    sample_rate: SampleRate
    trace_id: str
    dialect: str | None = None
    features: dict[str, Any] | None = None
    mode: str | None = None
    lang_a: LangCode | None = None
    lang_b: LangCode | None = None
    auto_langs: list[LangCode] | None = None
    enable_streaming_asr: bool | None = None
    partial_update_interval_ms: int | None = None
    padding_ms: int | None = None
    is_manual_cut: bool | None = None
    is_timeout_triggered: bool | None = None
    is_max_duration_triggered: bool | None = None
    turn_id: str | None = None


class JobAssign(JobAssignBody, kw_only=True, tag="job_assign"):
    """One job for one node. Every field without a default is read by the existing worker."""

    job_id: str
    attempt_id: AttemptId


class JobCancel(Message, tag="job_cancel"):
    """Withdraws a job whose lease expired, so the node stops spending a slot on it."""

    job_id: str
    trace_id: str | None = None
    reason: str | None = None


class ErrorMessage(Message, tag="error"):
    """The ``error`` frame, on both endpoints. ``details`` carries e.g. ``utterance_index`` and
    ``tgt_lang`` so a client can tell which utterance an error concerns."""

    code: str
    message: str
    details: dict[str, Any] | None = None


# --- client -> scheduler (/ws/session) ----------------------------------------------------------


class SessionInit(Message, tag="session_init"):
    """Opens a session. Only the languages are required; the rest has protocol defaults."""

    src_lang: LangCode
    tgt_lang: LangCode
    client_version: str | None = None
    platform: str | None = None
    dialect: str | None = None
    features: dict[str, Any] | None = None
    pairing_code: str | None = None
    tenant_id: str | None = None
    mode: str | None = None
    lang_a: LangCode | None = None
    lang_b: LangCode | None = None
    auto_langs: list[LangCode] | None = None
    trace_id: str | None = None
    tgt_langs: list[LangCode] | None = None
    audio_format: AudioFormat = "opus"
    sample_rate: SampleRate = 16000
    resume_session_id: str | None = None
    """(ext) Take over a session whose socket or scheduler process was lost (within the grace
    period): the ack names that session, says what to send again, and every outcome owed follows."""
    resume_token: str | None = None
    """(ext) With ``resume_session_id``: the ``resume_token`` that session's first ack gave. A session
    id is not a secret (room members see each other's); the token is."""


class AudioChunk(Message, tag="audio_chunk"):
    """Streamed audio. ``session_id`` is optional because the socket already names the session."""

    seq: Seq
    is_final: bool
    session_id: str | None = None
    payload: str | None = None
    client_timestamp_ms: Millis | None = None


class Utterance(Message, tag="utterance"):
    """A whole utterance cut by the client instead of streamed; it may override the session's
    language settings for this one utterance."""

    utterance_index: UtteranceIndex
    src_lang: LangCode
    tgt_lang: LangCode
    audio: str
    session_id: str | None = None
    manual_cut: bool = False
    audio_format: AudioFormat = "opus"
    sample_rate: SampleRate = 16000
    trace_id: str | None = None
    pipeline: Pipeline | None = None
    dialect: str | None = None
    mode: str | None = None
    lang_a: LangCode | None = None
    lang_b: LangCode | None = None
    auto_langs: list[LangCode] | None = None
    tgt_langs: list[LangCode] | None = None


class ClientHeartbeat(Message, tag="client_heartbeat"):
    """Keeps an idle session alive; its content is informational."""

    session_id: str | None = None
    timestamp: Millis | None = None


class TtsStarted(Message, tag="tts_started"):
    """The client began playing TTS: pause detection stops counting until ``tts_play_ended``."""

    session_id: str | None = None
    trace_id: str | None = None
    group_id: str | None = None
    ts_start_ms: Millis | None = None


class TtsPlayEnded(Message, tag="tts_play_ended"):
    """The client stopped playing TTS: pause detection resumes."""

    session_id: str | None = None
    trace_id: str | None = None
    group_id: str | None = None
    ts_end_ms: Millis | None = None


class SessionClose(Message, tag="session_close"):
    """The client is leaving; results still owed are flushed before ``session_close_ack``."""

    session_id: str | None = None
    reason: str | None = None


# --- scheduler -> client ------------------------------------------------------------------------


class SessionInitAck(Message, tag="session_init_ack"):
    """Every field but ``assigned_node_id`` is read by the existing web client, hence required
    (``protocol_version`` is ``PROTOCOL_VERSION``, ``use_binary_frame`` is ``False``)."""

    session_id: str
    message: str
    trace_id: str
    protocol_version: str
    use_binary_frame: bool
    negotiated_codec: str
    negotiated_audio_format: str
    negotiated_sample_rate: int
    negotiated_channel_count: int
    assigned_node_id: str | None = None
    resumed: bool | None = None
    """(ext) True when this ack took over an earlier session (``session_init.resume_session_id``)."""
    resume_from_seq: int | None = None
    """(ext) On a resumed streaming session: the first ``audio_chunk.seq`` whose audio the session
    has not yet made into jobs; send those chunks again, with their original ``seq``."""
    resume_from_utterance_index: int | None = None
    """(ext) On a resumed session: the first utterance index not yet made into jobs (for clients
    that send whole ``utterance`` messages: send those from this index again)."""
    resume_token: str | None = None
    """(ext) On a new session: the secret that, with the session id, resumes it on a new connection."""


class TranslationResult(Message, tag="translation_result"):
    """One utterance's result for one target language. Text and audio fields are required (send
    ``""`` when a stage did not run) because the existing web client reads them unconditionally."""

    session_id: str
    utterance_index: UtteranceIndex
    job_id: str
    text_asr: str
    text_translated: str
    tts_audio: str
    tts_format: str
    trace_id: str
    extra: dict[str, Any] | None = None
    service_timings: dict[str, Any] | None = None
    network_timings: dict[str, Any] | None = None
    scheduler_sent_at_ms: int | None = None
    tgt_lang: LangCode | None = None
    asr_quality_level: Any = None
    reason_codes: Any = None
    quality_score: Any = None
    rerun_count: Any = None
    segments_meta: Any = None


class AsrPartial(Message, tag="asr_partial"):
    """An interim transcript relayed to the client."""

    session_id: str
    utterance_index: UtteranceIndex
    job_id: str
    text: str
    is_final: bool
    trace_id: str


class MissingResult(Message, tag="missing_result"):
    """Stands in for a result that will never come (empty audio, gap timeout), so the client's
    in-order delivery can move on."""

    session_id: str
    utterance_index: UtteranceIndex
    reason: str
    created_at_ms: int
    trace_id: str | None = None
    tgt_lang: LangCode | None = None  # (ext) which target's result is missing


class UiEvent(Message, tag="ui_event"):
    """Progress of one job for the client's UI. ``event``/``status`` are open strings so a newer
    scheduler's events do not break an older client library."""

    trace_id: str
    session_id: str
    job_id: str
    utterance_index: UtteranceIndex
    event: str
    status: str
    elapsed_ms: int | None = None
    error_code: str | None = None
    hint: str | None = None


class Backpressure(Message, tag="backpressure"):
    """Asks the client to slow down (``BUSY``, ``PAUSE``, ``SLOW_DOWN``)."""

    action: str
    resume_after_ms: int | None = None
    message: str | None = None


class ServerHeartbeat(Message, tag="server_heartbeat"):
    """Lets the client detect a dead scheduler."""

    session_id: str
    timestamp: int


class SessionCloseAck(Message, tag="session_close_ack"):
    """Sent after every owed result has been flushed: the client may close the socket."""

    session_id: str


# --- rooms (client <-> scheduler, /ws/session) --------------------------------------------------

RoomCode = Annotated[str, Meta(pattern=r"^[0-9]{6}\Z")]
"""Six digits, as the existing web client checks (``/^\\d{6}$/``)."""


class RoomCreate(Message, tag="room_create"):
    """Open a room and join it. The existing web client sends only ``client_ts``."""

    client_ts: Millis | None = None
    display_name: Annotated[str, Meta(max_length=64)] | None = None
    preferred_lang: LangCode | None = None


class RoomJoin(Message, tag="room_join"):
    room_code: str
    display_name: Annotated[str, Meta(max_length=64)] | None = None
    preferred_lang: LangCode | None = None


class RoomLeave(Message, tag="room_leave"):
    room_code: str


class RoomRawVoicePreference(Message, tag="room_raw_voice_preference"):
    """Whether this member receives ``target_session_id``'s original voice over WebRTC."""

    room_code: str
    target_session_id: str
    receive_raw_voice: bool


class WebrtcOffer(Message, tag="webrtc_offer"):
    """WebRTC signalling, relayed to the member named in ``to``; the scheduler sends it on with
    ``to`` set to the sender. ``sdp`` is the browser's RTCSessionDescriptionInit, passed through."""

    room_code: str
    to: str
    sdp: Any = None


class WebrtcAnswer(Message, tag="webrtc_answer"):
    room_code: str
    to: str
    sdp: Any = None


class WebrtcIce(Message, tag="webrtc_ice"):
    room_code: str
    to: str
    candidate: Any = None


class RoomCreateAck(Message, tag="room_create_ack"):
    room_code: str
    room_id: str | None = None


class RoomMember(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One member as every member sees it (``participant_id`` is its session id, ``joined_at`` ms)."""

    participant_id: str
    session_id: str
    joined_at: int
    display_name: str | None = None
    preferred_lang: str | None = None
    raw_voice_preferences: dict[str, bool] = {}


class RoomMembers(Message, tag="room_members"):
    room_code: str
    members: list[RoomMember]


class RoomError(Message, tag="room_error"):
    code: str
    message: str | None = None


class RoomExpired(Message, tag="room_expired"):
    room_code: str
    message: str


# --- endpoint unions ----------------------------------------------------------------------------

NodeInbound: TypeAlias = (
    NodeRegister | NodeHeartbeat | JobAck | JobStarted | NodeAsrPartial | JobResult | NodeError
)
"""What a node may send on ``/ws/node``."""

NodeOutbound: TypeAlias = NodeRegisterAck | JobAssign | JobCancel | ErrorMessage
"""What the scheduler sends to a node."""

SessionInbound: TypeAlias = (
    SessionInit | AudioChunk | Utterance | ClientHeartbeat | TtsStarted | TtsPlayEnded | SessionClose
    | RoomCreate | RoomJoin | RoomLeave | RoomRawVoicePreference | WebrtcOffer | WebrtcAnswer | WebrtcIce
)
"""What a client may send on ``/ws/session``."""

SessionOutbound: TypeAlias = (
    SessionInitAck
    | TranslationResult
    | AsrPartial
    | MissingResult
    | UiEvent
    | ErrorMessage
    | Backpressure
    | ServerHeartbeat
    | SessionCloseAck
    | RoomCreateAck
    | RoomMembers
    | RoomError
    | RoomExpired
    | WebrtcOffer
    | WebrtcAnswer
    | WebrtcIce
)
"""What the scheduler sends to a client."""
