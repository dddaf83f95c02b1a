"""What the scripts answer, typed: one Struct per script, one enum of statuses and of effect kinds.

A script's reply is an array (see ``lua/includes/context.lua``): a JSON body, decoded into the
script's reply Struct; a JSON array of effects, decoded one at a time into ``Effect`` (one effect
that cannot be decoded is logged and never takes the others with it); and payloads, attached to the
effects (and job statuses) that point at them.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec


class Status(StrEnum):
    OK = "ok"
    # nodes
    REGISTERED = "registered"
    IN_USE = "in_use"
    FORBIDDEN = "forbidden"
    OFFLINE = "offline"
    UNKNOWN = "unknown"
    SUPERSEDED = "superseded"
    # jobs
    ASSIGNED = "assigned"
    QUEUED = "queued"
    FAILED = "failed"
    EXISTS = "exists"
    NO_CAPACITY = "no_capacity"
    COMPLETED = "completed"
    REFUSED = "refused"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"
    RUNNING = "running"
    CANCELLED = "cancelled"
    FINISHED = "finished"
    RELAYED = "relayed"
    # sessions
    OPENED = "opened"
    RESUMED = "resumed"
    COMMITTED = "committed"
    DETACHED = "detached"
    ENDED = "ended"
    # rooms
    CREATED = "created"
    COLLISION = "collision"
    JOINED = "joined"
    LEFT = "left"
    ERROR = "error"


class JobState(StrEnum):
    NEW = "new"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    COMPLETED_EMPTY = "completed_empty"
    FAILED = "failed"
    MISSING = "missing"  # a job Redis no longer knows (get_jobs, open_session resume)
    GONE = "gone"  # dispatch_task "exists": ended and acknowledged

    @property
    def terminal(self) -> bool:
        return self in (JobState.COMPLETED, JobState.COMPLETED_EMPTY, JobState.FAILED)


class EffectKind(StrEnum):
    ASSIGN = "assign"  # send job_assign to ``node``
    CANCEL = "cancel"  # send job_cancel to ``node``
    OUTCOME = "outcome"  # the job's one outcome, for ``session``
    PARTIAL = "partial"  # an interim transcript for ``session``
    SUPERSEDED = "superseded"  # ``session`` was taken over by a resume elsewhere
    EXPECT = "expect"  # ``session`` (a room listener) is owed the outcome of ``job`` (``speaker``'s, in ``pool``)
    ROOM = "room"  # a room's news for ``session``: ``event`` members | expired | signal


class Effect(msgspec.Struct, kw_only=True):
    """Something a socket holder must do. ``payload``: the job_assign body (assign), the node's
    job_result (outcome), the client frame (partial); ``result``: the decoded job_result, when the
    caller had it at hand (never decoded twice)."""

    kind: str
    job: str = ""
    node: str = ""
    attempt: int = 0
    session: str = ""
    utt: int = 0
    tgt: str = ""
    state: str = ""
    code: str = ""
    lease: int = 0
    reason: str = ""
    speaker: str = ""
    room: str = ""
    event: str = ""
    sender: str = ""
    pool: str = ""
    p: int = 0
    cell: str = ""
    payload: str | None = None
    result: Any = None


class JobStatus(msgspec.Struct, kw_only=True):
    job: str
    state: JobState
    code: str = ""
    node: str = ""
    attempt: int = 0
    utt: int = 0
    tgt: str = ""
    p: int = 0
    result: str | None = None


class Reply(msgspec.Struct, kw_only=True):
    status: Status
    now: int = 0
    cell: str = ""
    effects: list[Effect] = msgspec.field(default_factory=list)


class RegisterReply(Reply, kw_only=True):
    node: str = ""
    state: str = ""
    max: int = 0
    used: int = 0
    held: int = 0
    deadline: int = 0
    reconnected: bool = False
    proc: str = ""


class HeartbeatReply(Reply, kw_only=True):
    state: str = ""
    used: int = 0
    max: int = 0
    deadline: int = 0


class HeartbeatsReply(Reply, kw_only=True):
    nodes: list[HeartbeatReply] = msgspec.field(default_factory=list)


class DrainReply(Reply, kw_only=True):
    state: str = ""
    used: int = 0


class OfflineReply(Reply, kw_only=True):
    jobs: int = 0


class DispatchReply(Reply, kw_only=True):
    state: str = ""
    node: str = ""
    attempt: int = 0
    code: str = ""
    job_id: str = ""


class CompleteReply(Reply, kw_only=True):
    state: str = ""
    reason: str = ""


class StartReply(Reply, kw_only=True):
    state: str = ""


class CancelReply(Reply, kw_only=True):
    state: str = ""


class ReapReply(Reply, kw_only=True):
    dead_nodes: int = 0
    expired_leases: int = 0
    expired_pending: int = 0
    dead_procs: int = 0
    abandoned: int = 0
    rooms_expired: int = 0
    more: bool = False
    boot: str = ""


class TouchReply(Reply, kw_only=True):
    deadline: int = 0
    boot: str = ""
    revived: bool = False


class SessionReply(Reply, kw_only=True):
    epoch: int = 0
    spec: str = ""
    next_utt: int = -1
    seq: int = 0
    skip: int = 0
    cutt: int = -1
    jobs: list[JobStatus] = msgspec.field(default_factory=list)


class CloseReply(Reply, kw_only=True):
    jobs: int = 0


class AckReply(Reply, kw_only=True):
    acked: list[int] = msgspec.field(default_factory=list)  # per session of the call


class JobsReply(Reply, kw_only=True):
    jobs: list[JobStatus] = msgspec.field(default_factory=list)


class RelayReply(Reply, kw_only=True):
    reason: str = ""


class RoomMemberRecord(msgspec.Struct, kw_only=True):
    """A room member as Redis keeps it (includes/rooms.lua)."""

    session_id: str
    joined_at: int = 0
    display_name: str | None = None
    preferred_lang: str | None = None
    lang: str = ""  # what it hears: its preferred_lang, else its session's target
    prefs: dict[str, bool] | list[Any] = msgspec.field(default_factory=dict)  # (Lua's {} may be a list)
    proc: str = ""


class RoomReply(Reply, kw_only=True):
    code: str = ""
    room_id: str = ""
    members: list[RoomMemberRecord] = msgspec.field(default_factory=list)
