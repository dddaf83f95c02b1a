"""The async Store: the only way the rest of Dragoman touches scheduler state.

One method per transition script (each one atomic call) plus read-only views for operators and
tests. Script answers are JSON; ``Reply.effects`` lists what the caller must deliver over sockets it
holds itself (effects for sockets held elsewhere were already appended to those processes' inboxes
by the script). Redis being unreachable raises ``DependencyDown``; an argument a script refuses raises
``ScriptError`` and changes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
import zlib
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dragoman.config import Settings
from dragoman.errors import DependencyDown, ScriptError
from dragoman.store.keys import CellKeys, cell_of_job, cell_of_node, check_name, check_pool, job_id_for
from dragoman.store.scripts import Scripts


class Effect(msgspec.Struct, kw_only=True):
    """Something a socket holder must do: ``assign`` (send job_assign to ``node``), ``cancel``
    (send job_cancel to ``node``), ``outcome`` (the job's one outcome, for ``session``)."""

    kind: str
    job: str
    node: str = ""
    attempt: int = 0
    session: str = ""
    utt: int = 0
    tgt: str = ""
    state: str = ""
    code: str = ""
    lease: int = 0
    reason: str = ""
    cell: str = ""
    payload: str | None = None  # carried along when the effect came through an inbox stream


class Reply(msgspec.Struct, kw_only=True):
    status: str
    now: int = 0
    effects: list[Effect] | dict[str, Any] = msgspec.field(default_factory=list)
    state: str = ""
    node: str = ""
    attempt: int = 0
    code: str = ""
    reason: str = ""
    max: int = 0
    used: int = 0
    deadline: int = 0
    reconnected: bool = False
    jobs: int = 0
    dead_nodes: int = 0
    expired_leases: int = 0
    expired_pending: int = 0
    dead_procs: int = 0
    more: bool = False
    job_id: str = ""
    cell: str = ""


_reply_decoder = msgspec.json.Decoder(Reply)
_effect_decoder = msgspec.json.Decoder(Effect)


@dataclasses.dataclass(frozen=True, slots=True)
class JobSpec:
    """What a session asks for: one job for one utterance and one target language."""

    pool: str
    session_id: str
    utterance_index: int
    tgt_lang: str
    data: str  # the job_assign body (JSON, without attempt_id), kept for redelivery
    unique: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    avoid: tuple[str, ...] = ()
    session_proc: str | None = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Store:
    def __init__(self, client: Any, settings: Settings, proc: str | None = None) -> None:
        self.client = client
        self.settings = settings
        self.proc = proc or uuid.uuid4().hex[:12]
        self.cells = {c: CellKeys(settings.key_prefix, c) for c in settings.cells}
        self.cell_names = tuple(settings.cells)
        self.scripts = Scripts(client)

    @classmethod
    def from_url(cls, url: str, settings: Settings, proc: str | None = None, cluster: bool = False) -> Store:
        # Timeouts above the inbox's 1 s blocking read: a stalled Redis becomes DependencyDown, not a hang.
        timeouts = {"socket_timeout": 5.0, "socket_connect_timeout": 3.0}
        if cluster:
            client: Any = RedisCluster.from_url(url, decode_responses=False, max_connections=512, **timeouts)
        else:
            # A blocking pool: past max_connections calls wait for a connection instead of failing.
            pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=256, timeout=5,
                                                            health_check_interval=10, **timeouts)
            client = aioredis.Redis(connection_pool=pool, decode_responses=False)
        return cls(client, settings, proc)

    async def aclose(self) -> None:
        await self.client.aclose()

    # ---------------------------------------------------------------- plumbing
    def keys_for_node(self, node_id: str) -> CellKeys:
        return self.cells[cell_of_node(node_id, self.cell_names)]

    def keys_for_job(self, job_id: str) -> CellKeys | None:
        cell = cell_of_job(job_id, self.cell_names)
        return self.cells[cell] if cell else None

    async def _call(self, name: str, ck: CellKeys, keys: list[str], args: list[Any]) -> Reply:
        try:
            raw = await self.scripts.call(name, keys, args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise DependencyDown(f"Redis unreachable during {name}: {exc}") from exc
        except ResponseError as exc:
            raise ScriptError(f"{name}: {exc}") from exc
        reply = _reply_decoder.decode(raw)
        if isinstance(reply.effects, dict):  # Lua's cjson encodes an empty table as {}
            reply.effects = []
        for effect in reply.effects:
            effect.cell = ck.cell
        reply.cell = ck.cell
        return reply

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisConnectionError, RedisTimeoutError, OSError):
            return False

    async def load_scripts(self) -> None:
        try:
            await self.scripts.load_all(self.client)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise DependencyDown(f"Redis unreachable: {exc}") from exc

    # ---------------------------------------------------------------- node plane
    async def register_node(self, node_id: str, *, conn: str, max_concurrency: int, pools: Sequence[str],
                            info: dict[str, Any] | None = None, node_ttl_ms: int | None = None) -> Reply:
        check_name("node_id", node_id)
        for pool in pools:
            check_pool(pool)
        ck = self.keys_for_node(node_id)
        return await self._call("register_node", ck, [ck.nodes, ck.node(node_id), ck.node_jobs(node_id)], [
            self.proc, node_id, conn, max_concurrency, " ".join(sorted(set(pools))),
            json.dumps(info or {}), node_ttl_ms or self.settings.node_ttl_ms])

    async def heartbeat(self, node_id: str, *, conn: str = "", draining: bool | None = None,
                        pools: Sequence[str] | None = None, usage: dict[str, Any] | None = None,
                        node_ttl_ms: int | None = None) -> Reply:
        check_name("node_id", node_id)
        ck = self.keys_for_node(node_id)
        drain_arg = "" if draining is None else ("1" if draining else "0")
        pools_arg = "" if pools is None else " ".join(sorted(set(pools)))
        return await self._call("heartbeat", ck, [ck.nodes, ck.node(node_id)], [
            self.proc, node_id, conn, node_ttl_ms or self.settings.node_ttl_ms, drain_arg,
            "" if pools is None else "1", pools_arg, json.dumps(usage or {})])

    async def drain(self, node_id: str, on: bool = True, source: str = "operator") -> Reply:
        ck = self.keys_for_node(check_name("node_id", node_id))
        return await self._call("drain_node", ck, [ck.nodes, ck.node(node_id)],
                                [self.proc, node_id, "1" if on else "0", source])

    async def node_offline(self, node_id: str, conn: str = "", reason: str = "socket_closed") -> Reply:
        ck = self.keys_for_node(check_name("node_id", node_id))
        return await self._call("node_offline", ck, [ck.nodes, ck.node(node_id)],
                                [self.proc, node_id, conn, reason])

    # ---------------------------------------------------------------- jobs
    def _cells_to_try(self, spec: JobSpec) -> list[CellKeys]:
        names = list(self.cell_names)
        start = zlib.crc32(spec.session_id.encode()) % len(names)
        return [self.cells[names[(start + i) % len(names)]] for i in range(len(names))]

    async def dispatch(self, spec: JobSpec) -> Reply:
        """Place a job. With several cells, each cell serving the pool is tried for a free slot
        before the last one queues or fails the job."""
        check_pool(spec.pool)
        check_name("session_id", spec.session_id)
        s = self.settings
        cells = self._cells_to_try(spec)
        if len(cells) > 1:  # a hint only: each script decides for itself
            serving = [ck for ck in cells if await self.client.zcard(ck.pool(spec.pool)) > 0]
            cells = serving or cells[:1]
        reply: Reply | None = None
        for i, ck in enumerate(cells):
            job_id = job_id_for(ck.cell, spec.unique)
            mode = "" if i == len(cells) - 1 else "place_only"
            reply = await self._call("dispatch_task", ck,
                                     [ck.nodes, ck.job(job_id), ck.pool(spec.pool), ck.jobdata(job_id)], [
                self.proc, job_id, spec.pool, spec.session_id, spec.utterance_index, spec.tgt_lang,
                s.job_timeout_ms, s.pending_timeout_ms, s.queue_max, s.max_attempts, s.job_ttl_ms,
                " ".join(spec.avoid), spec.session_proc or self.proc, spec.data, mode])
            reply.job_id = job_id
            if reply.status != "no_capacity":
                return reply
        assert reply is not None
        return reply

    async def complete(self, job_id: str, node_id: str, attempt: int, outcome: str, code: str = "",
                       payload: str = "") -> Reply:
        ck = self.keys_for_job(job_id)
        if ck is None:
            return Reply(status="rejected", reason="unknown_job")
        return await self._call("complete_task", ck, [ck.nodes, ck.job(job_id)],
                                [self.proc, job_id, node_id, attempt, outcome, code, payload])

    async def start_job(self, job_id: str, node_id: str, attempt: int) -> Reply:
        ck = self.keys_for_job(job_id)
        if ck is None:
            return Reply(status="rejected", reason="unknown_job")
        return await self._call("start_job", ck, [ck.nodes, ck.job(job_id)], [self.proc, job_id, node_id, attempt])

    async def cancel(self, job_id: str, code: str = "JOB_CANCELLED") -> Reply:
        ck = self.keys_for_job(job_id)
        if ck is None:
            return Reply(status="unknown")
        return await self._call("cancel_job", ck, [ck.nodes, ck.job(job_id)], [self.proc, job_id, code])

    async def reap_cell(self, cell: str, batch: int = 100) -> Reply:
        ck = self.cells[cell]
        return await self._call("reap", ck, [ck.nodes], [self.proc, batch])

    async def reap(self, batch: int = 100) -> list[Reply]:
        return [await self.reap_cell(cell, batch) for cell in self.cell_names]

    async def touch_proc(self, ttl_ms: int | None = None) -> None:
        for ck in self.cells.values():
            await self._call("touch_proc", ck, [ck.nodes], [self.proc, ttl_ms or self.settings.proc_ttl_ms])

    async def job_data(self, job_id: str) -> str | None:
        ck = self.keys_for_job(job_id)
        if ck is None:
            return None
        raw = await self.client.get(ck.jobdata(job_id))
        return None if raw is None else _text(raw)

    # ---------------------------------------------------------------- inbox (cross-process delivery)
    async def read_inbox(self, cell: str, last_id: str, block_ms: int, count: int = 100) -> list[tuple[str, Effect]]:
        ck = self.cells[cell]
        try:
            answer = await self.client.xread({ck.inbox(self.proc): last_id}, count=count, block=block_ms)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise DependencyDown(f"Redis unreachable reading the inbox: {exc}") from exc
        out: list[tuple[str, Effect]] = []
        for _stream, entries in answer or []:
            for entry_id, fields in entries:
                effect = _effect_decoder.decode(fields[b"e"])
                effect.cell = cell
                if b"r" in fields:
                    effect.payload = _text(fields[b"r"])
                out.append((_text(entry_id), effect))
        return out

    # ---------------------------------------------------------------- read-only views
    async def node(self, node_id: str) -> dict[str, str] | None:
        ck = self.keys_for_node(node_id)
        raw = await self.client.hgetall(ck.node(node_id))
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None

    async def nodes(self) -> list[dict[str, str]]:
        """Every live node and every node offline for less than an hour (operators' view)."""
        out = []
        for ck in self.cells.values():
            ids = {_text(n) for n in await self.client.zrange(ck.nodes, 0, -1)}
            ids |= {_text(n) for n in await self.client.zrange(ck.offline, 0, -1)}
            for nid in sorted(ids):
                raw = await self.client.hgetall(ck.node(nid))
                if raw:
                    out.append({_text(a): _text(b) for a, b in raw.items()} | {"cell": ck.cell})
        return sorted(out, key=lambda n: n.get("id", ""))

    async def pools(self) -> list[dict[str, Any]]:
        out = []
        for ck in self.cells.values():
            for pid in sorted(_text(p) for p in await self.client.smembers(ck.pools)):
                members = await self.client.zrange(ck.pool(pid), 0, -1, withscores=True)
                out.append({
                    "pool": pid, "cell": ck.cell,
                    "nodes": [_text(m) for m, _ in members],
                    "free_slots": int(sum(score for _, score in members)),
                    "queue_depth": int(await self.client.llen(ck.queue(pid))),
                })
        return out

    async def job(self, job_id: str) -> dict[str, str] | None:
        ck = self.keys_for_job(job_id)
        if ck is None:
            return None
        raw = await self.client.hgetall(ck.job(job_id))
        return {_text(k): _text(v) for k, v in raw.items()} if raw else None

    async def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for ck in self.cells.values():
            for k, v in (await self.client.hgetall(ck.stats)).items():
                total[_text(k)] = total.get(_text(k), 0) + int(v)
        return total

    async def events(self, count: int = 50) -> list[dict[str, str]]:
        out = []
        for ck in self.cells.values():
            for entry_id, fields in await self.client.xrevrange(ck.events, count=count):
                out.append({"id": _text(entry_id)} | {_text(k): _text(v) for k, v in fields.items()})
        return sorted(out, key=lambda e: e["id"], reverse=True)[:count]

    async def slot_report(self) -> dict[str, Any]:
        """Every node's used/max and held jobs, and the I1 check: used == jobs held, 0 <= used <= max."""
        nodes = await self.nodes()
        violations = []
        used_total = max_total = 0
        for n in nodes:
            ck = self.cells[n["cell"]]
            held = int(await self.client.scard(ck.node_jobs(n["id"])))
            used, cap = int(n.get("used", 0)), int(n.get("max", 0))
            if n.get("state") != "offline":
                used_total += used
                max_total += cap
            if used != held or used < 0 or (used > cap and n.get("state") == "ready"):
                violations.append(f"node {n['id']}: used={used} held={held} max={cap}")
        return {"used": used_total, "max": max_total, "violations": violations}

    # ---------------------------------------------------------------- test support
    async def set_clock_offset(self, offset_ms: int) -> None:
        """Shift the time every script reads (tests advance time this way; I7 stays intact)."""
        for ck in self.cells.values():
            await self.client.set(ck.clock, offset_ms)

    async def server_now_ms(self) -> int:
        sec, usec = await self.client.time()
        return int(sec) * 1000 + int(usec) // 1000
