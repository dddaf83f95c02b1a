"""The faults, one injector each. An injector runs at the fault instant and returns when the
disruption it makes is over (a stopped process continued, a restarted server up again); the load
goes on around it. ``Ctx.notes`` collects what the injector saw, for the report."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from dragoman.embedded import _info
from dragoman.store.api import job_view
from dragoman.store.keys import CellKeys

from .forge import Forger
from .fuzz import Attacker, AttackStats, Targets
from .load import Ledger
from .topology import Shape, Topology


@dataclass
class Ctx:
    topo: Topology
    ledger: Ledger
    quick: bool
    notes: dict[str, Any] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)  # processes killed on purpose (not crashes)
    prepared: dict[str, Any] = field(default_factory=dict)  # what prepare() made (fuzz frames)

    @property
    def liveness_s(self) -> float:
        """How long a node that stops answering keeps its jobs: WebSocket ping interval + timeout."""
        s = self.topo.shape
        return (s.setting_ms("ws_ping_interval_ms") + s.setting_ms("ws_ping_timeout_ms")) / 1000


@dataclass
class Fault:
    name: str
    title: str
    injector: str  # exactly what is done, for the report
    inject: Callable[[Ctx], Awaitable[None]]
    disruption: Callable[[bool], float]  # seconds the injection lasts (quick?)
    shape: Callable[[Shape], None] | None = None
    prepare: Callable[[Ctx], None] | None = None
    attack: bool = False  # fuzz / forge: extra criteria (no forged text delivered, schedulers up)


async def busiest_node(ctx: Ctx) -> str:
    """The live node holding the most jobs right now (ties: the first)."""
    best, most = "", -1
    for tag, proc in ctx.topo.nodes.items():
        if not proc.alive():
            continue
        nid = ctx.topo.node_id(tag)
        held = len((await ctx.topo.rc.hget(ctx.topo.node_cell(nid).node(nid), "jobs") or b"").split())
        if held > most:
            best, most = tag, held
    ctx.notes["target node"] = f"{ctx.topo.node_id(best)} (holding {most} jobs)"
    return best


# ---------------------------------------------------------------------- nodes
async def node_kill(ctx: Ctx) -> None:
    tag = await busiest_node(ctx)
    ctx.topo.nodes[tag].signal(signal.SIGKILL)
    ctx.killed.add(f"node-{tag}")


async def node_stop(ctx: Ctx) -> None:
    tag = await busiest_node(ctx)
    proc = ctx.topo.nodes[tag]
    proc.signal(signal.SIGSTOP)
    await asyncio.sleep(ctx.liveness_s + 1.5)  # the fault's length, by design: past its liveness deadline
    proc.signal(signal.SIGCONT)


async def node_cut(ctx: Ctx) -> None:
    tag = await busiest_node(ctx)
    assert ctx.topo.node_proxy is not None
    conn = ctx.topo.node_proxy.cut(tag)
    if conn is None:
        ctx.notes["cut"] = "no live connection found"
        return
    await asyncio.sleep(ctx.liveness_s + 1.5)  # blackholed: nothing forwarded, nothing closed
    conn.abort(rst=True)
    ctx.notes["cut"] = f"blackholed {ctx.liveness_s + 1.5:.1f} s, then RST both sides"


# ---------------------------------------------------------------------- schedulers
def scheduler_kill(name: str) -> Callable[[Ctx], Awaitable[None]]:
    async def inject(ctx: Ctx) -> None:
        ctx.topo.schedulers[name].signal(signal.SIGKILL)
        ctx.killed.add(f"scheduler-{name}")

    return inject


async def inbox_stall(ctx: Ctx) -> None:
    """SIGSTOP the session holder (B) while effects for its sessions pile up in its inbox stream."""
    rc = ctx.topo.rc
    keys = [k async for k in rc.scan_iter(match="dragoman:*:inbox:*")]

    async def added() -> dict[bytes, int]:
        out = {}
        for k in keys:
            try:
                out[k] = int((await rc.xinfo_stream(k))["entries-added"])
            except Exception:
                out[k] = 0
        return out

    before = await added()
    proc = ctx.topo.schedulers["B"]
    stall = 4.0
    proc.signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(stall)  # the fault's length, by design
        after = await added()
    finally:
        proc.signal(signal.SIGCONT)
    bound = ctx.topo.shape.env().get("DRAGOMAN_INBOX_MAX_LEN")
    from dragoman.config import Settings

    known = "inbox_max_len" in {f.name for f in dataclasses.fields(Settings)}
    ctx.notes["stall"] = f"{stall:.0f} s; inbox bound {bound}" + (
        "" if known else " (not a setting of this scheduler, which ignores it: its scripts trim inboxes at "
                         "MAXLEN ~ 1000)")
    ctx.notes["inbox entries added during the stall (per scheduler process)"] = sorted(
        (after.get(k, 0) - before.get(k, 0) for k in keys), reverse=True)


def inbox_shape(shape: Shape) -> None:
    shape.scheduler_env |= {"DRAGOMAN_INBOX_MAX_LEN": "10", "DRAGOMAN_PROC_TTL_MS": "10000"}


# ---------------------------------------------------------------------- redis
async def redis_restart(ctx: Ctx) -> None:
    await ctx.topo.kill_redis()
    await asyncio.sleep(1.0)  # down for a second, as a supervisor's restart would take
    ctx.topo.start_redis()
    dbsize = await ctx.topo.rc.dbsize()
    ctx.notes["keys after restart"] = dbsize


def aof_shape(shape: Shape) -> None:
    shape.redis_args = ("--appendonly", "yes", "--appendfsync", "always")


async def redis_stall(ctx: Ctx) -> None:
    pid = ctx.topo.redis_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(5.0)  # the fault's length, by design
    finally:
        os.kill(pid, signal.SIGCONT)


# ---------------------------------------------------------------------- redis high availability
async def first_dispatch_on(port: int, ck: CellKeys, since_ms: int, timeout: float = 30.0) -> float | None:
    """Seconds from ``since_ms`` (wall clock, ms) to the earliest job of the cell the server on
    ``port`` (the new primary) assigned after it: the ``assigned_at`` Redis wrote, from its own clock.
    Polled: an assigned job stays in Redis until its outcome is acknowledged (100 ms at least here)."""
    direct = aioredis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # still promoting, loading
                keys = [k async for k in direct.scan_iter(match=ck.job("*"), count=1000)]
                jobs = [job_view("", await direct.hgetall(k)) for k in keys]
                times = [int(j["assigned_at"]) for j in jobs if j.get("assigned_at")]
                after = [t for t in times if t >= since_ms]
                if after:
                    return (min(after) - since_ms) / 1000
            await asyncio.sleep(0.05)  # polling a state that has no event to await
        return None
    finally:
        await direct.aclose()


def _lag(primary: int) -> int:
    """Bytes of replication stream the (paused) replica has not acknowledged, as the primary sees it."""
    info = _info(primary, "replication")
    sent = int(info["master_repl_offset"])
    acked = [int(m.group(1)) for k, v in info.items()  # "slave0": "ip=..,offset=N,.." (or its dict form)
             if k.startswith("slave") and (m := re.search(r"offset\W{1,4}(\d+)", v))]
    return max(0, sent - min(acked, default=sent))


def sentinel_failover(lagging: bool) -> Callable[[Ctx], Awaitable[None]]:
    async def inject(ctx: Ctx) -> None:
        await _sentinel_failover(ctx, lagging)

    return inject


async def _sentinel_failover(ctx: Ctx, lagging: bool) -> None:
    ha = ctx.topo.ha
    assert ha is not None
    old, replica = ha.primary, ha.replica
    if lagging:  # the replica falls behind: what the scheduler writes from here on is lost at the kill
        ha.pause(replica)
        filler = aioredis.Redis(port=old.port)
        try:
            blob = b"x" * (1 << 20)
            for i in range(24):  # more than the replication buffers pass on while it is paused
                await filler.set(f"chaos-filler-{i}", blob)
        finally:
            await filler.aclose()
        await asyncio.sleep(1.0)  # the scheduler's writes of this second are the ones lost
        ctx.notes["replica behind at the kill"] = f"{_lag(old.port) / 2**20:.1f} MiB (paused 1 s)"
    since = int(time.time() * 1000)
    t0 = time.monotonic()
    old.kill()
    if lagging:
        ha.resume(replica)
    ctx.killed.add("redis-primary")
    _, port = await asyncio.to_thread(ha.wait_for_failover, old.port, 30.0)
    ctx.notes["primary killed -> replica promoted (Sentinels agree)"] = f"{time.monotonic() - t0:.2f} s"
    first = await first_dispatch_on(port, ctx.topo.cell_keys("c0"), since)
    ctx.notes["primary killed -> first job dispatched on the new primary"] = (
        f"{first:.2f} s" if first is not None else "none within 30 s")


async def cluster_failover(ctx: Ctx) -> None:
    cluster = ctx.topo.cluster
    assert cluster is not None
    ck = ctx.topo.cell_keys("c0")
    since = int(time.time() * 1000)
    t0 = time.monotonic()
    old = cluster.kill_primary_of(ck.nodes)
    ctx.killed.add("redis-primary")
    _, port = await asyncio.to_thread(cluster.wait_for_promotion, ck.nodes, old.port, 30.0)
    ctx.notes["cell c0's primary killed -> its replica serves the slot"] = f"{time.monotonic() - t0:.2f} s"
    first = await first_dispatch_on(port, ck, since)
    ctx.notes["primary killed -> first job of cell c0 dispatched on the new primary"] = (
        f"{first:.2f} s" if first is not None else "none within 30 s")


def sentinel_shape(shape: Shape) -> None:
    shape.redis_kind = "sentinel"


def cluster_shape(shape: Shape) -> None:
    shape.redis_kind = "cluster"


async def script_flush(ctx: Ctx) -> None:
    for _ in range(5):
        await ctx.topo.rc.function_flush()  # the scripts' library (and any script cache) is gone
        await ctx.topo.rc.script_flush()
        await asyncio.sleep(0.5)
    ctx.notes["flushes"] = 5


# ---------------------------------------------------------------------- attacks
def fuzz_count(quick: bool) -> int:
    return 500 if quick else 10_000


def attack_seconds(quick: bool) -> float:
    return 2.5 if quick else 12.0


def fuzz_prepare(ctx: Ctx) -> None:
    from .fuzz import generate

    n = fuzz_count(ctx.quick)
    started = time.monotonic()
    for endpoint in ("node", "session"):
        frames, kinds = generate(endpoint, n, seed=7 if endpoint == "node" else 8)
        ctx.prepared[endpoint] = frames
        ctx.notes[f"{endpoint} frames by category"] = dict(kinds.most_common())
    ctx.notes["generation"] = f"{2 * n} frames in {time.monotonic() - started:.1f} s (Hypothesis)"


async def fuzz(ctx: Ctx) -> None:
    topo, ledger = ctx.topo, ctx.ledger
    targets = Targets(
        sessions=lambda: list({k[0] for k in list(ledger.sent)[-200:]}),
        nodes=lambda: [topo.node_id(t) for t in topo.nodes],
        jobs=lambda: list(ledger.dispatched)[-100:])
    max_frame = 4 * 1024 * 1024
    stats = {"node": AttackStats(), "session": AttackStats()}
    attackers = []
    for endpoint, backends in (("node", ("A", "B")), ("session", ("B", "A"))):
        frames = ctx.prepared[endpoint]
        for i, name in enumerate(backends):
            share = frames[i::len(backends)]
            url = topo.ws(name) + f"/ws/{endpoint}"
            attackers.append(Attacker(f"fuzz-{endpoint}-{name}", url, share, targets, stats[endpoint],
                                      max_frame, seed=i).run(attack_seconds(ctx.quick)))
    await asyncio.gather(*attackers)
    for endpoint, s in stats.items():
        ctx.notes[f"{endpoint} endpoint"] = {
            "frames sent": s.frames, "oversized": s.oversized, "connections": s.connections,
            "connect failures": s.connect_failures, "closed by scheduler (code)": dict(s.closes),
            "replies": dict(s.replies.most_common(8))}


async def forge(ctx: Ctx) -> None:
    forger = Forger(ctx.topo, ctx.ledger)
    await forger.run(attack_seconds(ctx.quick))
    s = forger.stats
    ctx.notes["forged frames sent"] = dict(s.sent)
    ctx.notes["takeovers (register a live node's id)"] = f"{s.takeovers_accepted} accepted of {s.takeovers_tried}"
    ctx.notes["answers"] = dict(s.replies.most_common(12))


def _const(full: float, quick: float | None = None) -> Callable[[bool], float]:
    return lambda q: quick if (q and quick is not None) else full


FAULTS: dict[str, Fault] = {f.name: f for f in [
    Fault("node-kill", "node SIGKILL",
          "SIGKILL to the node agent process holding the most jobs at that instant; it stays dead.",
          node_kill, _const(0)),
    Fault("node-stop", "node SIGSTOP past its deadline, then SIGCONT",
          "SIGSTOP to the busiest node agent for its liveness deadline (WebSocket ping interval + timeout, "
          "4.5 s) + 1.5 s, then SIGCONT: it wakes up holding jobs that were reassigned meanwhile and sends "
          "their late results.",
          node_stop, _const(6.0)),
    Fault("node-cut", "node TCP connection cut without a close frame",
          "The node proxy stops forwarding the busiest node's connection in both directions and keeps both "
          "sockets open (blackhole) for its liveness deadline (4.5 s) + 1.5 s, then aborts both sides with "
          "RST; the agent reconnects.",
          node_cut, _const(6.0)),
    Fault("sched-nodes-kill", "SIGKILL of the scheduler holding the nodes (A)",
          "SIGKILL to scheduler process A, which holds every node socket. The node agents reconnect through "
          "their proxy, which now reaches B; B holds everything from then on.",
          scheduler_kill("A"), _const(0)),
    Fault("sched-sessions-kill", "SIGKILL of the scheduler holding the sessions (B)",
          "SIGKILL to scheduler process B, which holds every session socket. The clients reconnect through "
          "their proxy, which now reaches A (resuming their session if the client and server can).",
          scheduler_kill("B"), _const(0)),
    Fault("redis-restart", "Redis restart without persistence",
          "SIGKILL to valkey-server (no persistence), 1 s down, then a new one on the same port, empty.",
          redis_restart, _const(1.2)),
    Fault("redis-restart-aof", "Redis restart with AOF (appendfsync always)",
          "valkey-server runs with --appendonly yes --appendfsync always; SIGKILL, 1 s down, then a new one "
          "on the same port and directory, which loads the AOF.",
          redis_restart, _const(1.2), shape=aof_shape),
    Fault("redis-stall", "Redis stalled 5 s",
          "SIGSTOP to valkey-server for 5 s, then SIGCONT: connections stay open, nothing answers.",
          redis_stall, _const(5.0)),
    Fault("sentinel-failover", "Sentinel failover: primary SIGKILL",
          "Redis is a Sentinel set (primary, replica, three Sentinels; down-after 1 s). SIGKILL to the "
          "primary; the Sentinels promote the replica and the schedulers follow. The dead server stays dead.",
          sentinel_failover(lagging=False), _const(5.0), shape=sentinel_shape),
    Fault("sentinel-failover-lagging", "Sentinel failover with a lagging replica: writes lost",
          "As sentinel-failover, but first the replica is SIGSTOPped and 24 MiB written to the primary "
          "behind the schedulers' writes, so the replica lacks the last second of transitions (jobs, "
          "results, registrations); SIGKILL to the primary, SIGCONT to the replica, which is promoted "
          "without them.",
          sentinel_failover(lagging=True), _const(5.0), shape=sentinel_shape),
    Fault("cluster-failover", "Cluster primary SIGKILL (replica promoted)",
          "Redis is a Cluster of 3 primaries with one replica each (cluster-node-timeout 1 s), the "
          "schedulers on cells c0,c1,c2. SIGKILL to the primary serving cell c0; the Cluster promotes its "
          "replica.",
          cluster_failover, _const(5.0), shape=cluster_shape),
    Fault("script-flush", "FUNCTION FLUSH and SCRIPT FLUSH",
          "FUNCTION FLUSH (the transition scripts' library) and SCRIPT FLUSH on the server, 5 times 0.5 s "
          "apart, while the load runs.",
          script_flush, _const(2.5)),
    Fault("inbox-stall", "inbox reader stalled past its bound",
          "Both schedulers run with DRAGOMAN_INBOX_MAX_LEN=10 and DRAGOMAN_PROC_TTL_MS=10000; SIGSTOP to the "
          "session holder B for 4 s (less than its registration's lifetime) while results for its sessions "
          "are added to its inbox stream, then SIGCONT.",
          inbox_stall, _const(4.0), shape=inbox_shape),
    Fault("fuzz", "generated frames per WebSocket endpoint (10,000; 500 with --quick)",
          "Hypothesis-generated frames (see chaos/fuzz.py) from attacker connections straight to both "
          "schedulers, on /ws/node and /ws/session, spread over the attack window while the load runs.",
          fuzz, attack_seconds, prepare=fuzz_prepare, attack=True),
    Fault("forge", "forged and replayed results and partials",
          "Registered attacker nodes send job_result, asr_partial, job_ack and job_started for jobs and "
          "sessions they do not hold, replay finished jobs' results, and every second try to register "
          "with a live node's id and answer its job (see chaos/forge.py).",
          forge, attack_seconds, attack=True),
]}

QUICK = ("node-kill", "sched-nodes-kill", "redis-restart", "fuzz")
