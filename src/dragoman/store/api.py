"""The async Store: the only way the rest of Dragoman touches scheduler state.

One method per transition script (each one atomic call) plus read-only views for operators and
tests. Every transition's local effects (what the caller must deliver over sockets it holds; effects
for sockets held elsewhere were already appended to those processes' inboxes by the script) are
handed to the ``sink`` the owner wired in, in this one place, so no caller can forget them; they are
also on the reply, for callers without a sink (tests, benchmarks).

Failure rules:
- Redis unreachable, timing out, loading or read-only (a failover in progress): the call is retried
  with capped, jittered backoff for up to ``redis_retry_ms``, then raises ``DependencyDown``. Every
  script is retry-safe (I8), and a retry after a lost reply gets the effects it would have lost
  (dispatch/complete re-emit them, the others replay their kept reply under the same call id).
- An argument a script refuses raises ``ScriptError`` and changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import BusyLoadingError, ReadOnlyError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dragoman.config import Settings
from dragoman.errors import ConfigError, DependencyDown, ScriptError
from dragoman.ids import new_id
from dragoman.store.batch import Batcher, Done, settle
from dragoman.store.connect import PRIMARY_CHECK_INTERVAL, current_primary, make_client, parse_redis_url
from dragoman.store.keys import (
    CellKeys,
    cell_of_job,
    cell_of_node,
    check_name,
    check_pool,
    home_cell,
    job_id_for,
    room_cell,
)
from dragoman.store.pipeline import AutoPipeline
from dragoman.store.replies import (
    AckReply,
    CancelReply,
    CloseReply,
    CompleteReply,
    DispatchReply,
    DrainReply,
    Effect,
    HeartbeatReply,
    HeartbeatsReply,
    JobsReply,
    JobStatus,
    OfflineReply,
    ReapReply,
    RegisterReply,
    RelayReply,
    Reply,
    RoomReply,
    SessionReply,
    StartReply,
    Status,
    TouchReply,
)
from dragoman.store.scripts import Scripts, function_missing
from dragoman.wire.codes import ErrorCode

log = structlog.get_logger(__name__)
R = TypeVar("R", bound=Reply)
T = TypeVar("T")
Sink = Callable[[list[Effect]], None]  # carries effects out without waiting on anything

# Errors after which a call may be repeated: the server could not be reached or could not take
# writes for a moment (restart, loading, a failover's demoted primary). Any other error is final.
RETRYABLE = (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError, OSError)
# A heartbeat may wait this long for others of its cell to share one script call (store/batch.py):
# nothing waits on its reply promptly (the node's liveness deadline is 45 s away), and thousands of
# nodes send one each every 15 s. Each batch costs the process a fixed part (a write, a read, a
# reply to decode, a timer, a task) that runs cold on a machine where little else happens; 100 ms
# rather than 20 ms cut the CPU per heartbeat by ~10% (bench.idle). The batch's size is bounded
# for Redis's sake: one script call of BATCH_MAX heartbeats holds it for several milliseconds.
HEARTBEAT_LINGER_S = 0.1
HEARTBEAT_BATCH_MAX = 100
NODE_KEYS_CACHED = 65_536  # node ids checked and placed in their cell, kept for their heartbeats
# A session's ack (outcomes delivered: the jobs may be forgotten) joins those of the process's other
# sessions for up to ACK_LINGER_S: nothing waits on it, and under a light load every session would
# otherwise cost a script call of its own for a job or two (see ack_outcomes-1.lua).
ACK_LINGER_S = 0.05
ACK_BATCH_MAX = 64  # sessions per call (each acks at most ack_batch jobs at a time)
# Lenient: the scripts send the integers of hot replies as JSON strings (cjson's number formatting
# costs the server about as much as a small command; see includes/context.lua).
_effect_decoder = msgspec.json.Decoder(Effect, strict=False)
_effects_decoder = msgspec.json.Decoder(list[Effect], strict=False)
_decoders: dict[type, msgspec.json.Decoder[Any]] = {}


def _decoder(kind: type[R]) -> msgspec.json.Decoder[R]:
    if kind not in _decoders:
        _decoders[kind] = msgspec.json.Decoder(kind, strict=False)
    return _decoders[kind]


@dataclasses.dataclass(slots=True)  # (not frozen: made per job, and a frozen one's __init__ costs 5x)
class JobSpec:
    """What a session asks for: one job for one utterance and one target language."""

    pool: str
    session_id: str
    utterance_index: int
    tgt_lang: str
    body: str  # the encoded JobAssignBody (job_assign without its ids), kept for reassignment
    unique: str = dataclasses.field(default_factory=new_id)
    avoid: tuple[str, ...] = ()
    session_proc: str | None = None
    epoch: int = 1
    commit: tuple[int, int, int, int] | None = None  # the session's resume point once this is dispatched
    listeners: tuple[str, ...] = ()  # a room job: "session@process" of each member it is for


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# A job's write-once fields, packed in its "spec" field in this order (see includes/jobs.lua).
JOB_SPEC_FIELDS = ("pool", "session", "utt", "tgt", "max_attempts", "job_timeout", "pending_timeout", "queue_max",
                   "created")


def job_view(job_id: str, fields: dict[Any, Any]) -> dict[str, str]:
    """A job's hash as operators read it: its spec spread into named fields, its id, no audio."""
    job = {_text(k): _text(v) for k, v in fields.items()}
    job.pop("data", None)
    job |= dict(zip(JOB_SPEC_FIELDS, job.pop("spec", "").split(), strict=False))
    if job.get("lease") and job.get("job_timeout"):  # (not written: its lease less its job_timeout)
        job["assigned_at"] = str(int(job["lease"]) - int(job["job_timeout"]))
    if job.get("node") and not job.get("tried"):  # (not written while it is its first node)
        job["tried"] = job["node"]
    return {"id": job_id} | job


