"""JSON text <-> message Structs, one decoder per endpoint and direction.

Each endpoint gets its own decoder over its own union, so a frame that is valid on the other plane
(``session_init`` sent to ``/ws/node``) is an unknown type here rather than something a handler has
to reject later. Decoders and the encoder are built once at import: msgspec compiles the union into
a single pass over the input, which is the whole point of using it on the hot path.

Every decoding failure becomes ``ProtocolError`` (wire code ``INVALID_MESSAGE``) with a message a
peer's developer can act on. msgspec's own text already names the field (``$.max_concurrency``);
we only re-parse the frame, on the error path, to say which message it was, or to replace msgspec's
tag wording with "unknown message type".
"""

from __future__ import annotations

from typing import Any, TypeVar, get_args

import msgspec

from dragoman.errors import ProtocolError
from dragoman.wire.messages import (
    ErrorMessage,
    Message,
    NodeInbound,
    NodeOutbound,
    SessionInbound,
    SessionOutbound,
)

_T = TypeVar("_T")

_node_decoder = msgspec.json.Decoder(NodeInbound)
_node_outbound_decoder = msgspec.json.Decoder(NodeOutbound)
_session_decoder = msgspec.json.Decoder(SessionInbound)
_session_outbound_decoder = msgspec.json.Decoder(SessionOutbound)
_untyped_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()
_ECHO_LIMIT = 64


def _tags(union: Any) -> frozenset[str]:
    return frozenset(str(member.__struct_config__.tag) for member in get_args(union))


_NODE_TAGS = _tags(NodeInbound)
_NODE_OUTBOUND_TAGS = _tags(NodeOutbound)
_SESSION_TAGS = _tags(SessionInbound)
_SESSION_OUTBOUND_TAGS = _tags(SessionOutbound)


def _json_kind(value: object) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if value is None:
        return "null"
    return "object"


def _clip(text: str) -> str:
    """Error messages echo peer input back to the peer and into logs: keep that echo short."""
    return text if len(text) <= _ECHO_LIMIT else text[:_ECHO_LIMIT] + "..."


def _explain(data: str | bytes, tags: frozenset[str], error: msgspec.ValidationError) -> str:
    """Turn a validation failure into a message that says which frame and which field.

    Only runs on bad input, so parsing the frame a second time costs nothing that matters.
    """
    try:
        frame = _untyped_decoder.decode(data)
    except msgspec.DecodeError as e:  # msgspec may reject a bad tag before it reads the broken tail
        return f"malformed frame: {e}"
    if not isinstance(frame, dict):
        return f"a message must be a JSON object, got {_json_kind(frame)}"
    if "type" not in frame:
        return "a message must have a 'type' field"
    kind = frame["type"]
    if not isinstance(kind, str):
        return f"the 'type' field must be a string, got {_json_kind(kind)}"
    if kind not in tags:
        return f"unknown message type {_clip(kind)!r}"
    return f"invalid {kind} message: {error}"


def _decode(decoder: msgspec.json.Decoder[_T], tags: frozenset[str], data: str | bytes) -> _T:
    try:
        return decoder.decode(data)
    except msgspec.ValidationError as e:  # before DecodeError: it is a subclass
        raise ProtocolError(_explain(data, tags, e)) from e
    except msgspec.DecodeError as e:
        raise ProtocolError(f"malformed frame: {e}") from e


def decode_node(data: str | bytes) -> NodeInbound:
    """A frame received by the scheduler on ``/ws/node``."""
    return _decode(_node_decoder, _NODE_TAGS, data)


def decode_node_outbound(data: str | bytes) -> NodeOutbound:
    """A frame received by a node agent from the scheduler."""
    return _decode(_node_outbound_decoder, _NODE_OUTBOUND_TAGS, data)


def decode_session(data: str | bytes) -> SessionInbound:
    """A frame received by the scheduler on ``/ws/session``."""
    return _decode(_session_decoder, _SESSION_TAGS, data)


def decode_session_outbound(data: str | bytes) -> SessionOutbound:
    """A frame received by a client from the scheduler."""
    return _decode(_session_outbound_decoder, _SESSION_OUTBOUND_TAGS, data)


def encode(msg: Message) -> str:
    """The JSON text frame for ``msg``. Text, not bytes: the existing peers only read text frames."""
    return _encoder.encode(msg).decode()


def assign_frame(body: str, job_id: str, attempt: int) -> str:
    """The ``job_assign`` frame for an encoded ``JobAssignBody``: the body with ``job_id`` and
    ``attempt_id`` added, without decoding or re-encoding its audio. ``JobAssign`` declares the two
    after the body's fields, so this is byte for byte ``encode(JobAssign(...))``."""
    if not body.endswith("}"):
        raise ValueError("not an encoded JobAssignBody")
    return f'{body[:-1]},"job_id":{_encoder.encode(job_id).decode()},"attempt_id":{int(attempt)}}}'


def error_frame(code: str, message: str, details: dict[str, Any] | None = None) -> str:
    """The ``error`` frame, ready to send; ``details`` names the utterance when there is one."""
    return encode(ErrorMessage(code=code, message=message, details=details))
