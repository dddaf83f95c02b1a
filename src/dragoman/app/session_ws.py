"""``/ws/session``: a client's connection. Reads frames and posts them to the session's actor;
the actor owns everything else (segmentation, dispatch, ordering)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from dragoman.errors import ProtocolError
from dragoman.sessions.actor import SessionActor, SessionSpec
from dragoman.wire import SessionInit, decode_session, error_frame

from .links import Link
from .node_ws import MAX_STRIKES, bearer, receive_text

if TYPE_CHECKING:
    from .hub import Hub

log = structlog.get_logger(__name__)


async def session_endpoint(ws: WebSocket) -> None:
    hub: Hub = ws.app.state.hub
    keys = hub.settings.api_keys
    key = bearer(ws, "api_key")
    if keys and key not in keys:
        await ws.close(code=1008)  # refused at the upgrade (HTTP 403)
        return
    await ws.accept()
    link = Link(ws, "session")
    link.start()
    hub.metrics.open_sockets.labels("session").inc()
    actor: SessionActor | None = None
    task: asyncio.Task[None] | None = None
    strikes = 0
    try:
        while not link.closed.is_set():
            receive = asyncio.ensure_future(receive_text(ws))
            waiters: set[asyncio.Future[object]] = {receive}  # type: ignore[arg-type]
            if task is not None:
                waiters.add(task)  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if receive not in done:  # the actor finished (session closed and flushed)
                receive.cancel()
                with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
                    await receive
                break
            try:
                text = receive.result()
                msg = decode_session(text)
                if actor is None:
                    if not isinstance(msg, SessionInit):
                        raise ProtocolError("send session_init first", code="INVALID_SESSION")
                    if hub.sessions_per_key.get(key, 0) >= hub.settings.max_sessions_per_key:
                        raise ProtocolError("too many open sessions for this key", code="RATE_LIMITED")
                    actor = SessionActor(hub, SessionSpec.from_init(msg), link, api_key=key)
                    hub.sessions[actor.spec.session_id] = actor
                    hub.sessions_per_key[key] = hub.sessions_per_key.get(key, 0) + 1
                    actor.ack()
                    task = asyncio.create_task(actor.run(), name=f"session:{actor.spec.session_id[:8]}")
                else:
                    await actor.frame_slots.acquire()
                    actor.post_frame(msg)
                strikes = 0
            except ProtocolError as exc:
                strikes += 1
                hub.metrics.invalid_frames.labels("session").inc()
                link.send(error_frame(exc.code, exc.message))
                if strikes > MAX_STRIKES:
                    break
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        hub.metrics.open_sockets.labels("session").dec()
        if actor is not None:
            actor.post_disconnect()
            if task is not None:
                try:
                    await asyncio.wait_for(task, 5)
                except Exception as exc:  # the actor logged its own failure; note the cleanup
                    log.warning("session actor ended with an error", session=actor.spec.session_id, error=repr(exc))
            hub.sessions.pop(actor.spec.session_id, None)
            hub.sessions_per_key[key] = max(0, hub.sessions_per_key.get(key, 1) - 1)
        await link.flush_and_close(timeout=2.0)
