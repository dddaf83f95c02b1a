"""The idle-socket scale run: one ``dragoman serve`` holding N node sockets and M session sockets.

Steps (the scheduler on its own fresh embedded Valkey, default settings but for
``max_sessions_per_key``, raised to M so M sessions without an API key are allowed):

1. *empty*: the scheduler with no socket: RSS, CPU over ``empty_s``;
2. M sessions connect (one generator process): RSS; then N nodes connect and register
   (``node_procs`` generator processes, N/node_procs sockets each): RSS, registration time;
3. *steady*: every socket heartbeats every 15 s, evenly spread (N/15 + M/15 heartbeats/s), for
   ``steady_s`` (two periods in the full run): scheduler CPU (/proc), heartbeats sent, reply times
   (node: heartbeat -> pong of the ping that follows every ``ping_every``-th one; session: ``client_heartbeat`` ->
   ``server_heartbeat``), Redis commands and server µs (INFO commandstats), generators' CPU;
4. *quiet*: heartbeats paused for ``quiet_s`` (well inside the 45 s node TTL): the scheduler's CPU
   with every socket open and nothing sent by the peers (its WebSocket pings every 2 s, reapers,
   stats): the idle CPU;
5. CPU per heartbeat = (steady CPU - quiet cores x steady seconds) / heartbeats; the gross figure
   (all steady CPU / heartbeats) beside it;
6. whether heartbeats kept being answered: replies missing, sockets the scheduler closed, and what
   it logged (Redis calls retried, nodes registered again after being reaped: a late heartbeat);
7. every socket closed (SIGTERM to the generators); once the scheduler has closed its side of every
   one (/proc/net/tcp): RSS again (what the process keeps after the sockets left);
8. last, one timed GET /metrics (it lists every node from Redis; not done earlier because with
   10,000 nodes it starves the heartbeats of Redis connections).

Memory per socket = RSS growth / sockets (sessions and nodes apart). The open-files limit: every
child process raises its soft RLIMIT_NOFILE to the hard limit (``bench.e2e.procs.raise_nofile``);
the limits seen are reported.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from bench.e2e import facts
from bench.e2e.meter import delta
from bench.e2e.procs import Proc, loadavg, proc_times, raise_nofile, rss_kb, system_busy_s
from bench.e2e.pyspy import start_record
from bench.e2e.runner import new_logdir
from bench.e2e.systems import free_port, http_ok, log
from bench.idle import floor
from bench.peers.loadgen import summarize_ms

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    nodes: int
    sessions: int
    node_procs: int  # node generator processes
    empty_s: float
    steady_s: float
    quiet_s: float
    heartbeat_s: float = 15.0
    # every K-th node heartbeat is followed by a ping that times its reply: the instrument's own
    # frames stay a tenth of the heartbeats', so the CPU per heartbeat is the heartbeat's
    ping_every: int = 10


FULL = Profile("full", nodes=10_000, sessions=1_000, node_procs=2, empty_s=5, steady_s=30, quiet_s=10)
QUICK = Profile("quick", nodes=1_000, sessions=100, node_procs=1, empty_s=3, steady_s=15, quiet_s=5)
PROFILES = {"full": FULL, "quick": QUICK}


def server_sockets(port: int) -> int:
    """TCP sockets on the scheduler's side of ``port`` still ESTABLISHED (01) or in CLOSE_WAIT (08)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.readlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            if len(parts) > 3 and parts[3] in ("01", "08") and int(parts[1].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def scrape(port: int, tries: int = 3, timeout: float = 60) -> dict[str, float]:
    """The scheduler's /metrics as {'name{labels}': value}; {} when it keeps failing (reported)."""
    text = ""
    for attempt in range(tries):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:  # noqa: S310
                text = r.read().decode()
            break
        except OSError as exc:  # HTTP 500 included: e.g. its Redis pool exhausted under load
            log(f"  /metrics failed ({exc}); attempt {attempt + 1} of {tries}")
            time.sleep(1)
    else:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, val = line.rpartition(" ")
            try:
                out[key] = float(val)
            except ValueError:
                pass
    return out


