"""One scheduler process's share of the world: the sockets it holds, and the loops that keep
the cells moving.

The hub holds no scheduler state of its own (that is all in Redis). It knows which node and session
sockets are attached to this process, delivers effects to them (directly for effects a script
returned to us, or read from this process's inbox streams for effects other processes' scripts
addressed to us), and runs the upkeep loops every process runs: reaper, inbox readers, and the
renewal of this process's registration.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog

from dragoman.config import Settings
from dragoman.errors import DependencyDown
from dragoman.store.api import Effect, Store
from dragoman.wire import JobCancel, encode

if TYPE_CHECKING:
    from dragoman.app.links import Link
    from dragoman.app.metrics import Metrics
    from dragoman.sessions.actor import SessionActor

log = structlog.get_logger(__name__)


def assign_frame(job_data: str, job_id: str, attempt: int) -> str:
    """The stored job_assign body lacks job_id and attempt_id (the job id names the cell the job
    landed in; the attempt changes on reassignment): splice them in without re-encoding the audio."""
    return f'{{"job_id":"{job_id}","attempt_id":{attempt},{job_data[1:]}'


class NodeSocket:
    """A node socket held here. Frames for it wait in ``held`` until its node_register_ack is sent:
    a job may be assigned to it (by any process) while the register script is still answering."""

    __slots__ = ("node_id", "conn", "link", "held")

    def __init__(self, node_id: str, conn: str, link: Link) -> None:
        self.node_id, self.conn, self.link = node_id, conn, link
        self.held: list[str] | None = []

    def send(self, text: str) -> None:
        if self.held is not None:
            self.held.append(text)
        else:
            self.link.send(text)

    def open(self) -> None:
        """The ack went out: send what waited, then send directly."""
        held, self.held = self.held or [], None
        for text in held:
            self.link.send(text)


class Hub:
    def __init__(self, store: Store, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.nodes: dict[str, NodeSocket] = {}
        self.sessions: dict[str, SessionActor] = {}
        self.sessions_per_key: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.redis_ok = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.store.load_scripts()
        await self.store.touch_proc()
        self.redis_ok = True
        self._tasks = [
            asyncio.create_task(self._loop("reaper", self._reap_once, self.settings.reaper_interval_ms / 1000)),
            asyncio.create_task(self._loop("proc", self._touch_once, self.settings.proc_ttl_ms / 3000)),
        ]
        for cell in self.store.cell_names:
            self._tasks.append(asyncio.create_task(self._loop(f"inbox:{cell}", self._inbox_reader(cell), 0),
                                                   name=f"inbox:{cell}"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    async def _loop(self, name: str, once: Callable[[], Awaitable[float | None]], every: float) -> None:
        """Run ``once`` forever; on failure log it and back off (capped, jittered), never spin."""
        failures = 0
        while True:
            try:
                pause = await once()
                failures = 0
                self.redis_ok = True
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                self.redis_ok = not isinstance(exc, DependencyDown)
                pause = min(10.0, 0.2 * 2 ** min(failures, 6)) * (0.5 + random.random())
                log.warning("upkeep failed", loop=name, error=str(exc), retry_in_s=round(pause, 2))
            await asyncio.sleep(every if pause is None else pause)

    async def _reap_once(self) -> float | None:
        more = False
        for cell in self.store.cell_names:  # deliver each cell's committed effects before the next call
            reply = await self.store.reap_cell(cell)
            self.metrics.reaped_reply(reply)
            await self.deliver(reply.effects)
            more = more or reply.more
        return 0.0 if more else None

    async def _touch_once(self) -> float | None:
        await self.store.touch_proc()
        return None

    def _inbox_reader(self, cell: str) -> Callable[[], Awaitable[float | None]]:
        # From the start of the stream, not "$": this process's id is new, so its stream holds only
        # entries for it, and "$" would skip whatever arrives between two blocking reads.
        last_id = "0-0"

        async def read_once() -> float | None:
            nonlocal last_id
            for entry_id, effect in await self.store.read_inbox(cell, last_id, block_ms=1000):
                last_id = entry_id
                await self.deliver([effect])
            return 0.0  # the read itself blocked: go straight back to it

        return read_once

    # ------------------------------------------------------------------ delivery
    async def deliver(self, effects: list[Effect], payloads: dict[str, str] | None = None) -> None:
        """Carry out effects for sockets this process holds. An effect for a socket that has gone
        is dropped: the lease rules recover the job, or the session is gone with nobody to tell.
        One effect failing (Redis gone while fetching job data) does not stop the others."""
        for effect in effects:
            try:
                await self._deliver_one(effect, payloads)
            except Exception:
                log.exception("effect not delivered", effect=effect.kind, job=effect.job)

    async def _deliver_one(self, effect: Effect, payloads: dict[str, str] | None) -> None:
        if effect.kind == "assign":
            await self._send_assign(effect, payloads)
        elif effect.kind == "cancel":
            node = self.nodes.get(effect.node)
            if node is not None:
                node.send(encode(JobCancel(job_id=effect.job, reason=effect.reason or None)))
        elif effect.kind == "outcome":
            self.metrics.outcome(effect)
            actor = self.sessions.get(effect.session)
            if actor is not None:
                payload = effect.payload if effect.payload is not None else (payloads or {}).get(effect.job)
                actor.post_outcome(effect, payload)
        else:
            log.warning("unknown effect", effect=effect.kind)

    async def _send_assign(self, effect: Effect, payloads: dict[str, str] | None) -> None:
        node = self.nodes.get(effect.node)
        if node is None:
            return
        data = effect.payload or (payloads or {}).get(effect.job) or await self.store.job_data(effect.job)
        if data is None:
            log.warning("job data expired before delivery", job=effect.job)
            return
        if effect.attempt > 1:
            self.metrics.reassignments.inc()
        node.send(assign_frame(data, effect.job, effect.attempt))

    # ------------------------------------------------------------------ views
    def session_rows(self) -> list[dict[str, Any]]:
        return [actor.describe() for actor in self.sessions.values()]
