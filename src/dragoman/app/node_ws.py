"""``/ws/node``: a worker's connection. Thin: decode a frame, call one Store transition, deliver
the effects, answer. Every rule about slots, leases and fencing lives in the scripts."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import msgspec
import structlog
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocket, WebSocketDisconnect

from dragoman.core.pools import pools_for_pairs
from dragoman.core.ratelimit import TokenBucket
from dragoman.errors import DependencyDown, DragomanError, ProtocolError, ScriptError
from dragoman.wire import (
    JobAck,
    JobResult,
    JobStarted,
    NodeAsrPartial,
    NodeError,
    NodeHeartbeat,
    NodeRegister,
    NodeRegisterAck,
    decode_node,
    encode,
    error_frame,
)
from dragoman.wire.messages import AsrPartial

from .hub import NodeSocket
from .links import Link

if TYPE_CHECKING:
    from .hub import Hub

log = structlog.get_logger(__name__)
MAX_STRIKES = 20  # consecutive invalid frames tolerated before the connection is closed
# Error codes a node may report that reach the client and the counters as they are; anything else
# is counted as PROCESSING_ERROR (the node's own code still reaches the client, in details).
NODE_ERROR_CODES = frozenset({"PROCESSING_ERROR", "MODEL_NOT_AVAILABLE", "NODE_OVERLOADED", "NODE_UNAVAILABLE",
                              "JOB_TIMEOUT", "INVALID_MESSAGE", "INTERNAL_ERROR"})


async def receive_text(ws: WebSocket) -> str:
    """The next text frame. A binary frame is a protocol error (answered, connection kept)."""
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("text") is not None:
        return str(message["text"])
    raise ProtocolError("binary frames are not part of the protocol: send JSON text frames")


def bearer(ws: HTTPConnection, query_name: str) -> str:
    auth = ws.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return ws.query_params.get(query_name, "")


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


def job_outcome(msg: JobResult) -> tuple[str, str]:
    if not msg.success:
        code = (msg.error.code if msg.error else "") or "PROCESSING_ERROR"
        return "failed", code if code in NODE_ERROR_CODES else "PROCESSING_ERROR"
    if msg.extra_reason in ("ASR_EMPTY", "NO_TEXT_ASSIGNED"):
        return "completed_empty", ""
    return "completed", ""


class NodeConnection:
    def __init__(self, hub: Hub, ws: WebSocket) -> None:
        self.hub, self.ws = hub, ws
        self.conn = uuid.uuid4().hex
        self.link = Link(ws, f"node:{self.conn[:8]}")
        self.node_id: str | None = None
        self.register_msg: NodeRegister | None = None
        self.explicit_pairs = False
        self.pools: list[str] = []
        self.strikes = 0
        rate = hub.settings.node_msgs_per_s
        self.limiter = TokenBucket(rate, burst=2 * rate, now_ms=_now_ms())

    async def serve(self) -> None:
        tokens = self.hub.settings.node_tokens
        if tokens and bearer(self.ws, "token") not in tokens:
            await self.ws.close(code=1008)  # before accept: the upgrade is refused with HTTP 403
            return
        await self.ws.accept()
        self.link.start()
        self.hub.metrics.open_sockets.labels("node").inc()
        try:
            while not self.link.closed.is_set():
                try:
                    text = await receive_text(self.ws)
                    if not self.limiter.allow(_now_ms()):
                        raise ProtocolError("too many messages; slow down", code="RATE_LIMITED")
                    msg = decode_node(text)
                    self.strikes = 0
                    await self.handle(msg)
                except ProtocolError as exc:
                    self.reject(exc.code, exc.message)
                except DependencyDown as exc:
                    self.link.send(error_frame("SCHEDULER_DEPENDENCY_DOWN", str(exc)))
                except DragomanError as exc:
                    log.error("node frame failed", node=self.node_id, error=str(exc))
                    self.link.send(error_frame("INTERNAL_ERROR", "the scheduler could not handle that frame"))
                if self.strikes > MAX_STRIKES:
                    log.warning("closing misbehaving node connection", node=self.node_id)
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.hub.metrics.open_sockets.labels("node").dec()
            await self.disconnected()

    def reject(self, code: str, message: str) -> None:
        self.strikes += 1
        self.hub.metrics.invalid_frames.labels("node").inc()
        self.link.send(error_frame(code, message))

    async def disconnected(self) -> None:
        if self.node_id is not None:
            current = self.hub.nodes.get(self.node_id)
            if current is not None and current.conn == self.conn:
                del self.hub.nodes[self.node_id]
            try:  # first, so nothing more is assigned to a socket that is gone
                reply = await self.hub.store.node_offline(self.node_id, conn=self.conn, reason="socket_closed")
                await self.hub.deliver(reply.effects)
            except Exception as exc:  # the heartbeat deadline will take the node down instead
                log.warning("node_offline failed", node=self.node_id, error=str(exc))
        await self.link.flush_and_close(timeout=1.0)

    def _require_node(self, node_id: str) -> str:
        if self.node_id is None:
            raise ProtocolError("send node_register first")
        if node_id != self.node_id:
            raise ProtocolError(f"node_id {node_id!r} is not the node registered on this connection")
        return self.node_id

    async def handle(self, msg: msgspec.Struct) -> None:
        if isinstance(msg, NodeRegister):
            await self.register(msg)
        elif isinstance(msg, NodeHeartbeat):
            await self.heartbeat(msg)
        elif isinstance(msg, JobResult):
            await self.result(msg)
        elif isinstance(msg, (JobAck, JobStarted)):
            node_id = self._require_node(msg.node_id)
            await self.hub.store.start_job(msg.job_id, node_id, msg.attempt_id)
        elif isinstance(msg, NodeAsrPartial):
            self._require_node(msg.node_id)
            self.relay_partial(msg)
        elif isinstance(msg, NodeError):
            log.warning("node reported an error", node=self.node_id, code=msg.code, message=msg.message)

    async def register(self, msg: NodeRegister) -> None:
        pairs = msg.effective_language_pairs()
        if not pairs:
            raise ProtocolError("node_register names no language pairs (language_pairs or language_capabilities)")
        node_id = msg.node_id or self.node_id or f"node-{uuid.uuid4().hex[:12]}"
        if self.node_id is not None and node_id != self.node_id:
            raise ProtocolError("a connection registers one node; reconnect to register another")
        pools = pools_for_pairs(pairs)
        if len(pools) > self.hub.settings.max_pools_per_node:
            raise ProtocolError(f"node_register: {len(pools)} pools (language pairs) is more than the "
                                f"{self.hub.settings.max_pools_per_node} allowed per node; send language_pairs")
        max_c = msg.max_concurrency or self.hub.settings.default_max_concurrency
        info = {"version": msg.version, "platform": msg.platform, "pairs": [list(p) for p in pairs],
                "hardware": msgspec.to_builtins(msg.hardware) if msg.hardware else None,
                "services": [s.type for s in msg.installed_services]}
        # Known to this process before the script runs: a job assigned to it meanwhile is held, not lost.
        sock = NodeSocket(node_id, self.conn, self.link)
        previous = self.hub.nodes.get(node_id)
        self.hub.nodes[node_id] = sock
        try:
            reply = await self.hub.store.register_node(node_id, conn=self.conn, max_concurrency=max_c,
                                                       pools=pools, info=info)
        except (ValueError, ScriptError) as exc:
            if previous is not None:
                self.hub.nodes[node_id] = previous
            else:
                self.hub.nodes.pop(node_id, None)
            raise ProtocolError(f"node_register: {exc}") from None
        self.node_id, self.register_msg, self.pools = node_id, msg, pools
        self.explicit_pairs = msg.language_pairs is not None
        s = self.hub.settings
        self.link.send(encode(NodeRegisterAck(node_id=node_id, message="registered", status="ready",
                                              heartbeat_interval_ms=s.heartbeat_interval_ms,
                                              lease_ms=s.job_timeout_ms)))
        sock.open()
        log.info("node registered", node=node_id, pools=pools, max_concurrency=max_c,
                 reconnected=reply.reconnected)
        await self.hub.deliver(reply.effects)

    async def heartbeat(self, msg: NodeHeartbeat) -> None:
        node_id = self._require_node(msg.node_id)
        pools = None
        if msg.language_capabilities is not None and not self.explicit_pairs:
            new = pools_for_pairs(msg.language_capabilities.default_language_pairs())
            if new and new != self.pools:
                pools, self.pools = new, new
        usage = msgspec.to_builtins(msg.resource_usage) if msg.resource_usage else {}
        reply = await self.hub.store.heartbeat(node_id, conn=self.conn, draining=msg.draining,
                                               pools=pools, usage=usage)
        if reply.status == "unknown" and self.register_msg is not None:
            # reaped while it was silent: it is back, so it registers again
            await self.register(self.register_msg)
            return
        await self.hub.deliver(reply.effects)

    async def result(self, msg: JobResult) -> None:
        node_id = self._require_node(msg.node_id)
        outcome, code = job_outcome(msg)
        payload = encode(msg)
        reply = await self.hub.store.complete(msg.job_id, node_id, msg.attempt_id, outcome, code, payload)
        if reply.status == "rejected":
            # Counted and logged, answered so the node knows, but no strike: late results are normal.
            self.hub.metrics.stale_results.labels(reply.reason).inc()
            log.info("result rejected", node=node_id, job=msg.job_id, attempt=msg.attempt_id, reason=reply.reason)
            self.link.send(error_frame("INVALID_MESSAGE", f"job_result for {msg.job_id} attempt {msg.attempt_id} "
                                       f"rejected: {reply.reason} (not the job's current holder and attempt)"))
            return
        if reply.status == "duplicate":
            self.hub.metrics.stale_results.labels("duplicate").inc()
            return
        await self.hub.deliver(reply.effects, payloads={msg.job_id: payload})

    def relay_partial(self, msg: NodeAsrPartial) -> None:
        """Interim transcripts are best-effort: relayed when the session's socket is on this process."""
        if not msg.session_id or msg.utterance_index is None:
            return
        actor = self.hub.sessions.get(msg.session_id)
        if actor is not None:
            actor.send(AsrPartial(session_id=msg.session_id, utterance_index=msg.utterance_index,
                                  job_id=msg.job_id, text=msg.text, is_final=msg.is_final,
                                  trace_id=msg.trace_id or actor.spec.trace_id))


async def node_endpoint(ws: WebSocket) -> None:
    await NodeConnection(ws.app.state.hub, ws).serve()