def log_findings(path: Path) -> dict[str, int]:
    """What the scheduler logged that says it struggled: warnings/errors, Redis calls retried, nodes
    registered again (reaped while their heartbeats were late), by message."""
    found: dict[str, int] = {}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return found
    for line in lines:
        if "[warning" in line or "[error" in line or "retrying" in line or "reconnected=True" in line:
            msg = line.split("]", 1)[-1].strip().split("  ", 1)[0][:80]
            if "reconnected=True" in line:
                msg = "node registered again (reconnected=True)"
            found[msg] = found.get(msg, 0) + 1
    return found


def nofile_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max open files"):
                    soft, hard = line.split()[3:5]
                    return f"{soft}/{hard}"
    except OSError:
        pass
    return "?"


class Run:
    def __init__(self, profile: Profile, logdir: Path, pyspy: Path | None = None) -> None:
        self.p, self.logdir, self.pyspy = profile, logdir, pyspy
        self.gens: list[Proc] = []
        self.res: dict[str, Any] = {"profile": dataclasses.asdict(profile)}

    async def ask(self, sig: int, kind: str) -> list[dict[str, Any]]:
        """Signal every generator and wait for each one's answer line."""
        for g in self.gens:
            os.kill(g.pid, sig)
        return [await g.next_event((kind,), 60) for g in self.gens]

    def snap(self, admin: redis.Redis, sched: int, redis_pid: int) -> dict[str, Any]:
        cpu = {"scheduler": {sched: proc_times(sched)}, "redis": {redis_pid: proc_times(redis_pid)}}
        for g in self.gens:
            cpu[g.name] = {g.pid: proc_times(g.pid)}
        return {"t": time.perf_counter(), "cpu": cpu, "ctx": {}, "busy": system_busy_s(),
                "cmd": admin.info("commandstats")}

    async def run(self) -> dict[str, Any]:
        from dragoman.embedded import EmbeddedServer

        p, res = self.p, self.res
        res["nofile_runner"] = "/".join(map(str, raise_nofile()))
        with EmbeddedServer() as server:
            assert server.proc is not None
            admin = redis.Redis.from_url(server.url, decode_responses=True)
            port = free_port()
            logf = self.logdir / "idle-scheduler.log"
            sched = Proc("scheduler", [*facts.dragoman_argv(), "serve", "--redis-url", server.url, "--host",
                                       "127.0.0.1", "--port", str(port)], logf, cwd=ROOT,
                         env={"DRAGOMAN_MAX_SESSIONS_PER_KEY": str(p.sessions + 10)})
            await sched.start()
            try:
                await http_ok(f"http://127.0.0.1:{port}/readyz", 60)
                res["nofile_scheduler"] = nofile_of(sched.pid)
                await self._measure(admin, sched.pid, server.proc.pid, port)
            finally:
                for g in self.gens:
                    await g.stop()
                await sched.stop()
                admin.close()
        res["loadavg_end"] = loadavg()
        return res

    async def _measure(self, admin: redis.Redis, sched: int, redis_pid: int, port: int) -> None:
        p, res = self.p, self.res
        url = f"ws://127.0.0.1:{port}"
        a = self.snap(admin, sched, redis_pid)
        await asyncio.sleep(p.empty_s)  # the measured window itself, not a synchronisation
        res["empty"] = delta(a, self.snap(admin, sched, redis_pid))
        rss = {"empty": rss_kb(sched)}
        gen = [sys.executable, "-m", "bench.idle.gen", "--url", url, "--heartbeat-s", str(p.heartbeat_s)]
        logf = self.logdir / "idle-generators.log"
        t0 = time.perf_counter()
        sessions = Proc("sessions", [*gen, "--kind", "session", "--count", str(p.sessions)], logf, cwd=ROOT)
        self.gens.append(await sessions.start())
        ready = [await sessions.next_event(("ready",), 600)]
        res["sessions_open_s"] = time.perf_counter() - t0
        rss["sessions"] = rss_kb(sched)
        t0 = time.perf_counter()
        per = [p.nodes // p.node_procs + (1 if i < p.nodes % p.node_procs else 0) for i in range(p.node_procs)]
        node_gens = [Proc(f"nodes{i}", [*gen, "--kind", "node", "--count", str(n), "--ping-every", str(p.ping_every)],
                          logf, cwd=ROOT)
                     for i, n in enumerate(per)]
        for g in node_gens:
            self.gens.append(await g.start())
        ready += [await g.next_event(("ready",), 900) for g in node_gens]
        res["nodes_register_s"] = time.perf_counter() - t0
        res["ready"] = [{k: r.get(k) for k in ("kind", "count", "failed", "first_failure", "open_s", "nofile")}
                        for r in ready]
        rss["all_open"] = rss_kb(sched)
        log(f"  {p.sessions} sessions and {p.nodes} nodes open (nodes registered in {res['nodes_register_s']:.1f} s); "
            f"scheduler RSS {rss['empty'] / 1024:.0f} -> {rss['all_open'] / 1024:.0f} MB")

        # steady: heartbeats every 15 s from every socket
        s0 = await self.ask(signal.SIGUSR1, "stats")
        a = self.snap(admin, sched, redis_pid)
        spy = start_record(sched, p.steady_s - 1, self.pyspy) if self.pyspy is not None else None
        await asyncio.sleep(p.steady_s)  # the measured window
        if spy is not None:
            await asyncio.to_thread(spy.wait, 60)
        b = self.snap(admin, sched, redis_pid)
        s1 = await self.ask(signal.SIGUSR1, "stats")
        res["steady"] = self._window(delta(a, b), s0, s1)
        rss["steady_end"] = rss_kb(sched)
        log(f"  steady: {res['steady']['heartbeats_per_s']:.0f} heartbeats/s, scheduler "
            f"{res['steady']['cpu']['scheduler']['cores']:.3f} cores")

        # quiet: heartbeats paused, every socket still open
        await self.ask(signal.SIGUSR2, "paused")
        q0 = await self.ask(signal.SIGUSR1, "stats")
        a = self.snap(admin, sched, redis_pid)
        await asyncio.sleep(p.quiet_s)  # the measured window
        b = self.snap(admin, sched, redis_pid)
        q1 = await self.ask(signal.SIGUSR1, "stats")
        await self.ask(signal.SIGUSR2, "resumed")
        res["quiet"] = self._window(delta(a, b), q0, q1)
        log(f"  quiet: scheduler {res['quiet']['cpu']['scheduler']['cores']:.3f} cores")

        res["fds_open"] = fd_count(sched)
        res["scheduler_log"] = log_findings(self.logdir / "idle-scheduler.log")
        # every socket closed: what the process keeps
        t0 = time.perf_counter()
        for g in self.gens:
            os.kill(g.pid, signal.SIGTERM)
        res["generator_summaries"] = [await g.next_event(("summary",), 120) for g in self.gens]
        for g in self.gens:
            await g.wait(30)
        res["sockets_left_after_close"] = await self._until_closed(port, 120)
        res["close_s"] = time.perf_counter() - t0
        rss["after_close"] = rss_kb(sched)
        res["rss_kb"] = rss
        res["analysis"] = analyse(res)
        # Last, as it perturbs what it measures: one GET /metrics, which lists every node the cluster
        # knows (all offline now) from Redis.
        t0 = time.perf_counter()
        m = await asyncio.to_thread(scrape, port, 1, 120)
        res["metrics_after"] = {"seconds": time.perf_counter() - t0, "ok": bool(m),
                                **{k: v for k, v in m.items() if k.startswith(("dragoman_nodes{",
                                                                             "dragoman_reaped_total{"))}}

    async def _until_closed(self, port: int, timeout: float) -> int:
        """Until the scheduler has closed its side of every socket on ``port``: none left ESTABLISHED
        or CLOSE_WAIT (the peer gone, the scheduler not done yet)."""
        deadline = time.monotonic() + timeout
        n = server_sockets(port)
        while n and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            n = server_sockets(port)
        return n

    def _window(self, win: dict[str, Any], s0: list[dict[str, Any]], s1: list[dict[str, Any]]) -> dict[str, Any]:
        by_kind: dict[str, dict[str, Any]] = {}
        for a, b in zip(s0, s1, strict=True):
            k = by_kind.setdefault(b["kind"], {"sent": 0, "expected": 0, "answered": 0, "closed": 0, "errors": 0,
                                               "replies": []})
            for f in ("sent", "answered", "closed", "errors"):
                k[f] += b[f] - a[f]
            # node heartbeats have no reply of their own: the timed ones are those a ping followed
            k["expected"] += (b["pinged"] - a["pinged"]) if b["kind"] == "node" else (b["sent"] - a["sent"])
            k["replies"] += b["replies_ms"]
        for k in by_kind.values():
            k["reply_ms"] = summarize_ms([x / 1000 for x in k.pop("replies")])
        win["open"] = sum(b["open"] for b in s1)
        beats = sum(k["sent"] for k in by_kind.values())
        win["by_kind"] = by_kind
        win["heartbeats"] = beats
        win["heartbeats_per_s"] = beats / win["seconds"]
        return win


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    p, rss, st, q, e = res["profile"], res["rss_kb"], res["steady"], res["quiet"], res["empty"]
    sched = st["cpu"]["scheduler"]
    steady_cpu = sched["user_s"] + sched["sys_s"]
    quiet_cores = q["cpu"]["scheduler"]["cores"]
    beats = max(1, st["heartbeats"])
    # Redis work net of the quiet window's (timers: reaper, stats flush, process registration)
    calls = sum(st["calls"].values()) - sum(q["calls"].values()) / q["seconds"] * st["seconds"]
    usec = sum(st["usec"].values()) - sum(q["usec"].values()) / q["seconds"] * st["seconds"]
    node = st["by_kind"].get("node", {})
    sess = st["by_kind"].get("session", {})
    gens = {k: v["cores"] for k, v in st["cpu"].items() if k not in ("scheduler", "redis")}
    return {
        "rss_mb": {k: v / 1024 for k, v in rss.items()},
        "kb_per_session_socket": (rss["sessions"] - rss["empty"]) / max(1, p["sessions"]),
        "kb_per_node_socket": (rss["all_open"] - rss["sessions"]) / max(1, p["nodes"]),
        "kb_per_socket": (rss["all_open"] - rss["empty"]) / max(1, p["nodes"] + p["sessions"]),
        "kb_kept_per_socket_after_close": (rss["after_close"] - rss["empty"]) / max(1, p["nodes"] + p["sessions"]),
        "empty_cores": e["cpu"]["scheduler"]["cores"],
        "idle_cores": quiet_cores,
        "steady_cores": sched["cores"],
        "heartbeats_per_s": st["heartbeats_per_s"],
        "cpu_us_per_heartbeat_gross": steady_cpu / beats * 1e6,
        "cpu_us_per_heartbeat": max(0.0, steady_cpu - quiet_cores * st["seconds"]) / beats * 1e6,
        "redis_cmds_per_heartbeat": max(0.0, calls) / beats,
        "redis_usec_per_heartbeat": max(0.0, usec) / beats,
        "redis_cmds_per_s_idle": sum(q["calls"].values()) / q["seconds"],
        "redis_cores_steady": st["cpu"]["redis"]["cores"],
        "node_reply_ms": node.get("reply_ms"), "session_reply_ms": sess.get("reply_ms"),
        "unanswered": sum(k["expected"] - k["answered"] for k in st["by_kind"].values()),
        "closed_by_scheduler": sum(k["closed"] for k in st["by_kind"].values())
        + sum(k["closed"] for k in q["by_kind"].values()),
        "generator_cores": gens,
        "sockets_open_steady": st["open"],
        "registrations_failed": sum(r["failed"] for r in res["ready"]),
        "closed_by_scheduler_whole_run": sum(g["closed"] for g in res["generator_summaries"]),
        "error_frames_whole_run": sum(g["errors"] for g in res["generator_summaries"]),
        "first_error": next((g["first_error"] for g in res["generator_summaries"] if g["first_error"]), ""),
        "other_cores_steady": st["other_cores"],
    }


def run(profile: Profile | str = "full", logdir: Path | None = None, pyspy: Path | None = None) -> dict[str, Any]:
    """``pyspy``: also sample the scheduler with py-spy over the steady window (raw stacks to that
    file; the sampling costs the scheduler CPU of its own, so the figures of such a run run high)."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    logdir = logdir or new_logdir("idle")
    t0 = time.perf_counter()
    env = {**facts.machine(), "commit": facts.commit(), "loadavg_start": loadavg()}
    try:
        res = asyncio.run(Run(prof, logdir, pyspy).run())
    finally:
        Proc.kill_all_now()
    # the floor: as many sockets and frames per second, read by a server that ignores them
    res["floor"] = floor.measure(prof.nodes + prof.sessions, prof.heartbeat_s, prof.quiet_s)
    res["env"] = env
    res["elapsed_s"] = time.perf_counter() - t0
    res["logdir"] = str(logdir)
    return res
