"""``/ws/node``: a worker's connection. Thin: decode a frame, call one Store transition, deliver
the effects, answer. Every rule about slots, leases and fencing lives in the scripts."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

import msgspec
import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from dragoman.core.pools import pools_for_pairs
from dragoman.errors import DependencyDown, ProtocolError, ScriptError
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
MAX_STRIKES = 20  # invalid frames tolerated before the connection is closed


def bearer(ws: WebSocket, query_name: str) -> str:
    auth = ws.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return ws.query_params.get(query_name, "")


class RateLimiter:
    """Token bucket; ``rate`` messages per second with a burst of ``2 x rate``."""

    def __init__(self, rate: float) -> None:
        self.rate, self.tokens, self.at = rate, rate * 2, time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate * 2, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def job_outcome(msg: JobResult) -> tuple[str, str]:
    if not msg.success:
        return "failed", (msg.error.code if msg.error else "") or "PROCESSING_ERROR"
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
        self.limiter = RateLimiter(hub.settings.node_msgs_per_s)

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
                text = await self.ws.receive_text()
                if not self.limiter.allow():
                    self.reject("RATE_LIMITED", "too many messages; slow down")
                    continue
                try:
                    msg = decode_node(text)
                    await self.handle(msg)
                except ProtocolError as exc:
                    self.reject(exc.code, exc.message)
                except DependencyDown as exc:
                    self.link.send(error_frame("SCHEDULER_DEPENDENCY_DOWN", str(exc)))
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
        await self.link.flush_and_close(timeout=1.0)
        if self.node_id is None:
            return
        current = self.hub.nodes.get(self.node_id)
        if current is not None and current.conn == self.conn:
            del self.hub.nodes[self.node_id]
        try:
            reply = await self.hub.store.node_offline(self.node_id, conn=self.conn, reason="socket_closed")
            await self.hub.deliver(reply.effects)
        except Exception as exc:  # the heartbeat deadline will take the node down instead
            log.warning("node_offline failed", node=self.node_id, error=str(exc))

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
        max_c = msg.max_concurrency or self.hub.settings.default_max_concurrency
        info = {"version": msg.version, "platform": msg.platform, "pairs": [list(p) for p in pairs],
                "hardware": msgspec.to_builtins(msg.hardware) if msg.hardware else None,
                "services": [s.type for s in msg.installed_services]}
        try:
            reply = await self.hub.store.register_node(node_id, conn=self.conn, max_concurrency=max_c,
                                                       pools=pools, info=info)
        except (ValueError, ScriptError) as exc:
            raise ProtocolError(f"node_register: {exc}") from None
        self.node_id, self.register_msg, self.pools = node_id, msg, pools
        self.explicit_pairs = msg.language_pairs is not None
        self.hub.nodes[node_id] = NodeSocket(node_id, self.conn, self.link)
        s = self.hub.settings
        self.link.send(encode(NodeRegisterAck(node_id=node_id, message="registered", status="ready",
                                              heartbeat_interval_ms=s.heartbeat_interval_ms,
                                              lease_ms=s.job_timeout_ms)))
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
            self.hub.metrics.stale_results.labels(reply.reason).inc()
            log.info("result rejected", node=node_id, job=msg.job_id, attempt=msg.attempt_id, reason=reply.reason)
            self.reject("INVALID_MESSAGE", f"job_result for {msg.job_id} attempt {msg.attempt_id} rejected: "
                        f"{reply.reason} (not the job's current holder and attempt)")
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
