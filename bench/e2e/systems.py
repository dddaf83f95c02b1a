"""One round of one system: Dragoman through both WebSockets, or a job-queue peer, on a given Redis.

* ``run_dragoman``: ``dragoman serve`` as its own process group (with ``--workers N``: the parent
  and its workers, CPU summed over the group), then ``bench.e2e.nodes`` and ``bench.e2e.sessions``
  as two more processes speaking the wire protocol; a ``DragomanSpec`` says how the scheduler is
  started (workers, uvloop experiment, environment such as ``DRAGOMAN_REDIS_MIN_REPLICAS_ACK``)
  and which phases run.
* ``run_peer``: the peer's worker process, then its submitter (``bench/peers/``).

Either way the load program drives the phases (``bench/peers/loadgen.py``) and a ``Meter`` samples
CPU and Redis at each window edge; the result is one dict per phase, per job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from bench.e2e import pyspy
from bench.e2e.facts import dragoman_argv
from bench.e2e.meter import Meter, per_job
from bench.e2e.procs import Proc
from bench.peers import install as peer_install
from chaos.audit import quiesce

if TYPE_CHECKING:
    from bench.e2e.runner import Profile

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / "bench" / "peers"
PEER_PACKAGE = {"bullmq": "bullmq", "arq10": "arq", "arq": "arq", "celery": "celery", "saq": "saq"}


@dataclasses.dataclass(frozen=True)
class DragomanSpec:
    """How one Dragoman system is started and driven."""

    workers: int | None = None  # ``serve --workers N``; None: the plain ``dragoman serve``
    uvloop: bool = False  # experiment: uvloop's loop installed from outside (the code is the same)
    env: tuple[tuple[str, str], ...] = ()  # extra environment of the scheduler (DRAGOMAN_* settings)
    # Each round starts with an idle window (every socket connected, no load): the scheduler's fixed
    # cost, which the open loop's per-job CPU includes (spread over 200 jobs/s).
    phases: tuple[str, ...] = ("idle", "closed", "open")


class Context:
    """Where a round runs: the load profile, the Redis URL the systems get, the pid(s) of its data
    server(s) (CPU), and a direct client of the primary (commandstats)."""

    def __init__(self, profile: Profile, redis_url: str, redis_pid: int, logdir: Path,
                 admin_url: str | None = None, extra_pids: dict[str, int] | None = None) -> None:
        self.profile, self.redis_url, self.redis_pid, self.logdir = profile, redis_url, redis_pid, logdir
        self.admin_url = admin_url or redis_url  # a plain redis:// URL of the primary (never a Sentinel one)
        self.admin = redis.Redis.from_url(self.admin_url, decode_responses=True)
        self.extra_pids = dict(extra_pids or {})

    def server_pids(self) -> dict[str, int]:
        return {"redis": self.redis_pid, **self.extra_pids}

    def load_args(self, phases: tuple[str, ...] = ("closed", "open")) -> list[str]:
        p = self.profile
        return ["--inflight", str(p.inflight), "--rate", str(p.rate), "--warmup", str(p.warmup),
                "--window", str(p.window), "--drain", str(p.drain), "--phases", ",".join(phases),
                "--idle-window", str(self.idle_window)]

    @property
    def idle_window(self) -> float:
        return max(1.0, self.profile.window / 2)

    @property
    def phase_timeout(self) -> float:
        p = self.profile
        return p.warmup + p.window + p.drain + 60

    def close(self) -> None:
        self.admin.close()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _collect(submitter: Proc, meter: Meter, ctx: Context, phases: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in phases:
        ev = await submitter.next_event(("result",), ctx.phase_timeout)
        ev.pop("_recv", None)
        out[ev["phase"]] = per_job(ev, meter.windows.get(ev["phase"]))
    await submitter.wait(10)
    return out


async def http_ok(url: str, timeout: float) -> None:
    """Until ``url`` answers 200 (polled every 0.1 s), or TimeoutError."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            def get() -> int:
                with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 - loopback only
                    return int(r.status)

            if await asyncio.to_thread(get) == 200:
                return
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = repr(exc)
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} not ready in {timeout:.0f} s ({last})")


def listeners(port: int) -> int:
    """Listening TCP sockets on a loopback port (/proc/net/tcp): N with SO_REUSEPORT and N workers."""
    n = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if len(parts) > 3 and parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n


async def wait_listeners(port: int, want: int, timeout: float) -> int:
    """Until ``want`` sockets listen on ``port`` (each worker's own, with SO_REUSEPORT), or the time is
    up (a design with one shared socket never shows more than one): the count seen."""
    deadline = time.monotonic() + timeout
    n = listeners(port)
    while n < want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        n = listeners(port)
    return n


_UVLOOP_MAIN = ("import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
                "sys.argv[0] = 'dragoman'; from dragoman.cli.main import main; main()")


async def _audit(url: str, bound_s: float = 15.0) -> dict[str, Any]:
    """After the load (nodes still connected): every slot given back (I1) and every job ended (I3),
    read from Redis by ``chaos.audit`` (waiting up to ``bound_s`` for the last acknowledgements)."""
    rc = aioredis.Redis.from_url(url)
    try:
        result, waited = await quiesce(rc, bound_s)
    finally:
        await rc.aclose()
    return {"nodes": result.nodes, "slots_held": result.leaked, "violations": result.violations[:5],
            "jobs_not_ended": result.non_terminal, "error": result.error, "clean": result.clean,
            "waited_s": round(waited, 2)}


