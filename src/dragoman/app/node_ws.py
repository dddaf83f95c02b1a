"""``/ws/node``: a worker's connection. Thin: decode a frame, call one Store transition, answer.
Every rule about slots, leases and fencing lives in the scripts; the Store hands their effects to
the hub."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from typing import TYPE_CHECKING, Any

import msgspec
import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from dragoman.clock import monotonic_ms
from dragoman.core.pools import pools_for_pairs
from dragoman.core.ratelimit import TokenBucket
from dragoman.errors import DependencyDown, DragomanError, ProtocolError, ScriptError
from dragoman.store.replies import Status
from dragoman.wire import (
    NODE_ERROR_CODES,
    AsrPartial,
    ErrorCode,
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

from .hub import NodeLink
from .sockets import MAX_STRIKES, Link, bearer, receive_text, take_in_place

if TYPE_CHECKING:
    from dragoman.store.replies import CompleteReply, HeartbeatReply

    from .hub import Hub

log = structlog.get_logger(__name__)

# The existing worker answers an assignment it already has (a re-sent job_assign after a reconnect)
# with a failed result whose message starts with this: it still runs the job, so nothing changes.
_ALREADY_HAS_IT = "DUPLICATE_JOB_ID"
# ... and one it cannot take with these: the job moves on to another node.
_CANNOT_TAKE = ("DUPLICATE_UTTERANCE_INDEX",)


def job_outcome(msg: JobResult) -> tuple[str, str]:
    """What a node's job_result means: (outcome, code); outcome "ignore" changes nothing."""
    if not msg.success:
        code = (msg.error.code if msg.error else "") or ErrorCode.PROCESSING_ERROR
        text = msg.error.message if msg.error else ""
        if text.startswith(_ALREADY_HAS_IT):
            return "ignore", code
        if code == ErrorCode.NODE_OVERLOADED or text.startswith(_CANNOT_TAKE):
            return "refused", ErrorCode.NODE_OVERLOADED
        return "failed", code if code in NODE_ERROR_CODES else ErrorCode.PROCESSING_ERROR
    if msg.extra_reason in ("ASR_EMPTY", "NO_TEXT_ASSIGNED"):
        return "completed_empty", ""
    return "completed", ""


