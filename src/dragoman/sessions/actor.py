"""The session actor: a thin asyncio shell around ``SessionProtocol``.

One task and one inbox per session: client frames, job outcomes, partials and timer ticks arrive in
the inbox, go into the protocol with the time, and the actions that come out are carried out here,
in order, through a ``SessionStore`` and a ``Transport`` (``dragoman.types``). Nothing here decides
anything; everything here waits on something.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from typing import Any

import structlog

from dragoman.clock import monotonic_ms
from dragoman.errors import DragomanError
from dragoman.flag import Flag
from dragoman.store.api import JobSpec
from dragoman.store.replies import Effect
from dragoman.types import Observer, SessionStore, Transport
from dragoman.wire import ErrorCode, Message, encode, error_frame

from .protocol import (
    Ack,
    Action,
    CancelJob,
    CheckJobs,
    CloseSocket,
    Count,
    Detach,
    Dispatch,
    DispatchResult,
    End,
    Observe,
    Outcome,
    Reopen,
    RoomAnswer,
    RoomCall,
    RoomNews,
    Send,
    SessionProtocol,
    Settled,
)

log = structlog.get_logger(__name__)
_BACKGROUND: set[asyncio.Task[Any]] = set()


class FrameSlots:
    """A semaphore for one taker (the session's socket reader) that can also be taken without
    waiting (``try_acquire``: a frame handed over in the socket's own callback, ``session_ws``)."""

    __slots__ = ("free", "_freed")

    def __init__(self, n: int) -> None:
        self.free = n
        self._freed = Flag()

    def try_acquire(self) -> bool:
        if self.free <= 0:
            return False
        self.free -= 1
        return True

    async def acquire(self) -> None:
        while self.free <= 0:
            self._freed.clear()
            await self._freed.wait()
        self.free -= 1

    def release(self) -> None:
        self.free += 1
        self._freed.set()


class SessionActor:
    def __init__(self, proto: SessionProtocol, store: SessionStore, transport: Transport, *,
                 observer: Observer | None = None, grace_ms: int = 0, cells: set[str] | None = None,
                 api_key: str = "") -> None:
        self.proto = proto
        self.store = store
        self.transport = transport
        self.observer = observer
        self.grace_ms = grace_ms
        self.api_key = api_key
        self.cells: set[str] = set(cells or ())  # cells where the session has records
        self.inbox: deque[tuple[str, Any]] = deque()  # what the session's loop has yet to take
        self._inbox_ready = Flag()
        self._timer: asyncio.TimerHandle | None = None  # wakes the loop at the protocol's next deadline
        self._timer_at = 0
        # Client frames waiting in the inbox are bounded: the socket reader takes a slot before
        # posting one, so a client that sends faster than we dispatch is slowed down by TCP.
        self.frame_slots = FrameSlots(64)
        self.finished = Flag()
        self.close_code: int | None = None
        self.opened = False
        self._idle = False  # the loop waits for an item (see _in_place)
        self._failed: Exception | None = None  # an item handled in place failed

    @property
    def session_id(self) -> str:
        return self.proto.session_id

    # ------------------------------------------------------------------ inbox
    def _post(self, kind: str, item: Any) -> None:
        if kind == "outcome" and self._idle and not self.inbox:
            self._in_place(kind, item)
            return
        self.inbox.append((kind, item))
        self._inbox_ready.set()

    def _in_place(self, kind: str, item: Any) -> None:
        """An item for a loop that waits with nothing before it: handled now, in the poster's call
        (a job's outcome: the loop's task is not woken for it). What would wait (a store call) and
        what follows it are left to the loop, as the inbox's next item, so the order is kept."""
        try:
            rest = self._perform_now(deque(self._handle(kind, item)))
        except Exception as exc:  # (the loop raises it: its handler ends the session)
            self._failed = exc
            self._inbox_ready.set()
            return
        if rest:
            self.inbox.append(("actions", rest))
            self._inbox_ready.set()
        elif self.proto.finished:
            self._inbox_ready.set()
        else:
            self._alarm(self.proto.next_deadline(), monotonic_ms())

    def post_frame(self, msg: Message) -> None:
        """Post a client frame (the caller holds one of ``frame_slots``; it is released when handled)."""
        self._post("frame", msg)

    def post_outcome(self, effect: Effect) -> None:
        self._post("outcome", effect)

    def post_partial(self, frame: str) -> None:
        self._post("partial", frame)

    def post_expect(self, effect: Effect) -> None:
        self._post("expect", effect)

    def post_room(self, effect: Effect) -> None:
        self._post("room", effect)

    def post_gone(self) -> None:
        self._post("gone", None)

    def post_superseded(self) -> None:
        self._post("superseded", None)

    def post_reset(self) -> None:
        self._post("reset", None)

    # ------------------------------------------------------------------ the loop
    async def run(self, *, open_record: bool = True) -> None:
        """Until the session is over (closed and flushed, its socket lost, or taken over)."""
        proto = self.proto
        try:
            if open_record:
                await self.store.open_session(proto.session_id, proto.spec.to_json())
            self.opened = True
            await self.perform(proto.start(monotonic_ms()))
            while not proto.finished:
                if not self.inbox:  # (a queued item is taken without a timer or a wait)
                    deadline, now = proto.next_deadline(), monotonic_ms()
                    if deadline is not None and deadline <= now:
                        await self.perform(proto.tick(now))
                        continue
                    self._alarm(deadline, now)
                    self._inbox_ready.clear()
                    self._idle = True
                    try:
                        await self._inbox_ready.wait()
                    finally:
                        self._idle = False
                    if self._failed is not None:
                        raise self._failed
                    continue  # an item, or the alarm (then the deadline is looked at again)
                kind, item = self.inbox.popleft()
                await self.perform(self._handle(kind, item))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("session actor failed", session=proto.session_id)
            code = ErrorCode.SCHEDULER_DEPENDENCY_DOWN if isinstance(exc, DragomanError) else ErrorCode.INTERNAL_ERROR
            self.transport.send(error_frame(code, "the session failed; please reconnect"))
            if self.opened and not proto.finished:
                proto.finished = True
                self._close_later(detach=True)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            self.finished.set()

    def _alarm(self, deadline: int | None, now: int) -> None:
        """Wake the loop by ``deadline`` (monotonic ms). One timer serves many waits: it is replaced
        only by an earlier deadline (a later one just wakes the loop early, to look again), since a
        timer made and cancelled around every wait cost a few µs of each job."""
        if deadline is None or (self._timer is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = asyncio.get_running_loop().call_later(max(0.001, (deadline - now) / 1000), self._ring)

    def _ring(self) -> None:
        self._timer = None
        self._inbox_ready.set()

    def _handle(self, kind: str, item: Any) -> list[Action]:
        now = monotonic_ms()
        if kind == "frame":
            try:
                return self.proto.receive(item, now)
            finally:
                self.frame_slots.release()
        if kind == "outcome":
            return self.proto.outcome(Outcome(item.job, item.state, item.code, item.result, item.payload), now)
        if kind == "actions":  # (left by _in_place)
            return list(item)
        if kind == "partial":
            self.transport.send(item)
            return []
        if kind == "expect":
            return self.proto.expect_room_job(item.job, item.speaker, item.utt, item.tgt, now, pool=item.pool)
        if kind == "room":
            return self.proto.room_news(RoomNews(item.room, item.event, item.sender, item.payload), now)
        if kind == "gone":
            return self.proto.socket_lost(now)
        if kind == "superseded":
            return self.proto.superseded()
        if kind == "reset":
            return self.proto.redis_reset(now)
        raise ValueError(f"unknown inbox item {kind!r}")

    async def perform(self, actions: list[Action]) -> None:
        """Carry out actions in order; an action whose answer goes back into the protocol appends
        the protocol's next actions."""
        queue = deque(actions)
        proto, sid = self.proto, self.proto.session_id
        while queue:
            queue = self._perform_now(queue)
            if not queue:
                return
            action = queue.popleft()  # (one that waits on the store)
            if isinstance(action, Dispatch):
                queue.extend(await self._dispatch(action))
            elif isinstance(action, CheckJobs):
                try:
                    statuses = await self.store.get_jobs(action.job_ids)
                except DragomanError as exc:
                    log.warning("job check failed", session=sid, error=str(exc))
                    statuses = {}
                queue.extend(proto.checked(statuses, monotonic_ms()))
            elif isinstance(action, RoomCall):
                queue.extend(await self._room(action))
            elif isinstance(action, CancelJob):
                await self._best_effort("cancel", self.store.cancel(action.job_id, action.code))
            elif isinstance(action, Reopen):
                await self._best_effort("reclaim", self.store.reclaim_session(sid, proto.spec.to_json(), proto.epoch,
                                                                              self.cells))

    def _perform_now(self, queue: deque[Action]) -> deque[Action]:
        """Carry out the actions at the front of ``queue`` that wait on nothing; what is left starts
        with one that waits on the store (``perform`` carries that out)."""
        while queue:
            action = queue[0]
            # (the common actions of a job first: every one tested costs an isinstance call)
            if isinstance(action, Send):
                if action.soon:
                    self.transport.send_soon(encode(action.message))
                else:
                    self.transport.send(encode(action.message))
            elif isinstance(action, Dispatch):
                return queue
            elif isinstance(action, Settled):
                if self.observer is not None:
                    self.observer.settled(action.state, action.code)
            elif isinstance(action, Observe):
                if self.observer is not None:
                    self.observer.observe(action.name, action.seconds)
            elif isinstance(action, Ack):  # nothing waits on it: it goes with the other sessions' acks
                self._background(self._best_effort("ack", self.store.ack(self.proto.session_id, action.job_ids,
                                                                         ended=action.ended, batched=True)))
            elif isinstance(action, Count):
                if self.observer is not None:
                    self.observer.count(action.name)
            elif isinstance(action, CheckJobs | RoomCall | CancelJob | Reopen):
                return queue
            elif isinstance(action, Detach | End):
                self._close_later(detach=isinstance(action, Detach))
            elif isinstance(action, CloseSocket):
                self.close_code = action.code
            queue.popleft()
        return queue

    async def _dispatch(self, action: Dispatch) -> list[Action]:
        req, proto = action.request, self.proto
        spec = JobSpec(pool=req.pool, session_id=proto.session_id, utterance_index=req.utt, tgt_lang=req.tgt,
                       body=req.body, unique=req.unique, avoid=req.avoid, session_proc=self.store.proc,
                       epoch=proto.epoch, commit=req.commit, listeners=req.listeners)
        started = time.perf_counter()
        try:
            reply = await self.store.dispatch(spec)
        except DragomanError as exc:
            log.error("dispatch failed", session=proto.session_id, error=str(exc))
            result = DispatchResult("error", message=str(exc))
        else:
            self.cells.add(reply.cell)
            result = DispatchResult(reply.status, reply.job_id, reply.node, reply.code)
            if self.observer is not None:
                self.observer.observe("dispatch", time.perf_counter() - started)
        return proto.dispatched(req, result, monotonic_ms())

    async def _room(self, call: RoomCall) -> list[Action]:
        try:
            reply = await self.store.room(call.op, call.code, self.proto.session_id, call.arg5, call.arg6)
        except DragomanError as exc:
            log.warning("room call failed", op=call.op, session=self.proto.session_id, error=str(exc))
            answer = RoomAnswer("unreachable")
        else:
            answer = RoomAnswer(reply.status, reply.code, reply.room_id, tuple(reply.members))
        return self.proto.room_answered(call, answer, monotonic_ms())

    async def _best_effort(self, what: str, call: Any) -> None:
        try:
            await call
        except DragomanError as exc:  # what it was for is bounded by the job's own deadlines
            log.warning("session store call failed", call=what, session=self.proto.session_id, error=str(exc))

    def _background(self, call: Any) -> None:
        task = asyncio.get_running_loop().create_task(call)
        _BACKGROUND.add(task)  # (the loop keeps only a weak reference to a task)
        task.add_done_callback(_BACKGROUND.discard)

    def _close_later(self, *, detach: bool) -> None:
        """Detach or end the session's records, retrying (in the background) until Redis takes it:
        a session left "live" in Redis would never be given up on while this process lives."""
        self._background(self._close(detach))

    async def _close(self, detach: bool) -> None:
        pause = 0.5
        while True:
            try:
                await self.store.close_session(self.session_id, self.proto.epoch, detach=detach,
                                               grace_ms=self.grace_ms, cells=self.cells)
                return
            except DragomanError as exc:
                log.warning("closing the session's records failed; retrying", session=self.session_id,
                            error=str(exc), retry_in_s=round(pause, 1))
                await asyncio.sleep(pause * (0.5 + random.random()))
                pause = min(30.0, pause * 2)

    def describe(self) -> dict[str, Any]:
        return self.proto.describe()


async def wait_finished(actor: SessionActor, timeout: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(actor.finished.wait(), timeout)
