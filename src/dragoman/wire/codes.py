"""Every error code and reason string the protocol names (PROTOCOL.md section 3), in one place.

``StrEnum`` members compare equal to their wire spelling, so a code read from a node or from Redis
can be checked against them directly, and a member can be put in a message as it is.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    INVALID_MESSAGE = "INVALID_MESSAGE"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    INVALID_SESSION = "INVALID_SESSION"
    SESSION_CLOSED = "SESSION_CLOSED"
    UNAUTHORIZED = "UNAUTHORIZED"
    NODE_UNAVAILABLE = "NODE_UNAVAILABLE"
    NODE_OVERLOADED = "NODE_OVERLOADED"
    NO_AVAILABLE_NODE = "NO_AVAILABLE_NODE"
    JOB_TIMEOUT = "JOB_TIMEOUT"
    MODEL_NOT_AVAILABLE = "MODEL_NOT_AVAILABLE"
    PROCESSING_ERROR = "PROCESSING_ERROR"
    RATE_LIMITED = "RATE_LIMITED"
    SCHEDULER_DEPENDENCY_DOWN = "SCHEDULER_DEPENDENCY_DOWN"
    JOB_CANCELLED = "JOB_CANCELLED"  # (ext) an operator cancelled the job


NODE_ERROR_CODES = frozenset({
    ErrorCode.PROCESSING_ERROR, ErrorCode.MODEL_NOT_AVAILABLE, ErrorCode.NODE_OVERLOADED,
    ErrorCode.NODE_UNAVAILABLE, ErrorCode.JOB_TIMEOUT, ErrorCode.INVALID_MESSAGE, ErrorCode.INTERNAL_ERROR,
})
"""Codes a node may report that reach the client and the counters as they are; any other code is
counted as PROCESSING_ERROR (the node's own code still reaches the client, in ``details``)."""


class RoomErrorCode(StrEnum):
    ROOM_NOT_FOUND = "ROOM_NOT_FOUND"
    ROOM_FULL = "ROOM_FULL"
    INVALID_ROOM_CODE = "INVALID_ROOM_CODE"
    ALREADY_IN_ROOM = "ALREADY_IN_ROOM"
    NOT_IN_ROOM = "NOT_IN_ROOM"  # (ext)


EMPTY_RESULT_REASONS = {"ASR_EMPTY": "asr_empty", "NO_TEXT_ASSIGNED": "no_text_assigned"}
"""A node's "empty ack" (``job_result.extra.reason``) and the ``missing_result.reason`` it becomes."""