async def run_dragoman(ctx: Context, rnd: int, spec: DragomanSpec = DragomanSpec(), name: str = "dragoman",
                       spy_out: Path | None = None) -> dict[str, Any]:
    """One round of Dragoman. With ``spy_out``, py-spy samples the scheduler during the closed-loop
    window and writes collapsed stacks there."""
    p = ctx.profile
    port = free_port()
    argv = [sys.executable, "-c", _UVLOOP_MAIN] if spec.uvloop else dragoman_argv()
    argv += ["serve", "--redis-url", ctx.redis_url, "--host", "127.0.0.1", "--port", str(port)]
    if spec.workers is not None:
        argv += ["--workers", str(spec.workers)]
    logf = ctx.logdir / f"{name}-r{rnd}.log"
    sched = Proc("scheduler", argv, logf, env=dict(spec.env), cwd=ROOT)
    procs = [sched]
    try:
        await sched.start()
        await http_ok(f"http://127.0.0.1:{port}/readyz", 60)
        listening = await wait_listeners(port, spec.workers or 1, 15)
        nodes = Proc("nodes", [sys.executable, "-m", "bench.e2e.nodes", "--url", f"ws://127.0.0.1:{port}/ws/node",
                               "--nodes", str(p.nodes), "--slots", str(p.slots)], logf, cwd=ROOT)
        procs.append(nodes)
        await nodes.start()
        ready = await nodes.next_event(("ready",), 60)
        meter = Meter(ctx.admin, {"scheduler": sched.pid, "nodes": nodes.pid, **ctx.server_pids()},
                      groups=("scheduler",))
        spy: list[subprocess.Popen[bytes]] = []
        if spy_out is not None and pyspy.pyspy_exe():
            def start_spy(phase: str) -> None:
                if phase == spec.phases[0] and not spy:
                    spy.append(pyspy.start_record(sched.pid, p.window, spy_out))

            meter.on_start = start_spy
        sessions = Proc("sessions", [sys.executable, "-m", "bench.e2e.sessions", "--url",
                                     f"ws://127.0.0.1:{port}/ws/session", "--sessions", str(p.sessions),
                                     *ctx.load_args(spec.phases)], logf, cwd=ROOT, on_event=meter.on_event)
        procs.append(sessions)
        await sessions.start()
        meter.tracked["sessions"] = sessions.pid
        sready = await sessions.next_event(("ready",), 60)
        out = await _collect(sessions, meter, ctx, spec.phases)
        out["audit"] = await _audit(ctx.admin_url)
        for sp in spy:
            try:
                await asyncio.to_thread(sp.wait, p.window + 30)
            except subprocess.TimeoutExpired:
                sp.kill()
                sp.wait()
        await nodes.stop()
        summary = None
        while not nodes.events.empty():
            ev = nodes.events.get_nowait()
            if ev.get("event") == "summary":
                summary = ev
        out["setup"] = {"nodes": ready.get("nodes"), "node_register_s": ready.get("register_s"),
                        "sessions": sready.get("sessions"), "chunk_payload_bytes": sready.get("payload_bytes"),
                        "chunk_frame_bytes": sready.get("chunk_frame_bytes"), "listening_sockets": listening,
                        "scheduler_argv": " ".join(argv[1:] if not spec.uvloop else argv[3:]),
                        "node_summary": {k: summary.get(k) for k in ("answered", "errors", "cancels", "first_error")}
                        if summary else None}
        return out
    finally:
        for pr in reversed(procs):
            await pr.stop()
        out_lines = logf.read_text(errors="replace").splitlines() if logf.exists() else []
        bad = [ln for ln in out_lines if "Traceback" in ln or "[error" in ln or "[warning" in ln]
        if bad:
            log(f"    scheduler log has {len(bad)} warning/error lines, e.g. {bad[0][:200]} ({logf})")


def peer_argv(system: str, role: str) -> tuple[list[str], dict[str, str]]:
    if system == "bullmq":
        node = shutil.which("node") or "node"
        env = {"NODE_PATH": str(peer_install.node_modules())}
        return [node, str(PEERS_DIR / "bullmq_peer.cjs"), role], env
    pkg = PEER_PACKAGE[system]
    argv = [str(peer_install.venv_python(pkg)), str(PEERS_DIR / f"{pkg}_peer.py"), role]
    if system == "arq10":
        argv += ["--poll-delay", "0.01"]
    elif system == "arq":
        argv += ["--poll-delay", "0.5"]
    return argv, {}


async def run_peer(ctx: Context, system: str, rnd: int) -> dict[str, Any]:
    logf = ctx.logdir / f"{system}-r{rnd}.log"
    wargv, env = peer_argv(system, "worker")
    sargv, _ = peer_argv(system, "submit")
    common = ["--redis-url", ctx.redis_url]
    worker = Proc(f"{system} worker", [*wargv, *common, "--inflight", str(ctx.profile.inflight)], logf, env=env,
                  cwd=PEERS_DIR)
    procs = [worker]
    try:
        await worker.start()
        await worker.next_event(("ready",), 60)
        meter = Meter(ctx.admin, {"worker": worker.pid, **ctx.server_pids()})
        sub = Proc(f"{system} submitter", [*sargv, *common, *ctx.load_args()], logf, env=env, cwd=PEERS_DIR,
                   on_event=meter.on_event)
        procs.append(sub)
        await sub.start()
        meter.tracked["submitter"] = sub.pid
        await sub.next_event(("ready",), 60)
        return await _collect(sub, meter, ctx, ("closed", "open"))
    finally:
        for pr in reversed(procs):
            await pr.stop()