def _tell(task: asyncio.Task[Any], done: Done) -> None:
    """``done`` hears how ``task`` ended."""
    if task.cancelled():
        done(None, asyncio.CancelledError())
    elif task.exception() is not None:
        done(None, task.exception())
    else:
        done(task.result(), None)


class Store:
    def __init__(self, client: Any, settings: Settings, proc: str | None = None, *,
                 test_clock: bool = False) -> None:
        self.client = client
        self.settings = settings
        self.proc = proc or uuid.uuid4().hex[:12]
        self.cells = {c: CellKeys(settings.key_prefix, c) for c in settings.cells}
        self.cell_names = tuple(settings.cells)
        # Each session tries its home cell first, then the others in order: one rotation per home cell.
        names, n = self.cell_names, len(self.cell_names)
        self._cell_orders = {names[h]: tuple(self.cells[names[(h + i) % n]] for i in range(n)) for h in range(n)}
        self.pipeline = (AutoPipeline(client.connection_pool, replicas=settings.redis_min_replicas_ack,
                                      replica_wait_ms=settings.redis_replica_wait_ms, recheck_s=PRIMARY_CHECK_INTERVAL)
                         if settings.redis_auto_pipeline and not isinstance(client, RedisCluster) else None)
        self.scripts = Scripts(client, defines={"test_clock": test_clock, "inbox_max_len": settings.inbox_max_len},
                               pipeline=self.pipeline, replicas=settings.redis_min_replicas_ack,
                               replica_wait_ms=settings.redis_replica_wait_ms)
        self.sink: Sink | None = None
        self.target = "redis"
        self.undecodable_effects = 0
        self.counts: Counter[str] = Counter()  # frequent counters, added to Redis by flush_stats
        self._node_keys: dict[str, CellKeys] = {}  # (see heartbeat_then)
        self.heartbeats: Batcher[tuple[CellKeys, int]] = Batcher(self._heartbeat_batch, linger=HEARTBEAT_LINGER_S,
                                                                max_items=HEARTBEAT_BATCH_MAX)
        self.acks: Batcher[CellKeys] = Batcher(self._ack_batch, linger=ACK_LINGER_S, max_items=ACK_BATCH_MAX)

    @classmethod
    def from_url(cls, url: str, settings: Settings, proc: str | None = None, cluster: bool = False,
                 test_clock: bool = False) -> Store:
        """A Store on ``redis://`` (one server), ``redis+sentinel://`` (the primary the Sentinels name,
        followed through failovers) or a cluster (``redis+cluster://``, or ``cluster=True``); see
        ``store/connect.py``. Socket timeouts sit above the inbox's 1 s blocking read: a stalled
        Redis becomes a retried call, then DependencyDown, never a hang."""
        client, described = make_client(url, cluster=cluster)
        if settings.redis_min_replicas_ack and parse_redis_url(url, cluster=cluster).kind == "cluster":
            raise ConfigError("redis_min_replicas_ack is for one server or a Sentinel set, not a Cluster")
        store = cls(client, settings, proc, test_clock=test_clock)
        store.target = described
        return store

    async def aclose(self) -> None:
        await self.heartbeats.aclose()
        await self.acks.aclose()
        if self.pipeline is not None:
            await self.pipeline.aclose()
        await self.client.aclose()

    # ---------------------------------------------------------------- plumbing
    def keys_for_node(self, node_id: str) -> CellKeys:
        return self.cells[cell_of_node(node_id, self.cell_names)]

    def keys_for_job(self, job_id: str) -> CellKeys | None:
        cell = cell_of_job(job_id, self.cell_names)
        return self.cells[cell] if cell else None

    def keys_for_session(self, session_id: str) -> CellKeys:
        return self.cells[home_cell(session_id, self.cell_names)]

    async def retrying(self, what: str, attempt: Callable[[], Awaitable[Any]],
                       failed: BaseException | None = None) -> Any:
        """Run ``attempt`` until it succeeds, retrying Redis outages for up to ``redis_retry_ms``
        (``failed``: the error of an attempt the caller already made, which counts as the first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.redis_retry_ms / 1000
        pause = 0.05
        while True:
            try:
                if failed is not None:
                    exc, failed = failed, None
                    raise exc
                return await attempt()
            except RETRYABLE as exc:
                if loop.time() + pause > deadline:
                    raise DependencyDown(f"Redis unreachable during {what}: {exc}") from exc
                log.info("redis call failed, retrying", call=what, error=str(exc), retry_in_s=round(pause, 2))
                await asyncio.sleep(pause * (0.5 + random.random()))
                pause = min(1.0, pause * 2)

    async def _call(self, name: str, ck: CellKeys, keys: list[str], args: list[Any], kind: type[R],
                    own_payload: str | None = None, own_result: Any = None) -> R:
        try:
            try:  # (the first attempt without the retry loop's frame and closure: it is nearly always the last)
                raw = await self.scripts.call(name, keys, args)
            except RETRYABLE as exc:
                raw = await self.retrying(name, lambda: self.scripts.call(name, keys, args), exc)
        except ResponseError as exc:
            raise ScriptError(f"{name}: {exc}") from exc
        return self._decoded(name, ck, raw, kind, own_payload, own_result)

    def _decoded(self, name: str, ck: CellKeys, raw: Any, kind: type[R], own_payload: str | None,
                 own_result: Any) -> R:
        """A script's reply: its body decoded, its effects with their payloads handed to the sink."""
        payloads = [_text(p) for p in raw[2:]]
        reply = _decoder(kind).decode(raw[0])
        reply.cell = ck.cell
        reply.effects = self._effects(name, raw[1], payloads, ck.cell, own_payload, own_result)
        jobs = getattr(reply, "jobs", None)
        if isinstance(jobs, list):
            for status in jobs:
                if status.p > 0:
                    status.result = payloads[status.p - 1]
        if reply.effects and self.sink is not None:
            self.sink(reply.effects)
        return reply

    def _effects(self, name: str, raw: bytes, payloads: list[str], cell: str, own_payload: str | None,
                 own_result: Any) -> list[Effect]:
        try:  # (all at once; one at a time only when one of them is bad)
            effects = _effects_decoder.decode(raw)
        except msgspec.DecodeError:
            effects = self._each_effect(name, raw)
        for effect in effects:
            effect.cell = cell
            if effect.p > 0:
                effect.payload = payloads[effect.p - 1]
            elif effect.p == -1:
                effect.payload, effect.result = own_payload, own_result
        return effects

    def _each_effect(self, name: str, raw: bytes) -> list[Effect]:
        out: list[Effect] = []
        for item in msgspec.json.decode(raw, type=list[msgspec.Raw]):
            try:
                out.append(_effect_decoder.decode(item))
            except msgspec.DecodeError as exc:  # one bad effect never takes the others with it
                self.undecodable_effects += 1
                log.error("undecodable effect", script=name, effect=bytes(item)[:200], error=str(exc))
        return out

    @staticmethod
    def call_id() -> str:
        return new_id()

    async def primary(self) -> str:
        """The server this Store writes to ("host:port"; for a cluster, its primaries)."""
        try:
            return await current_primary(self.client)
        except (*RETRYABLE, ResponseError) as exc:
            raise DependencyDown(f"Redis unreachable: {exc}") from exc

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (*RETRYABLE, ResponseError):
            return False

    async def load_scripts(self) -> None:
        try:
            await self.scripts.load_all(self.client)
        except RETRYABLE as exc:
            raise DependencyDown(f"Redis unreachable: {exc}") from exc

    # ---------------------------------------------------------------- node plane
    def check_pools(self, pools: Sequence[str]) -> str:
        for pool in pools:
            check_pool(pool)
        if len(set(pools)) > self.settings.max_pools_per_node:
            raise ValueError(f"{len(set(pools))} pools (language pairs) is more than the "
                             f"{self.settings.max_pools_per_node} allowed per node")
        return " ".join(sorted(set(pools)))

    async def register_node(self, node_id: str, *, conn: str, max_concurrency: int, pools: Sequence[str],
                            info: dict[str, Any] | None = None, node_ttl_ms: int | None = None,
                            owner: str = "", force: bool = False) -> RegisterReply:
        check_name("node_id", node_id)
        pool_arg = self.check_pools(pools)
        ck = self.keys_for_node(node_id)
        return await self._call("register_node", ck, [ck.nodes, ck.node(node_id)], [
            self.proc, node_id, conn, max_concurrency, pool_arg, json.dumps(info or {}),
            node_ttl_ms or self.settings.node_ttl_ms, owner, "force" if force else "", self.call_id()],
            RegisterReply)

    async def heartbeat(self, node_id: str, *, conn: str = "", draining: bool | None = None,
                        pools: Sequence[str] | None = None, usage: dict[str, Any] | str | None = None,
                        node_ttl_ms: int | None = None) -> HeartbeatReply:
        """``usage``: the node's resource usage, kept for operators (a dict, or its JSON already)."""
        return await self.heartbeat_soon(node_id, conn=conn, draining=draining, pools=pools, usage=usage,
                                         node_ttl_ms=node_ttl_ms)

    def heartbeat_soon(self, node_id: str, *, conn: str = "", draining: bool | None = None,
                       pools: Sequence[str] | None = None, usage: dict[str, Any] | str | None = None,
                       node_ttl_ms: int | None = None) -> asyncio.Future[HeartbeatReply]:
        """``heartbeat`` for a caller that goes on meanwhile: the reply's future. The heartbeat
        joins the others of its cell for up to HEARTBEAT_LINGER_S (one script call for them all).
        Its arguments are checked now (ValueError), as at registration."""
        fut: asyncio.Future[HeartbeatReply] = asyncio.get_running_loop().create_future()
        self.heartbeat_then(node_id, settle(fut), conn=conn, draining=draining, pools=pools, usage=usage,
                            node_ttl_ms=node_ttl_ms)
        return fut

    def heartbeat_then(self, node_id: str, done: Done, *, conn: str = "", draining: bool | None = None,
                       pools: Sequence[str] | None = None, usage: dict[str, Any] | str | None = None,
                       node_ttl_ms: int | None = None) -> None:
        """``heartbeat_soon`` with a callback, ``done(reply, None)`` or ``done(None, exc)``: what a
        node's socket uses (no future and no loop iteration of its own per heartbeat)."""
        ck = self._node_keys.get(node_id)
        if ck is None:
            ck = self.keys_for_node(check_name("node_id", node_id))
            if len(self._node_keys) >= NODE_KEYS_CACHED:
                self._node_keys.clear()
            self._node_keys[node_id] = ck
        pools_arg = "" if pools is None else self.check_pools(pools)
        drain_arg = "" if draining is None else ("1" if draining else "0")
        item = (node_id, conn, drain_arg, "" if pools is None else "1", pools_arg,
                usage if isinstance(usage, str) else json.dumps(usage or {}))
        self.heartbeats.submit_then((ck, node_ttl_ms or self.settings.node_ttl_ms), item, done)

    async def _heartbeat_batch(self, key: tuple[CellKeys, int], items: list[tuple[str, ...]]) -> list[HeartbeatReply]:
        """One ``heartbeat`` script call for the heartbeats of one cell (and TTL) collected by
        ``self.heartbeats``: each caller gets its own node's reply."""
        ck, ttl = key
        reply = await self._call("heartbeat", ck, [ck.nodes], [self.proc, ttl, self.call_id(),
                                                                *(arg for item in items for arg in item)],
                                 HeartbeatsReply)
        for item, node in zip(items, reply.nodes, strict=True):  # (a node's effects: what it was given)
            node.now, node.cell = reply.now, reply.cell
            node.effects = [e for e in reply.effects if e.node == item[0]]
        return reply.nodes

    async def drain(self, node_id: str, on: bool = True, source: str = "operator") -> DrainReply:
        ck = self.keys_for_node(check_name("node_id", node_id))
        return await self._call("drain_node", ck, [ck.nodes, ck.node(node_id)],
                                [self.proc, node_id, "1" if on else "0", source, self.call_id()], DrainReply)

    async def node_offline(self, node_id: str, conn: str = "", reason: str = "socket_closed") -> OfflineReply:
        ck = self.keys_for_node(check_name("node_id", node_id))
        return await self._call("node_offline", ck, [ck.nodes, ck.node(node_id)],
                                [self.proc, node_id, conn, reason, self.call_id()], OfflineReply)

    # ---------------------------------------------------------------- jobs
    def _cells_to_try(self, session_id: str) -> tuple[CellKeys, ...]:
        return self._cell_orders[home_cell(session_id, self.cell_names)]

    async def dispatch(self, spec: JobSpec) -> DispatchReply:
        """Place a job. With several cells, each cell serving the pool is tried for a free slot
        before the last one queues or fails the job."""
        check_pool(spec.pool)
        check_name("session_id", spec.session_id)
        s = self.settings
        cells: Sequence[CellKeys] = self._cells_to_try(spec.session_id)
        home = cells[0]
        if len(cells) > 1:  # a hint only: each script decides for itself
            serving = [ck for ck in cells
                       if await self.retrying("zcard", lambda ck=ck: self.client.zcard(ck.pool(spec.pool))) > 0]
            cells = serving or cells[:1]
        commit = " ".join(map(str, spec.commit)) if spec.commit else ""
        reply: DispatchReply | None = None
        for i, ck in enumerate(cells):
            job_id = job_id_for(ck.cell, spec.unique)
            mode = "" if i == len(cells) - 1 else "place_only"
            reply = await self._call(
                "dispatch_task", ck, [ck.nodes, ck.job(job_id), ck.pool(spec.pool), ck.sess(spec.session_id)], [
                    self.proc, job_id, spec.pool, spec.session_id, spec.utterance_index, spec.tgt_lang,
                    s.job_timeout_ms, s.pending_timeout_ms, s.queue_max, s.max_attempts, " ".join(spec.avoid),
                    spec.session_proc or self.proc, spec.epoch, spec.body, mode, commit if ck is home else "",
                    s.warmup_ms, " ".join(spec.listeners)], DispatchReply, own_payload=spec.body)
            reply.job_id = job_id
            if reply.status != Status.NO_CAPACITY:
                if reply.status not in (Status.EXISTS, Status.SUPERSEDED):
                    self.counts["dispatched"] += 1
                if commit and ck is not home and reply.status != Status.SUPERSEDED:
                    await self.commit_session(spec.session_id, spec.epoch, spec.commit)  # type: ignore[arg-type]
                return reply
        assert reply is not None
        return reply

    async def complete(self, job_id: str, node_id: str, attempt: int, outcome: str, code: str = "",
                       payload: str = "", result: Any = None) -> CompleteReply:
        """A node's result. ``outcome``: completed, completed_empty, failed, or refused (the node
        could not take the job: it moves on). ``result`` is the decoded payload, handed to a local
        session with the outcome so it is never decoded twice."""
        ck = self.keys_for_job(job_id)
        if ck is None:
            return CompleteReply(status=Status.REJECTED, reason="unknown_job")
        keys, args = self._complete_args(ck, job_id, node_id, attempt, outcome, code, payload)
        reply = await self._call("complete_task", ck, keys, args, CompleteReply, own_payload=payload, own_result=result)
        self._count_completed(reply)
        return reply

    def _complete_args(self, ck: CellKeys, job_id: str, node_id: str, attempt: int, outcome: str, code: str,
                       payload: str) -> tuple[list[str], list[Any]]:
        """``complete_task``'s keys and arguments."""
        return [ck.nodes, ck.job(job_id)], [self.proc, job_id, node_id, attempt, outcome, code, payload]

    def complete_soon(self, job_id: str, node_id: str, attempt: int, outcome: str, code: str = "",
                      payload: str = "", result: Any = None) -> asyncio.Future[CompleteReply]:
        """``complete`` for a caller that goes on meanwhile: the reply's future (see ``complete_then``)."""
        fut: asyncio.Future[CompleteReply] = asyncio.get_running_loop().create_future()
        self.complete_then(job_id, node_id, attempt, outcome, code, payload, result, settle(fut))
        return fut

    def complete_then(self, job_id: str, node_id: str, attempt: int, outcome: str, code: str, payload: str,
                      result: Any, done: Done) -> None:
        """``complete`` for a caller that goes on meanwhile (a node's frames are read on while its
        results are settled), told by ``done(reply, None)`` or ``done(None, exc)``. Through the
        pipeline, the call leaves with the others of this loop turn and its reply is decoded in the
        pipeline's reader (no task, no future, nothing woken); should that first attempt fail for a
        reason ``complete`` retries (Redis unreachable, the library not loaded), ``complete`` takes
        over in a task, retries and all."""
        def in_a_task() -> None:
            task = asyncio.get_running_loop().create_task(
                self.complete(job_id, node_id, attempt, outcome, code, payload, result))
            task.add_done_callback(lambda t: _tell(t, done))

        ck = self.keys_for_job(job_id)
        pipeline = self.scripts.pipeline
        if ck is None or pipeline is None:  # (an unknown job's answer; a client without a pipeline)
            in_a_task()
            return
        keys, args = self._complete_args(ck, job_id, node_id, attempt, outcome, code, payload)

        def settled(raw: Any) -> None:
            if not isinstance(raw, BaseException):
                try:
                    reply = self._decoded("complete_task", ck, raw, CompleteReply, payload, result)
                except Exception as bad:  # (a reply that does not decode: the caller hears of it)
                    done(None, bad)
                    return
                self._count_completed(reply)
                done(reply, None)
            elif isinstance(raw, ResponseError) and not function_missing(raw):
                done(None, ScriptError(f"complete_task: {raw}"))
            elif isinstance(raw, asyncio.CancelledError):
                done(None, raw)
            else:  # (nothing ran, or it is unknown whether it did: complete_task is retry-safe, I8)
                in_a_task()

        pipeline.execute_then(self.scripts.command("complete_task", keys, args), settled)

    def _count_completed(self, reply: CompleteReply) -> None:
        if reply.status == Status.COMPLETED and reply.state != "failed":  # failures are counted by the scripts
            self.counts[f"jobs_{reply.state}"] += 1

    async def start_job(self, job_id: str, node_id: str, attempt: int) -> StartReply:
        ck = self.keys_for_job(job_id)
        if ck is None:
            return StartReply(status=Status.REJECTED)
        return await self._call("start_job", ck, [ck.nodes, ck.job(job_id)], [self.proc, job_id, node_id, attempt],
                                StartReply)

    async def cancel(self, job_id: str, code: str = ErrorCode.JOB_CANCELLED) -> CancelReply:
        ck = self.keys_for_job(job_id)
        if ck is None:
            return CancelReply(status=Status.UNKNOWN)
        return await self._call("cancel_job", ck, [ck.nodes, ck.job(job_id)], [self.proc, job_id, code, self.call_id()],
                                CancelReply)

    async def relay_partial(self, job_id: str, node_id: str, session_id: str, utterance_index: int | None,
                            partial: str) -> RelayReply:
        ck = self.keys_for_job(job_id)
        if ck is None:
            return RelayReply(status=Status.REJECTED, reason="unknown_job")
        return await self._call("relay_partial", ck, [ck.nodes, ck.job(job_id)], [
            self.proc, job_id, node_id, session_id, "" if utterance_index is None else utterance_index, partial],
            RelayReply)

    async def get_jobs(self, job_ids: Iterable[str]) -> dict[str, JobStatus]:
        """Where these jobs stand (read-only). A job id that names no known cell is "missing"."""
        out: dict[str, JobStatus] = {}
        for cell, ids in self._by_cell(job_ids, out).items():
            ck = self.cells[cell]
            reply = await self._call("get_jobs", ck, [ck.nodes], list(ids), JobsReply)
            out.update({status.job: status for status in reply.jobs})
        return out

    def _by_cell(self, job_ids: Iterable[str], missing: dict[str, JobStatus] | None = None) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = defaultdict(list)
        for job_id in job_ids:
            cell = cell_of_job(job_id, self.cell_names)
            if cell is not None:
                groups[cell].append(job_id)
            elif missing is not None:
                missing[job_id] = JobStatus(job=job_id, state="missing")  # type: ignore[arg-type]
        return groups

    # ---------------------------------------------------------------- sessions
    async def open_session(self, session_id: str, spec: str) -> SessionReply:
        ck = self.keys_for_session(check_name("session_id", session_id))
        return await self._call("open_session", ck, [ck.nodes, ck.sess(session_id)],
                                [self.proc, session_id, "open", spec, "", self.call_id()], SessionReply)

    async def resume_session(self, session_id: str) -> list[SessionReply]:
        """Take a session over, in every cell (its home cell's answer first). Cells where it has
        nothing answer "unknown"."""
        check_name("session_id", session_id)
        out = []
        for ck in self._cells_to_try(session_id):
            out.append(await self._call("open_session", ck, [ck.nodes, ck.sess(session_id)],
                                        [self.proc, session_id, "resume", "", "", self.call_id()], SessionReply))
        return out

    async def reclaim_session(self, session_id: str, spec: str, epoch: int,
                              cells: Iterable[str] | None = None) -> None:
        """The holder is alive but Redis lost the session's record or declared the holder dead: the
        session is live on this process again, in its home cell and every cell it used."""
        names = set(cells or ()) | {home_cell(session_id, self.cell_names)}
        for cell in sorted(names):
            ck = self.cells[cell]
            await self._call("open_session", ck, [ck.nodes, ck.sess(session_id)],
                             [self.proc, session_id, "reclaim", spec, epoch, self.call_id()], SessionReply)

    async def commit_session(self, session_id: str, epoch: int, point: tuple[int, int, int, int]) -> SessionReply:
        ck = self.keys_for_session(session_id)
        return await self._call("open_session", ck, [ck.nodes, ck.sess(session_id)], [
            self.proc, session_id, "commit", epoch, " ".join(str(n) for n in point), self.call_id()], SessionReply)

    async def close_session(self, session_id: str, epoch: int, *, detach: bool, grace_ms: int = 0,
                            cells: Iterable[str] | None = None) -> list[CloseReply]:
        """The session's socket is gone (``detach``: an orphan for ``grace_ms``) or it is over."""
        names = set(cells or ()) | {home_cell(session_id, self.cell_names)}
        out = []
        for cell in sorted(names):
            ck = self.cells[cell]
            out.append(await self._call("close_session", ck, [ck.nodes, ck.sess(session_id)], [
                self.proc, session_id, epoch, "detach" if detach else "end", grace_ms, self.call_id()], CloseReply))
        return out

    async def ack(self, session_id: str, job_ids: Iterable[str] = (), *, ended: Iterable[str] = (),
                  batched: bool = False) -> int:
        """The session delivered these outcomes: they are no longer owed (and the jobs are forgotten);
        how many were (a job of ``job_ids`` that has not ended is left as it is). ``ended``: the
        session's own jobs (not room jobs) whose outcome Redis gave it, so ended for sure: forgotten
        without being read first. ``batched``: the ack joins the other sessions' acks of the next
        ACK_LINGER_S in one script call (for a caller that does not wait on it)."""
        check_name("session_id", session_id)
        groups: dict[str, tuple[list[str], list[str]]] = {}
        for cell, ids in self._by_cell(job_ids).items():
            groups[cell] = (ids, [])
        for cell, ids in self._by_cell(ended).items():
            groups.setdefault(cell, ([], []))[1].extend(ids)
        if batched:
            return sum(await asyncio.gather(*(self.acks.submit_soon(self.cells[cell], (session_id, *both))
                                              for cell, both in groups.items())))
        acked = 0
        for cell, (ids, done) in groups.items():
            acked += (await self._ack_batch(self.cells[cell], [(session_id, ids, done)]))[0]
        return acked

    async def _ack_batch(self, ck: CellKeys, items: list[tuple[str, list[str], list[str]]]) -> list[int]:
        """One ``ack_outcomes`` call for the acks of one cell's sessions: each gets its own count."""
        args: list[Any] = [self.proc]
        for session_id, ids, done in items:
            args += [session_id, len(ids), len(done), *ids, *done]
        reply = await self._call("ack_outcomes", ck, [ck.nodes], args, AckReply)
        if len(reply.acked) != len(items):
            raise ScriptError(f"ack_outcomes: {len(items)} sessions, {len(reply.acked)} counts")
        return reply.acked

    # ---------------------------------------------------------------- rooms
    def keys_for_room(self, code: str) -> CellKeys:
        return self.cells[room_cell(code, self.cell_names)]

    async def room(self, op: str, code: str, session_id: str, arg5: str = "", arg6: str = "") -> RoomReply:
        """One room transition (``store/lua/room-3.lua``): create, join, leave, prefer, speak, signal."""
        ck = self.keys_for_room(code)
        return await self._call("room", ck, [ck.nodes, ck.room(code), ck.room_members(code)], [
            self.proc, op, code, session_id, arg5, arg6, self.settings.room_expiry_ms, self.call_id()], RoomReply)

    async def rooms(self) -> list[dict[str, Any]]:
        """Every room and its members (operators' view)."""
        out = []
        for ck in self.cells.values():
            codes = await self.retrying("zrange", lambda ck=ck: self.client.zrange(ck.rooms, 0, -1, withscores=True))
            for raw_code, expires in codes:
                code = _text(raw_code)
                meta = await self._hash(ck.room(code)) or {}
                members = await self.retrying("hgetall", lambda ck=ck, code=code: self.client.hgetall(
                    ck.room_members(code)))
                listed = sorted((msgspec.json.decode(v) for v in members.values()),
                                key=lambda m: (m.get("seq", 0), m.get("joined_at", 0), m.get("session_id", "")))
                out.append({"room_code": code, "room_id": meta.get("id", ""), "cell": ck.cell,
                            "created_ms": int(meta.get("created", 0)), "expires_ms": int(expires),
                            "members": [{k: m.get(k) for k in ("session_id", "display_name", "preferred_lang",
                                                                "lang", "joined_at")} for m in listed]})
        return out

    # ---------------------------------------------------------------- upkeep
    async def reap_cell(self, cell: str, batch: int = 100, lenient: bool = False) -> ReapReply:
        """``lenient`` right after this process could not reach Redis: see reap-1.lua."""
        ck = self.cells[cell]
        return await self._call("reap", ck, [ck.nodes], [self.proc, batch, self.settings.session_grace_ms,
                                                         self.call_id(), "1" if lenient else "",
                                                         self.settings.proc_ttl_ms], ReapReply)

    async def reap(self, batch: int = 100, lenient: bool = False) -> list[ReapReply]:
        return [await self.reap_cell(cell, batch, lenient) for cell in self.cell_names]

    async def touch_proc(self, ttl_ms: int | None = None) -> dict[str, TouchReply]:
        """Renew this process in every cell: each cell's data generation marker, and whether the
        process had to be registered anew (new, or declared dead while Redis stalled it)."""
        out = {}
        for ck in self.cells.values():
            out[ck.cell] = await self._call("touch_proc", ck, [ck.nodes], [
                self.proc, ttl_ms or self.settings.proc_ttl_ms, uuid.uuid4().hex[:8]], TouchReply)
        return out

    async def flush_stats(self) -> None:
        """Frequent counters are kept per process and added to the cluster-wide figures now and
        then (the scripts count only rare events themselves: one write fewer per job)."""
        counts, self.counts = self.counts, Counter()
        if not counts:
            return
        ck = self.cells[self.cell_names[0]]
        try:
            await self.retrying("stats", lambda: self._incr_stats(ck, counts))
        except DependencyDown:
            self.counts.update(counts)
            raise

    async def _incr_stats(self, ck: CellKeys, counts: dict[str, int]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for name, n in counts.items():
            pipe.hincrby(ck.stats, name, n)
        await pipe.execute()

    # ---------------------------------------------------------------- inbox (cross-process delivery)
    async def read_inbox(self, cell: str, last_id: str, block_ms: int, count: int = 100) -> list[tuple[str, Effect]]:
        ck = self.cells[cell]
        try:
            answer = await self.client.xread({ck.inbox(self.proc): last_id}, count=count, block=block_ms)
        except RETRYABLE as exc:
            raise DependencyDown(f"Redis unreachable reading the inbox: {exc}") from exc
        out: list[tuple[str, Effect]] = []
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                try:
                    effect = _effect_decoder.decode(fields[b"e"])
                except msgspec.DecodeError as exc:
                    self.undecodable_effects += 1
                    log.error("undecodable inbox entry", entry=_text(entry_id), error=str(exc))
                    out.append((_text(entry_id), Effect(kind="")))
                    continue
                effect.cell = cell
                if b"r" in fields:
                    effect.payload = _text(fields[b"r"])
                out.append((_text(entry_id), effect))
        return out

    async def trim_inbox(self, cell: str, entry_ids: list[str]) -> None:
        """What was read and delivered leaves the inbox (its bound counts only unread entries)."""
        if entry_ids:
            ck = self.cells[cell]
            await self.retrying("xdel", lambda: self.client.xdel(ck.inbox(self.proc), *entry_ids))

    # ---------------------------------------------------------------- read-only views
    async def _hash(self, key: str) -> dict[str, str] | None:
        raw = await self.retrying("hgetall", lambda: self.client.hgetall(key))
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None

    async def node(self, node_id: str) -> dict[str, str] | None:
        ck = self.keys_for_node(node_id)
        n = await self._hash(ck.node(node_id))
        if n is not None:
            n.setdefault("used", "0")
        return n

    async def nodes(self) -> list[dict[str, str]]:
        """Every live node and every node offline for less than an hour (operators' view)."""
        out = []
        for ck in self.cells.values():
            ids = {_text(n) for n in await self.retrying("zrange", lambda ck=ck: self.client.zrange(ck.nodes, 0, -1))}
            ids |= {_text(n) for n in await self.retrying("zrange", lambda ck=ck: self.client.zrange(ck.offline, 0, -1))}
            for nid in sorted(ids):
                n = await self.node(nid)
                if n:
                    out.append(n | {"cell": ck.cell})
        return sorted(out, key=lambda n: n.get("id", ""))

    async def pools(self) -> list[dict[str, Any]]:
        out = []
        for ck in self.cells.values():
            counts = await self.retrying("hgetall", lambda ck=ck: self.client.hgetall(ck.pools))
            for pid in sorted(_text(p) for p in counts):
                members = await self.retrying("zrange", lambda pid=pid, ck=ck: self.client.zrange(
                    ck.pool(pid), 0, -1, withscores=True))
                out.append({
                    "pool": pid, "cell": ck.cell,
                    "nodes": [_text(m) for m, _ in members],
                    "registered": int(counts[pid.encode()]),
                    "free_slots": int(sum(score for _, score in members)),
                    "queue_depth": int(await self.retrying("llen", lambda pid=pid, ck=ck: self.client.llen(
                        ck.queue(pid)))),
                })
        return out

    async def job(self, job_id: str) -> dict[str, str] | None:
        ck = self.keys_for_job(job_id)
        if ck is None:
            return None
        raw = await self._hash(ck.job(job_id))
        return job_view(job_id, raw) if raw is not None else None

    async def session(self, session_id: str) -> dict[str, str] | None:
        """A session's record in its home cell (ValueError for an id that cannot be one)."""
        return await self._hash(self.keys_for_session(check_name("session_id", session_id)).sess(session_id))

    async def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for ck in self.cells.values():
            for k, v in (await self.retrying("hgetall", lambda ck=ck: self.client.hgetall(ck.stats))).items():
                total[_text(k)] = total.get(_text(k), 0) + int(v)
        return total

    async def events(self, count: int = 50) -> list[dict[str, str]]:
        out = []
        for ck in self.cells.values():
            entries = await self.retrying("xrevrange", lambda ck=ck: self.client.xrevrange(ck.events, count=count))
            for entry_id, fields in entries:
                out.append({"id": _text(entry_id)} | {_text(k): _text(v) for k, v in fields.items()})
        return sorted(out, key=lambda e: e["id"], reverse=True)[:count]

    async def slot_report(self) -> dict[str, Any]:
        """Every node's used/max, and the I1 check: 0 <= used <= max for ready nodes, and every job
        a node holds exists, is active, and names that node as its holder."""
        violations = []
        used_total = max_total = 0
        for n in await self.nodes():
            ck = self.cells[n["cell"]]
            held = n.get("jobs", "").split()
            used, cap = len(held), int(n.get("max", 0))
            if int(n["used"]) != used or len(set(held)) != used:
                violations.append(f"node {n['id']}: used={n['used']} but holds {held}")
            if n.get("state") != "offline":
                used_total += used
                max_total += cap
            if used > cap and n.get("state") == "ready":
                violations.append(f"node {n['id']}: used={used} > max={cap}")
            for jid in held:
                fields = await self.retrying("hmget", lambda ck=ck, jid=jid: self.client.hmget(
                    ck.job(jid), "state", "node"))
                state, holder = (_text(f) if f is not None else None for f in fields)
                if state not in ("assigned", "running") or holder != n["id"]:
                    violations.append(f"node {n['id']}: holds job {jid} (state={state}, holder={holder})")
        return {"used": used_total, "max": max_total, "violations": violations}

    async def unfinished_jobs(self) -> list[dict[str, str]]:
        """Jobs not in a terminal state (after quiescence there should be none: I3, I10)."""
        out = []
        for ck in self.cells.values():
            async for key in self.client.scan_iter(match=ck.base + "job:*", count=1000):
                state, spec, node = await self.client.hmget(key, "state", "spec", "node")
                job = job_view(_text(key).removeprefix(ck.base + "job:"),
                               {"state": state or "", "spec": spec or "", "node": node or ""})
                if job["state"] not in ("completed", "completed_empty", "failed"):
                    out.append({k: job.get(k, "") for k in ("id", "state", "session", "utt", "tgt", "node")})
        return out

    # ---------------------------------------------------------------- test support
    async def set_clock_offset(self, offset_ms: int) -> None:
        """Shift the time every script reads (test builds only, ``test_clock=True``; I7 stays intact)."""
        for ck in self.cells.values():
            await self.client.set(ck.clock, offset_ms)

    async def server_now_ms(self) -> int:
        sec, usec = await self.client.time()
        return int(sec) * 1000 + int(usec) // 1000
