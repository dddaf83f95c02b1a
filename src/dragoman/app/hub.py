"""One scheduler process's share of the world: the sockets it holds, and the loops that keep the
cells moving.

The hub holds no scheduler state of its own (that is all in Redis). It owns the registries of the
node and session sockets attached to this process, and it is the one place where effects are
carried out (``deliver``, wired into the Store as its sink: every transition's local effects, and
the effects other processes' scripts put in this process's inbox streams). It runs the upkeep every
process runs: the reaper, the inbox readers, this process's registration, the counters, and the
watch on Redis's data generation: when Redis has lost its data (a restart without persistence, a
failover that lost writes) the hub registers its nodes again and has its sessions check every job
they are owed, within a reaper interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from dragoman.config import Settings
from dragoman.errors import DependencyDown
from dragoman.sessions.actor import SessionActor
from dragoman.sessions.protocol import SessionProtocol
from dragoman.store.api import Store
from dragoman.store.replies import Effect, EffectKind
from dragoman.types import Transport
from dragoman.wire import JobCancel, assign_frame, encode

if TYPE_CHECKING:
    from dragoman.app.metrics import Metrics
    from dragoman.app.sockets import Link

log = structlog.get_logger(__name__)
_SENT_MEMORY = 4096


class NodeConnectionLike(Protocol):
    async def reregister(self) -> None: ...


class NodeLink:
    """A node socket held here. Frames for it wait in ``held`` until its node_register_ack is sent:
    a job may be assigned to it (by any process) while the register script is still answering.
    ``sent`` remembers the (job, attempt) pairs sent, so an assignment repeated (a retry after a
    lost reply, a re-registration) reaches the node once."""

    __slots__ = ("node_id", "conn", "link", "held", "sent", "connection")

    def __init__(self, node_id: str, conn: str, link: Link, connection: NodeConnectionLike | None = None) -> None:
        self.node_id, self.conn, self.link, self.connection = node_id, conn, link, connection
        self.held: list[str] | None = []
        self.sent: OrderedDict[str, int] = OrderedDict()

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

    def assign(self, job_id: str, attempt: int, body: str) -> None:
        if self.sent.get(job_id) == attempt:
            return
        self.sent[job_id] = attempt
        self.sent.move_to_end(job_id)
        while len(self.sent) > _SENT_MEMORY:
            self.sent.popitem(last=False)
        self.link.watch(True)  # it holds a job: if it hangs, the job must move on within seconds
        self.send(assign_frame(body, job_id, attempt))

    def forget(self, job_id: str) -> None:
        self.sent.pop(job_id, None)
        if not self.sent:
            self.link.watch(False)


class Hub:
    def __init__(self, store: Store, settings: Settings, metrics: Metrics) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.nodes: dict[str, NodeLink] = {}
        self.sessions: dict[str, SessionActor] = {}
        self.sessions_per_key: dict[str, int] = {}
        self.boots: dict[str, str] = {}
        self.primary = ""  # the Redis server written to; a change is a failover
        self.redis_ok = False
        self._tasks: list[asyncio.Task[None]] = []
        self._recovering: asyncio.Task[None] | None = None
        self._last_reap: float | None = None  # loop time of the last reap that reached Redis
        self._lenient_until = 0.0
        store.sink = self.deliver

    # ------------------------------------------------------------------ registries
    def attach_node(self, link: NodeLink) -> NodeLink | None:
        previous = self.nodes.get(link.node_id)
        self.nodes[link.node_id] = link
        return previous

    def detach_node(self, node_id: str, conn: str, restore: NodeLink | None = None) -> None:
        """Forget the node's socket if it is still this connection's (put ``restore`` back)."""
        current = self.nodes.get(node_id)
        if current is not None and current.conn == conn:
            if restore is not None:
                self.nodes[node_id] = restore
            else:
                del self.nodes[node_id]

    def new_session(self, proto: SessionProtocol, transport: Transport, api_key: str = "",
                    cells: set[str] | None = None) -> SessionActor:
        actor = SessionActor(proto, self.store, transport, observer=self.metrics,
                             grace_ms=self.settings.session_grace_ms, cells=cells, api_key=api_key)
        self.sessions[proto.session_id] = actor
        self.sessions_per_key[api_key] = self.sessions_per_key.get(api_key, 0) + 1
        return actor

    def session_limit_reached(self, api_key: str) -> bool:
        """``max_sessions_per_key`` open sessions on this process under this API key. Only when API
        keys are configured: without them every session is anonymous and none is capped this way."""
        return bool(self.settings.api_keys) and \
            self.sessions_per_key.get(api_key, 0) >= self.settings.max_sessions_per_key

    def end_session(self, actor: SessionActor) -> None:
        if self.sessions.get(actor.session_id) is actor:
            del self.sessions[actor.session_id]
        self.sessions_per_key[actor.api_key] = max(0, self.sessions_per_key.get(actor.api_key, 1) - 1)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self.store.load_scripts()
        self.boots = {cell: reply.boot for cell, reply in (await self.store.touch_proc()).items()}
        self.primary = await self.store.primary()
        self.redis_ok = True
        s = self.settings
        self._tasks = [
            asyncio.create_task(self._loop("reaper", self._reap_once, s.reaper_interval_ms / 1000)),
            asyncio.create_task(self._loop("proc", self._touch_once, s.proc_ttl_ms / 3000)),
            asyncio.create_task(self._loop("stats", self._flush_stats, s.stats_flush_ms / 1000)),
        ]
        for cell in self.store.cell_names:
            self._tasks.append(asyncio.create_task(self._loop(f"inbox:{cell}", self._inbox_reader(cell), 0),
                                                   name=f"inbox:{cell}"))

    async def stop(self) -> None:
        for task in [*self._tasks, self._recovering]:
            if task is not None:
                task.cancel()
        for task in [*self._tasks, self._recovering]:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._tasks.clear()
        with contextlib.suppress(Exception):
            await self.store.flush_stats()

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
                pause = min(2.0, 0.1 * 2 ** min(failures, 5)) * (0.5 + random.random())
                log.warning("upkeep failed", loop=name, error=str(exc), retry_in_s=round(pause, 2))
            await asyncio.sleep(every if pause is None else pause)

    async def _reap_once(self) -> float | None:
        """One reaper pass. After a while without reaching Redis (a stall, a restart), nobody could
        renew a node's or a process's registration: for one renewal period the reaper does not
        take lapsed ones as dead (they renew now; the really dead lapse again right after)."""
        loop = asyncio.get_running_loop()
        s = self.settings
        now = loop.time()
        if self._last_reap is not None and now - self._last_reap > max(3 * s.reaper_interval_ms, 2_000) / 1000:
            self._lenient_until = now + max(s.proc_ttl_ms, s.heartbeat_interval_ms) / 1000
            log.warning("Redis was out of reach; dead nodes and processes are not reaped for a renewal period",
                        out_for_s=round(now - self._last_reap, 1))
        lenient = now < self._lenient_until
        more = False
        for cell in self.store.cell_names:  # each cell's effects are delivered before the next call
            reply = await self.store.reap_cell(cell, lenient=lenient)
            self.metrics.reaped_reply(reply)
            self._watch_boot(cell, reply.boot)
            more = more or reply.more
        self._last_reap = loop.time()
        return 0.0 if more else None

    async def _touch_once(self) -> float | None:
        for cell, reply in (await self.store.touch_proc()).items():
            if reply.revived:
                self._lost("this process was declared dead (Redis stalled past its registration)", cell)
            self._watch_boot(cell, reply.boot)
        primary = await self.store.primary()
        if self.primary and primary != self.primary:
            log.warning("Redis primary changed (failover)", was=self.primary, now=primary)
            self.metrics.failovers.inc()
            # replication is asynchronous: the new primary may lack the old one's last writes
            self._lost("the Redis primary changed (a failover may have lost the last writes)", "*")
        self.primary = primary
        return None

    async def _flush_stats(self) -> float | None:
        await self.store.flush_stats()
        return None

    def _inbox_reader(self, cell: str) -> Callable[[], Awaitable[float | None]]:
        # From the start of the stream, not "$": this process's id is new, so its stream holds only
        # entries for it, and "$" would skip whatever arrives between two blocking reads.
        last_id = "0-0"

        async def read_once() -> float | None:
            nonlocal last_id
            entries = await self.store.read_inbox(cell, last_id, block_ms=1000)
            if entries:
                self.deliver([effect for _, effect in entries if effect.kind])
                last_id = entries[-1][0]
                await self.store.trim_inbox(cell, [entry_id for entry_id, _ in entries])
            return 0.0  # the read itself blocked: go straight back to it

        return read_once

    # ------------------------------------------------------------------ Redis lost its data
    def _watch_boot(self, cell: str, boot: str) -> None:
        known = self.boots.get(cell)
        if boot == known:
            return
        self.boots[cell] = boot
        if known is not None:
            self._lost("Redis lost its data", cell)

    def _lost(self, why: str, cell: str) -> None:
        """What Redis knew of this process's nodes and sessions is gone: give it back."""
        if self._recovering is None or self._recovering.done():
            log.warning(f"{why}: registering this process's nodes and sessions again", cell=cell)
            self._recovering = asyncio.create_task(self._recover(), name="recover")

    async def _recover(self) -> None:
        self.metrics.redis_resets.inc()
        for cell, reply in (await self.store.touch_proc()).items():
            self.boots[cell] = reply.boot
        for link in list(self.nodes.values()):
            if link.connection is not None:
                try:
                    await link.connection.reregister()
                except Exception as exc:  # its heartbeat registers it later
                    log.warning("could not register a node again", node=link.node_id, error=str(exc))
        for actor in list(self.sessions.values()):
            actor.post_reset()

    # ------------------------------------------------------------------ delivery
    def deliver(self, effects: list[Effect]) -> None:
        """Carry out effects for sockets this process holds. An effect for a socket that has gone is
        dropped: the job's lease recovers an assignment, and an outcome waits in Redis for the
        session (a resume, or its own check). One effect failing does not stop the others."""
        for effect in effects:
            try:
                self._deliver_one(effect)
            except Exception:
                log.exception("effect not delivered", effect=effect.kind, job=effect.job)

    def _deliver_one(self, effect: Effect) -> None:
        kind = effect.kind
        if kind == EffectKind.ASSIGN:
            node = self.nodes.get(effect.node)
            if node is not None and effect.payload is not None:
                if effect.attempt > 1:
                    self.metrics.reassignments.inc()
                node.assign(effect.job, effect.attempt, effect.payload)
        elif kind == EffectKind.CANCEL:
            node = self.nodes.get(effect.node)
            if node is not None:
                node.forget(effect.job)
                node.send(encode(JobCancel(job_id=effect.job, reason=effect.reason or None)))
        elif kind == EffectKind.OUTCOME:
            actor = self.sessions.get(effect.session)
            if actor is not None:
                actor.post_outcome(effect)
        elif kind == EffectKind.PARTIAL:
            actor = self.sessions.get(effect.session)
            if actor is not None and effect.payload is not None:
                actor.post_partial(effect.payload)
        elif kind == EffectKind.SUPERSEDED:
            actor = self.sessions.get(effect.session)
            if actor is not None:
                actor.post_superseded()
        elif kind == EffectKind.EXPECT:
            actor = self.sessions.get(effect.session)
            if actor is not None:
                actor.post_expect(effect)
        elif kind == EffectKind.ROOM:
            actor = self.sessions.get(effect.session)
            if actor is not None:
                actor.post_room(effect)
        else:
            log.warning("unknown effect", effect=kind)

    # ------------------------------------------------------------------ views
    def session_rows(self) -> list[dict[str, Any]]:
        return [actor.describe() for actor in self.sessions.values()]