def owner_of(token: str) -> str:
    """What binds a node id to the token that first registered it (never the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else ""


class NodeConnection:
    def __init__(self, hub: Hub, ws: WebSocket) -> None:
        self.hub, self.ws = hub, ws
        self.conn = uuid.uuid4().hex
        self.link = Link(ws, f"node:{self.conn[:8]}")
        self.node_id: str | None = None
        self.owner = ""
        self.registration: str | None = None  # its node_register as sent (kept as text: ~1/3 of the decoded size)
        self.explicit_pairs = False
        self.capabilities_seen = 0  # hash of the last heartbeat's language_capabilities
        self.reregistering: asyncio.Task[None] | None = None  # after a heartbeat found the node unknown
        self.gone = False  # the socket is gone: late heartbeat replies change nothing
        self.pools: list[str] = []
        self.strikes = 0
        rate = hub.settings.node_msgs_per_s
        self.limiter = TokenBucket(rate, burst=2 * rate, now_ms=monotonic_ms())

    async def serve(self) -> None:
        tokens = self.hub.settings.node_tokens
        token = bearer(self.ws, "token")
        if tokens and token not in tokens:
            await self.ws.close(code=1008)  # before accept: the upgrade is refused with HTTP 403
            return
        self.owner = owner_of(token) if tokens else ""
        await self.ws.accept()
        self.hub.metrics.open_sockets.labels("node").inc()
        try:
            while not self.link.closed:
                try:
                    await self.next_frame()
                except DragomanError as exc:
                    self.failed(exc)
                if self.strikes > MAX_STRIKES:
                    log.warning("closing misbehaving node connection", node=self.node_id)
                    break
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            self.hub.metrics.open_sockets.labels("node").dec()
            await self.disconnected()

    async def next_frame(self) -> None:
        """Read and handle one frame. (Its own frame, so that the last frame and its decoded message
        are not kept alive between frames: a socket idles for hours with them.)"""
        text = await receive_text(self.ws)
        if not self.limiter.allow(monotonic_ms()):
            raise ProtocolError("too many messages; slow down", code=ErrorCode.RATE_LIMITED)
        msg = decode_node(text)
        self.strikes = 0
        if self.reregistering is not None:  # frames after a heartbeat that found the node gone wait for it
            await asyncio.shield(self.reregistering)
        await self.handle(msg, text)

    def failed(self, exc: BaseException, what: str = "node frame failed") -> None:
        """Tell the node that handling its frame failed, and why (as much as it may know)."""
        if isinstance(exc, ProtocolError):
            self.reject(exc.code, exc.message)
        elif isinstance(exc, DependencyDown):
            self.link.send(error_frame(ErrorCode.SCHEDULER_DEPENDENCY_DOWN, str(exc)))
        else:
            log.error(what, node=self.node_id, error=str(exc))
            self.link.send(error_frame(ErrorCode.INTERNAL_ERROR, "the scheduler could not handle that frame"))

    def reject(self, code: str, message: str) -> None:
        self.strikes += 1
        self.hub.metrics.invalid_frames.labels("node").inc()
        self.link.send(error_frame(code, message))

    async def disconnected(self) -> None:
        self.gone = True
        if self.reregistering is not None:  # it ends before the node goes offline, never after
            with contextlib.suppress(Exception):
                await asyncio.shield(self.reregistering)
        if self.node_id is not None:
            self.hub.detach_node(self.node_id, self.conn)
            await self._offline()
        await self.link.close(timeout=1.0)

    async def _offline(self, node_id: str | None = None, reason: str = "socket_closed") -> None:
        """First, so nothing more is assigned to a socket that is gone (fenced by this connection)."""
        node_id = node_id or self.node_id
        assert node_id is not None
        try:
            await self.hub.store.node_offline(node_id, conn=self.conn, reason=reason)
        except Exception as exc:  # its heartbeat deadline (or this process's death) takes it down instead
            log.warning("node_offline failed", node=node_id, error=str(exc))

    def _require_node(self, node_id: str) -> str:
        if self.node_id is None:
            raise ProtocolError("send node_register first")
        if node_id != self.node_id:
            raise ProtocolError(f"node_id {node_id!r} is not the node registered on this connection")
        return self.node_id

    async def handle(self, msg: msgspec.Struct, text: str) -> None:
        if isinstance(msg, JobResult):  # (the frame of every job first)
            self.result(msg, text)
        elif isinstance(msg, NodeRegister):
            await self.register(msg, text)
        elif isinstance(msg, NodeHeartbeat):
            self.beat(msg)
        elif isinstance(msg, JobAck | JobStarted):
            node_id = self._require_node(msg.node_id)
            await self.hub.store.start_job(msg.job_id, node_id, msg.attempt_id)
        elif isinstance(msg, NodeAsrPartial):
            await self.partial(msg)
        elif isinstance(msg, NodeError):
            log.warning("node reported an error", node=self.node_id, code=msg.code, message=msg.message)

    # ------------------------------------------------------------------ registration
    async def register(self, msg: NodeRegister, text: str, announce: bool = True) -> None:
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
        # Known to this process before the script runs: a job assigned to it meanwhile is held, not lost.
        link = self.hub.nodes.get(node_id) if announce is False else None
        if link is None or link.conn != self.conn:
            link = NodeLink(node_id, self.conn, self.link, self)
        previous = self.hub.attach_node(link)
        try:
            reply = await self.hub.store.register_node(node_id, conn=self.conn, max_concurrency=max_c, pools=pools,
                                                       info=info, owner=self.owner)
            if reply.status == Status.IN_USE and self._holder_is_gone(previous, reply.proc):
                reply = await self.hub.store.register_node(node_id, conn=self.conn, max_concurrency=max_c,
                                                           pools=pools, info=info, owner=self.owner, force=True)
        except (ValueError, ScriptError) as exc:
            self.hub.detach_node(node_id, self.conn, restore=previous)
            raise ProtocolError(f"node_register: {exc}") from None
        except BaseException:
            # The reply was lost (Redis gone past the retries, or the socket closed meanwhile): the
            # script may have run. Undo it, so Redis never holds a node ready on a socket that never
            # heard its ack and whose assignments would wait forever.
            self.hub.detach_node(node_id, self.conn, restore=previous)
            await self._offline(node_id, reason="register_failed")
            raise
        if reply.status == Status.FORBIDDEN:
            self.hub.detach_node(node_id, self.conn, restore=previous)
            raise ProtocolError(f"node_id {node_id!r} is registered with another node token", code=ErrorCode.UNAUTHORIZED)
        if reply.status == Status.IN_USE:
            self.hub.detach_node(node_id, self.conn, restore=previous)
            if previous is not None and reply.proc == self.hub.store.proc:
                previous.link.probe()  # an idle socket is pinged seldom: ask it now whether it is there
            raise ProtocolError(f"node_id {node_id!r} is in use by a live connection; register again once it "
                                "is gone (a connection that stops answering pings is gone within seconds)")
        self.node_id, self.registration, self.pools = node_id, text, pools
        self.explicit_pairs = msg.language_pairs is not None
        s = self.hub.settings
        if announce:
            self.link.send(encode(NodeRegisterAck(node_id=node_id, message="registered", status="ready",
                                                  heartbeat_interval_ms=s.heartbeat_interval_ms,
                                                  lease_ms=s.job_timeout_ms)))
        link.open()
        take_in_place(self.link, self.in_place)
        log.info("node registered", node=node_id, pools=pools, max_concurrency=max_c, held=reply.held,
                 reconnected=reply.reconnected)

    def _holder_is_gone(self, previous: NodeLink | None, proc: str) -> bool:
        """The live connection Redis names is on this process: is it really still there?"""
        if proc != self.hub.store.proc:
            return False  # another process holds it; its pings take it down if it is gone
        return previous is None or previous.conn == self.conn or previous.link.closed

    async def reregister(self) -> None:
        """Redis lost its data (or reaped the node while it was silent): register this node again
        over the same connection (no new ack), as it registered the first time."""
        if self.registration is not None:
            msg = decode_node(self.registration)
            assert isinstance(msg, NodeRegister)
            await self.register(msg, self.registration, announce=False)

    def beat(self, msg: NodeHeartbeat) -> None:
        """A heartbeat, without waiting for its reply (it comes within HEARTBEAT_LINGER_S, see
        ``_heartbeat_done``). Raises ProtocolError, and then has changed nothing."""
        node_id = self._require_node(msg.node_id)
        pools = None
        seen = self.capabilities_seen
        caps = msg.language_capabilities
        if caps is not None and not self.explicit_pairs:
            seen = hash(msgspec.json.encode(caps))
            if seen != self.capabilities_seen:  # (most heartbeats repeat them: the pools are worked out once)
                new = pools_for_pairs(caps.default_language_pairs())
                if new and new != self.pools:
                    pools = new
        usage = msgspec.json.encode(msg.resource_usage).decode() if msg.resource_usage else "{}"
        done = self._heartbeat_done if pools is None else lambda r, exc: self._heartbeat_done(r, exc, pools)
        try:
            self.hub.store.heartbeat_then(node_id, done, conn=self.conn, draining=msg.draining, pools=pools,
                                          usage=usage)
        except ValueError as exc:  # the same checks as at registration
            raise ProtocolError(f"node_heartbeat: {exc}") from None
        self.capabilities_seen = seen

    def in_place(self, message: dict[str, Any]) -> bool:
        """``take_in_place`` for a registered node: its frames are nearly all job results and
        heartbeats, and one arriving while the frame loop waits with nothing queued is handled in
        the socket's own callback, without waking the loop's task. Any other frame, and one that
        needs the loop (one that fails, over the rate limit, while the node re-registers), goes to
        the loop, which handles it as always."""
        text = message.get("text")
        if text is None or self.gone or self.reregistering is not None or self.node_id is None:
            return False
        try:
            msg = decode_node(text)
        except Exception:  # (a ProtocolError: the loop's path answers it and counts the strike)
            return False
        kind = type(msg)
        if ((kind is not JobResult and kind is not NodeHeartbeat) or msg.node_id != self.node_id  # type: ignore[union-attr]
                or not self.limiter.allow(monotonic_ms())):
            return False
        try:
            if kind is JobResult:
                self.result(msg, text)  # type: ignore[arg-type]
            else:
                self.beat(msg)  # type: ignore[arg-type]
        except ProtocolError:  # (nothing changed: the loop meets it again and answers it)
            return False
        self.strikes = 0
        return True

    def _heartbeat_done(self, reply: HeartbeatReply | None, exc: BaseException | None,
                        pools: list[str] | None = None) -> None:
        if self.gone or isinstance(exc, asyncio.CancelledError):
            return
        if exc is not None:
            self.failed(exc, "node heartbeat failed")
        else:
            assert reply is not None
            if pools is not None:
                self.pools = pools
            if reply.status == Status.UNKNOWN and self.reregistering is None:
                # reaped while it was silent (or Redis lost it): it is back; its next frames wait for it
                self.reregistering = asyncio.get_running_loop().create_task(self._reregister_now(),
                                                                            name=f"reregister:{self.node_id}")

    async def _reregister_now(self) -> None:
        try:
            await self.reregister()
        except DragomanError as exc:
            self.failed(exc, "node re-registration failed")
        finally:
            self.reregistering = None

    # ------------------------------------------------------------------ jobs
    def result(self, msg: JobResult, text: str) -> None:
        """A job's result, settled without holding up the node's next frames (the reply is looked at
        in ``_result_done``). Raises ProtocolError, and then has changed nothing."""
        node_id = self._require_node(msg.node_id)
        outcome, code = job_outcome(msg)
        if outcome == "ignore":
            log.info("node already runs the job", node=node_id, job=msg.job_id, attempt=msg.attempt_id)
            return
        link = self.hub.nodes.get(node_id)
        if link is not None:
            link.forget(msg.job_id)
        self.hub.store.complete_then(msg.job_id, node_id, msg.attempt_id, outcome, code, text, msg,
                                     lambda reply, exc: self._result_done(reply, exc, msg))

    def _result_done(self, reply: CompleteReply | None, exc: BaseException | None, msg: JobResult) -> None:
        if isinstance(exc, asyncio.CancelledError):
            return
        if exc is not None:
            if not self.gone:
                self.failed(exc, "node result failed")
            return
        assert reply is not None
        if reply.status == Status.REJECTED:
            # Counted and logged, answered so the node knows, but no strike: late results are normal.
            self.hub.metrics.stale_results.labels(reply.reason).inc()
            log.info("result rejected", node=self.node_id, job=msg.job_id, attempt=msg.attempt_id, reason=reply.reason)
            self.link.send(error_frame(ErrorCode.INVALID_MESSAGE, f"job_result for {msg.job_id} attempt "
                                       f"{msg.attempt_id} rejected: {reply.reason} (not the job's current holder "
                                       "and attempt)"))
        elif reply.status == Status.DUPLICATE:
            self.hub.metrics.stale_results.labels("duplicate").inc()

    async def partial(self, msg: NodeAsrPartial) -> None:
        """Interim transcripts go to the job's session, wherever it is, and only from the job's holder."""
        node_id = self._require_node(msg.node_id)
        if msg.session_id is None or msg.utterance_index is None:
            return
        frame = encode(AsrPartial(session_id=msg.session_id, utterance_index=msg.utterance_index, job_id=msg.job_id,
                                  text=msg.text, is_final=msg.is_final, trace_id=msg.trace_id or ""))
        reply = await self.hub.store.relay_partial(msg.job_id, node_id, msg.session_id, msg.utterance_index, frame)
        if reply.status == Status.REJECTED:
            self.reject(ErrorCode.INVALID_MESSAGE, f"asr_partial for {msg.job_id} refused: {reply.reason} "
                                                   "(only the job's current holder may send it)")


async def node_endpoint(ws: WebSocket) -> None:
    await NodeConnection(ws.app.state.hub, ws).serve()

