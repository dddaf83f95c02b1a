"""``/ws/session``: a client's connection. The first frame opens (or resumes) the session; every
later frame goes to the session's actor, which owns everything else."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog
from starlette.websockets import WebSocket, WebSocketDisconnect

from dragoman.clock import monotonic_ms, wall_offset_ms
from dragoman.errors import DragomanError, ProtocolError
from dragoman.sessions.actor import SessionActor, wait_finished
from dragoman.sessions.protocol import ResumeState, SessionProtocol
from dragoman.sessions.spec import SessionConfig, SessionSpec, key_digest
from dragoman.store.replies import Status
from dragoman.wire import ErrorCode, SessionInit, decode_session, error_frame

from .sockets import MAX_STRIKES, STOPPED, Interruptible, Link, bearer, receive_text, take_in_place

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
    hub.metrics.open_sockets.labels("session").inc()
    actor: SessionActor | None = None
    strikes = 0

    def forgive() -> None:  # a good frame: the strikes count invalid frames in a row
        nonlocal strikes
        strikes = 0

    reads = Interruptible()  # the actor's end (closed and flushed, or taken over) interrupts a read
    try:
        while not link.closed:
            try:
                text = await reads.wait(receive_text(ws))
                if text is STOPPED:
                    break
                msg = decode_session(text)
                if actor is None:
                    if not isinstance(msg, SessionInit):
                        raise ProtocolError("send session_init first", code=ErrorCode.INVALID_SESSION)
                    if hub.session_limit_reached(key):
                        raise ProtocolError("too many open sessions for this key", code=ErrorCode.RATE_LIMITED)
                    actor, resumed = await open_or_resume(hub, msg, key, link)
                    task = asyncio.create_task(actor.run(open_record=not resumed),
                                               name=f"session:{actor.session_id[:8]}")
                    task.add_done_callback(reads.stop)
                    hand_over_in_place(link, actor, on_frame=forgive)
                else:
                    if await reads.wait(actor.frame_slots.acquire()) is STOPPED:
                        break
                    actor.post_frame(msg)
                strikes = 0
            except ProtocolError as exc:
                strikes += 1
                hub.metrics.invalid_frames.labels("session").inc()
                link.send(error_frame(exc.code, exc.message))
                if strikes > MAX_STRIKES:
                    break
            except DragomanError as exc:  # Redis unreachable while opening: say so, let the client retry
                link.send(error_frame(getattr(exc, "code", ErrorCode.INTERNAL_ERROR), str(exc)))
                break
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        hub.metrics.open_sockets.labels("session").dec()
        if actor is not None:
            actor.post_gone()
            await wait_finished(actor, 5)
            hub.end_session(actor)
        code = actor.close_code if actor is not None and actor.close_code else 1000
        await link.close(code=code, timeout=2.0)


def hand_over_in_place(link: Link, actor: SessionActor, on_frame: Callable[[], None]) -> None:
    """From now on a client frame that decodes, arriving while this socket's reader waits with
    nothing queued, goes to the actor in the socket's own callback: the reader task is not woken
    for it (one task switch and five coroutine frames less per frame). Anything else (a frame
    that does not decode, a binary frame, the disconnect, a full inbox) waits for the reader,
    which answers it as before; so does every frame under a server other than ours."""
    slots = actor.frame_slots

    def direct(message: Any) -> bool:
        text = message.get("text")
        if text is None or slots.free <= 0 or actor.finished.is_set():
            return False
        try:
            msg = decode_session(text)
        except Exception:  # (a ProtocolError: the reader's path answers it and counts the strike)
            return False
        slots.try_acquire()
        actor.post_frame(msg)
        on_frame()
        return True

    take_in_place(link, direct)


async def open_or_resume(hub: Hub, init: SessionInit, key: str, link: Link) -> tuple[SessionActor, bool]:
    """A new session, or (``resume_session_id``) the session a lost socket or process held, taken over."""
    config = SessionConfig.from_settings(hub.settings)
    now = monotonic_ms()
    if not init.resume_session_id:
        token = secrets.token_hex(16)
        spec = SessionSpec.from_init(init, api_key=key, resume_token=token)
        proto = SessionProtocol(spec, config, now=now, wall_offset_ms=wall_offset_ms(), resume_token=token)
        return hub.new_session(proto, link, api_key=key), False
    sid = init.resume_session_id
    try:
        record = await hub.store.session(sid)
    except ValueError:
        record = None
    if not record or not record.get("spec"):
        raise ProtocolError(f"no session {sid} to resume (unknown, or its grace period is over)",
                            code=ErrorCode.INVALID_SESSION)
    spec = SessionSpec.from_json(record["spec"])
    if spec.key != key_digest(key):
        raise ProtocolError("that session was opened with another API key", code=ErrorCode.UNAUTHORIZED)
    if not init.resume_token or not secrets.compare_digest(spec.resume, key_digest(init.resume_token)):
        raise ProtocolError("resume_session_id needs the resume_token its first session_init_ack gave",
                            code=ErrorCode.UNAUTHORIZED)
    replies = await hub.store.resume_session(sid)
    home = replies[0]
    if home.status != Status.RESUMED:
        raise ProtocolError(f"no session {sid} to resume (unknown, or its grace period is over)",
                            code=ErrorCode.INVALID_SESSION)
    jobs = tuple(job for reply in replies if reply.status == Status.RESUMED for job in reply.jobs)
    state = ResumeState(epoch=home.epoch, next_utt=max(home.next_utt, 0), seq=home.seq, skip=home.skip, jobs=jobs)
    proto = SessionProtocol(spec, config, now=now, wall_offset_ms=wall_offset_ms(), resume=state)
    cells = {reply.cell for reply in replies if reply.status == Status.RESUMED}
    log.info("session resumed", session=sid, epoch=home.epoch, owed=len(jobs))
    return hub.new_session(proto, link, api_key=key, cells=cells), True
