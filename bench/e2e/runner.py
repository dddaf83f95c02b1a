"""The comparison itself: Dragoman end to end and the job-queue peers, alternating rounds, one Redis.

See the package docstring (``bench/e2e/__init__.py``) for what is measured and how to run it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import redis

from bench.e2e.procs import Proc, ctx_switches, loadavg, proc_times, system_busy_s
from bench.peers import install as peer_install

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / "bench" / "peers"

# Commands the runner itself issues on the shared server (never counted as a system's work).
_OWN_COMMANDS = {"info", "flushall", "config|resetstat", "ping", "client|setname", "client|setinfo", "hello"}
_SCRIPT_COMMANDS = {"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"}

ALL_SYSTEMS = ("dragoman", "bullmq", "arq10", "arq", "celery", "saq")
# Not in the default run: the same scheduler code with uvloop's event loop installed from outside
# (``dragoman serve`` runs uvicorn's Server.serve under asyncio.run, i.e. on asyncio's own loop).
EXPERIMENTS = ("dragoman-uvloop",)
KNOWN_SYSTEMS = ALL_SYSTEMS + EXPERIMENTS
PEER_PACKAGE = {"bullmq": "bullmq", "arq10": "arq", "arq": "arq", "celery": "celery", "saq": "saq"}
LABELS = {"dragoman": "Dragoman (2 WebSockets)", "dragoman-uvloop": "Dragoman, scheduler on uvloop (experiment)", "bullmq": "BullMQ", "arq10": "arq (poll 10 ms)",
          "arq": "arq (default, poll 0.5 s)", "celery": "Celery (threads pool)", "saq": "SAQ (apply, default)"}


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    warmup: float  # seconds before each window (each phase has its own)
    window: float  # seconds measured, per phase
    drain: float  # open loop: how long stragglers are waited for after the window
    rounds: int
    systems: tuple[str, ...]
    inflight: int = 50
    rate: float = 200.0
    # Dragoman: client sessions; utterances go to them round-robin. The scheduler's defaults limit
    # a session to 50 chunks/s and keep 100 sessions per API key: 100 sessions allow 5,000/s.
    sessions: int = 100
    # Dragoman: node sockets, each reporting max_concurrency = slots (32 x 4 = 128 slots for 50 in
    # flight); a node may send 200 messages/s by default, so 32 nodes allow 6,400 results/s.
    nodes: int = 32
    slots: int = 4
    install: bool = True  # install missing peers first (bench-only folders)
    # one extra Dragoman round with py-spy sampling the scheduler over the closed-loop window (its
    # figures are not in the table: the profiler perturbs them), for the CPU breakdown by component
    profile_scheduler: bool = False


FULL = Profile("full", warmup=2.0, window=5.0, drain=5.0, rounds=3, systems=ALL_SYSTEMS)
QUICK = Profile("quick", warmup=1.0, window=2.5, drain=3.0, rounds=1, systems=("dragoman", "bullmq", "arq10"))
PROFILES = {"full": FULL, "quick": QUICK}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------- measuring
class Meter:
    """Samples CPU (/proc) of the tracked processes, the machine's busy time and Redis INFO
    commandstats at each window edge a load program reports; turns the deltas into per-job figures."""

    def __init__(self, admin: redis.Redis, tracked: dict[str, int]) -> None:
        self.admin = admin
        self.tracked = dict(tracked)
        self._start: dict[str, dict[str, Any]] = {}
        self.windows: dict[str, dict[str, Any]] = {}
        self.on_start: Any = None  # called with the phase at each window start (the profiler hook)

    def _snap(self) -> dict[str, Any]:
        t = time.perf_counter()
        cpu = {role: proc_times(pid) for role, pid in self.tracked.items()}
        ctx = {role: ctx_switches(pid) for role, pid in self.tracked.items()}
        busy = system_busy_s()
        cmd = self.admin.info("commandstats")
        return {"t": t, "cpu": cpu, "ctx": ctx, "busy": busy, "cmd": cmd}

    def on_event(self, _proc: Proc, ev: dict[str, Any]) -> None:
        if ev.get("event") != "window":
            return
        phase = ev.get("phase", "?")
        if ev.get("edge") == "start":
            if self.on_start is not None:
                self.on_start(phase)
            self._start[phase] = self._snap()
        elif ev.get("edge") == "end" and phase in self._start:
            self.windows[phase] = self._delta(self._start.pop(phase), self._snap())

    @staticmethod
    def _delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        secs = b["t"] - a["t"]
        cpu = {}
        for role in a["cpu"]:
            (u0, s0), (u1, s1) = a["cpu"][role], b["cpu"][role]
            cpu[role] = {"user_s": u1 - u0, "sys_s": s1 - s0, "cores": (u1 - u0 + s1 - s0) / secs}
        ctx = {role: {"voluntary": b["ctx"][role][0] - a["ctx"][role][0],
                      "involuntary": b["ctx"][role][1] - a["ctx"][role][1]} for role in a["ctx"]}
        calls: dict[str, int] = {}
        usec: dict[str, int] = {}
        for key, stat in b["cmd"].items():
            name = key.removeprefix("cmdstat_")
            if name in _OWN_COMMANDS:
                continue
            before = a["cmd"].get(key, {"calls": 0, "usec": 0})
            dc, du = int(stat["calls"]) - int(before["calls"]), int(stat["usec"]) - int(before["usec"])
            if dc:
                calls[name], usec[name] = dc, du
        tracked_cores = sum(c["cores"] for c in cpu.values())
        busy_cores = (b["busy"] - a["busy"]) / secs
        return {"seconds": secs, "cpu": cpu, "ctx": ctx, "busy_cores": busy_cores,
                "other_cores": busy_cores - tracked_cores, "calls": calls, "usec": usec}


def per_job(res: dict[str, Any], win: dict[str, Any] | None) -> dict[str, Any]:
    """Combine a load program's phase result with the runner's window readings."""
    out = dict(res)
    if not win:
        return out
    if res.get("mode") == "idle":  # no jobs: CPU in cores, Redis calls per second
        out["window"] = win
        out["cpu_cores"] = {role: c["cores"] for role, c in win["cpu"].items()}
        out["redis_calls_per_s"] = {k: v / win["seconds"] for k, v in sorted(win["calls"].items(),
                                                                            key=lambda kv: -kv[1])}
        out["other_cores"] = win["other_cores"]
        return out
    jobs = max(1, int(res.get("completed", 0)))
    out["window"] = win
    out["cpu_us_per_job"] = {role: (c["user_s"] + c["sys_s"]) / jobs * 1e6 for role, c in win["cpu"].items()}
    out["cpu_cores"] = {role: c["cores"] for role, c in win["cpu"].items()}
    out["cpu_split_us_per_job"] = {role: {"user": c["user_s"] / jobs * 1e6, "sys": c["sys_s"] / jobs * 1e6}
                                   for role, c in win["cpu"].items()}
    out["ctx_per_job"] = {role: {k: v / jobs for k, v in c.items()} for role, c in win["ctx"].items()}
    calls, usec = win["calls"], win["usec"]
    out["redis_calls_per_job"] = sum(calls.values()) / jobs
    out["redis_script_calls_per_job"] = sum(v for k, v in calls.items() if k in _SCRIPT_COMMANDS) / jobs
    out["redis_calls_by_command"] = {k: v / jobs for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}
    out["redis_exec_us_per_job"] = {
        "scripts": sum(v for k, v in usec.items() if k in _SCRIPT_COMMANDS) / jobs,
        "all_commands": sum(usec.values()) / jobs}
    out["other_cores"] = win["other_cores"]
    out["busy_cores"] = win["busy_cores"]
    return out


# ----------------------------------------------------------------------------------------- systems
class Context:
    def __init__(self, profile: Profile, redis_url: str, redis_pid: int, logdir: Path) -> None:
        self.profile, self.redis_url, self.redis_pid, self.logdir = profile, redis_url, redis_pid, logdir
        self.admin = redis.Redis.from_url(redis_url, decode_responses=True)

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


async def _collect(submitter: Proc, meter: Meter, ctx: Context,
                   phases: tuple[str, ...] = ("closed", "open")) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in phases:
        ev = await submitter.next_event(("result",), ctx.phase_timeout)
        ev.pop("_recv", None)
        out[ev["phase"]] = per_job(ev, meter.windows.get(ev["phase"]))
    await submitter.wait(10)
    return out


async def _http_ok(url: str, timeout: float) -> None:
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


# Dragoman's rounds start with an idle window (every socket connected, no load): the scheduler's
# fixed cost, which the open loop's per-job CPU includes (spread over 200 jobs/s).
DRAGOMAN_PHASES = ("idle", "closed", "open")


def _pyspy() -> str | None:
    exe = peer_install.venv_dir("pyspy") / "bin" / "py-spy"
    return str(exe) if exe.exists() else None


_UVLOOP_MAIN = ("import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
                "sys.argv[0] = 'dragoman'; from dragoman.cli.main import main; main()")


async def run_dragoman(ctx: Context, rnd: int, spy_out: Path | None = None, uvloop: bool = False) -> dict[str, Any]:
    """One round of Dragoman. With ``spy_out``, py-spy samples the scheduler during the closed-loop
    window and writes collapsed stacks there. With ``uvloop``, the scheduler's asyncio.run gets
    uvloop's loop (an experiment: the code is the same)."""
    p = ctx.profile
    port = free_port()
    bindir = Path(sys.executable).parent
    dragoman = [shutil.which("dragoman", path=str(bindir)) or "dragoman"]
    if uvloop:
        dragoman = [sys.executable, "-c", _UVLOOP_MAIN]
    logf = ctx.logdir / f"dragoman{'-uvloop' if uvloop else ''}-r{rnd}.log"
    sched = Proc("scheduler", [*dragoman, "serve", "--redis-url", ctx.redis_url, "--host", "127.0.0.1",
                               "--port", str(port)], logf, cwd=ROOT)
    procs = [sched]
    try:
        await sched.start()
        await _http_ok(f"http://127.0.0.1:{port}/readyz", 60)
        nodes = Proc("nodes", [sys.executable, "-m", "bench.e2e.nodes", "--url", f"ws://127.0.0.1:{port}/ws/node",
                               "--nodes", str(p.nodes), "--slots", str(p.slots)], logf, cwd=ROOT)
        procs.append(nodes)
        await nodes.start()
        ready = await nodes.next_event(("ready",), 60)
        meter = Meter(ctx.admin, {"scheduler": sched.pid, "nodes": nodes.pid, "redis": ctx.redis_pid})
        spy: list[subprocess.Popen[bytes]] = []
        if spy_out is not None and _pyspy():
            def start_spy(phase: str) -> None:
                if phase == "closed" and not spy:
                    spy.append(subprocess.Popen(
                        [_pyspy(), "record", "--pid", str(sched.pid), "--duration", str(max(1, round(p.window))),
                         "--rate", "250", "--format", "raw", "--nonblocking", "--full-filenames",
                         "--output", str(spy_out)],
                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                        start_new_session=True))

            meter.on_start = start_spy
        sessions = Proc("sessions", [sys.executable, "-m", "bench.e2e.sessions", "--url",
                                     f"ws://127.0.0.1:{port}/ws/session", "--sessions", str(p.sessions),
                                     *ctx.load_args(DRAGOMAN_PHASES)], logf, cwd=ROOT, on_event=meter.on_event)
        procs.append(sessions)
        await sessions.start()
        meter.tracked["sessions"] = sessions.pid
        sready = await sessions.next_event(("ready",), 60)
        out = await _collect(sessions, meter, ctx, DRAGOMAN_PHASES)
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
                        "chunk_frame_bytes": sready.get("chunk_frame_bytes"),
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
        meter = Meter(ctx.admin, {"worker": worker.pid, "redis": ctx.redis_pid})
        sub = Proc(f"{system} submitter", [*sargv, *common, *ctx.load_args()], logf, env=env, cwd=PEERS_DIR,
                   on_event=meter.on_event)
        procs.append(sub)
        await sub.start()
        meter.tracked["submitter"] = sub.pid
        await sub.next_event(("ready",), 60)
        return await _collect(sub, meter, ctx)
    finally:
        for pr in reversed(procs):
            await pr.stop()


# ----------------------------------------------------------------------------------------- profile
_CATEGORIES = (  # (substring of a frame's file path, component), first match wins
    ("/dragoman/store/", "dragoman.store (Store calls, reply decoding)"),
    ("/dragoman/sessions/", "dragoman.sessions (session actor)"),
    ("/dragoman/core/", "dragoman.core (segmenter, orderer, audio)"),
    ("/dragoman/wire/", "dragoman.wire (message codec)"),
    ("/dragoman/app/", "dragoman.app (hub, sockets, links, metrics)"),
    ("/dragoman/", "dragoman (other)"),
    ("/redis/", "redis-py client"),
    ("/uvicorn/", "uvicorn (ASGI server, its WebSocket protocol)"),
    ("/websockets/", "websockets (frames)"),
    ("/starlette/", "starlette"),
    ("/structlog/", "logging"),
    ("/logging/", "logging"),
    ("/prometheus_client/", "prometheus metrics"),
    ("/asyncio/", "asyncio"),
    ("uvloop", "uvloop"),
    ("/msgspec/", "msgspec"),
    ("/json/", "json"),
    ("base64", "base64"),
)


def _frame_path(frame: str) -> tuple[str, str]:
    """'func (path:line)' -> (func, path)."""
    if frame.endswith(")") and " (" in frame:
        func, rest = frame[:-1].rsplit(" (", 1)
        return func, rest.rsplit(":", 1)[0]
    return frame, ""


def _category(path: str) -> str:
    for needle, name in _CATEGORIES:
        if needle in path:
            return name
    return "other: " + (Path(path).name or "?")


def _fn_name(func: str, path: str) -> str:
    if "/dragoman/" in path:
        return f"{path.split('/dragoman/', 1)[1].removesuffix('.py').replace('/', '.')}.{func}"
    return f"{_category(path)}: {func}"


def analyse_profile(raw_text: str, cpu_us_per_job: float) -> dict[str, Any]:
    """py-spy collapsed stacks (root first; only samples where the scheduler was running) -> shares
    of the scheduler's CPU, three ways:

    * ``self_by_component``: the innermost Python frame's package (its own time and the C code it
      calls, e.g. msgspec or hiredis);
    * ``by_task``: the coroutine or callback the event loop was running (a coroutine's outermost
      frame, or the frame right after asyncio's ``Handle._run``); samples in the loop's own code are
      "event loop (select, ready queue)";
    * ``inclusive_by_function``: each Dragoman function, counted once per sample it appears in
      (the entry point's frames below the event loop's ``run_forever`` left out).
    """
    total = 0
    self_by: dict[str, int] = {}
    incl: dict[str, int] = {}
    tasks: dict[str, int] = {}
    for line in raw_text.splitlines():
        if not line.strip():
            continue
        stack, _, count_s = line.rpartition(" ")
        try:
            count = int(count_s)
        except ValueError:
            continue
        frames = [_frame_path(f) for f in stack.split(";")]
        total += count
        cat = _category(frames[-1][1])
        self_by[cat] = self_by.get(cat, 0) + count
        seen = set()
        # frames below the event loop (the process's entry point down to run_forever) are not work
        loop_at = max((i for i, (func, path) in enumerate(frames)
                       if func.rsplit(".", 1)[-1] == "run_forever" and "asyncio" in path), default=-1)
        for func, path in frames[loop_at + 1:]:
            if "/dragoman/" in path:
                name = _fn_name(func, path)
                if name not in seen:
                    seen.add(name)
                    incl[name] = incl.get(name, 0) + count
        # py-spy names methods Class.method; a coroutine resumed by the C Task shows from its own
        # outermost frame, a callback from the loop below Handle._run
        runs = [i for i, (func, path) in enumerate(frames)
                if func.rsplit(".", 1)[-1] == "_run" and path.endswith("asyncio/events.py")]
        if runs and runs[-1] + 1 < len(frames):
            task = _fn_name(*frames[runs[-1] + 1])
        elif runs:
            task = "event loop (Handle._run itself)"
        elif frames[0][0] == "<module>":
            task = "event loop (select, ready queue)"
        else:
            task = _fn_name(*frames[0])
        tasks[task] = tasks.get(task, 0) + count
    if not total:
        return {"samples": 0}

    def table(d: dict[str, int], n: int) -> list[dict[str, Any]]:
        return [{"name": k, "share": v / total, "us_per_job": v / total * cpu_us_per_job}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]]

    return {"samples": total, "cpu_us_per_job": cpu_us_per_job, "self_by_component": table(self_by, 25),
            "by_task": table(tasks, 15), "inclusive_by_function": table(incl, 25)}


# ----------------------------------------------------------------------------------------- facts
def _cmd_out(argv: list[str], timeout: float = 20) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(systems: tuple[str, ...], installed: dict[str, Any]) -> dict[str, str]:
    import importlib.metadata as md

    v: dict[str, str] = {"python": platform.python_version()}
    for pkg in ("dragoman", "websockets", "uvicorn", "redis", "msgspec", "uvloop"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    v["node"] = _cmd_out(["node", "--version"])
    v["commit"] = _cmd_out(["git", "rev-parse", "--short", "HEAD"])
    for pkg, dists in (("arq", ("arq", "redis")), ("celery", ("celery", "kombu", "redis")), ("saq", ("saq", "redis"))):
        if pkg in installed and installed[pkg].get("ok"):
            code = f"import importlib.metadata as m;print(' '.join(m.version(d) for d in {dists!r}))"
            got = _cmd_out([str(peer_install.venv_python(pkg)), "-c", code]).split()
            for d, ver in zip(dists, got, strict=False):
                v[f"{pkg}:{d}" if d != pkg else pkg] = ver
    if "bullmq" in installed and installed["bullmq"].get("ok"):
        for d in ("bullmq", "ioredis"):
            try:
                v[d] = json.loads((peer_install.node_modules() / d / "package.json").read_text())["version"]
            except (OSError, ValueError, KeyError):
                pass
    return v


# ----------------------------------------------------------------------------------------- the run
def _median(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]  # drop nan
    return statistics.median(vals) if vals else float("nan")


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the rounds of every figure the table shows."""
    agg: dict[str, Any] = {"rounds": len(rounds)}
    idle = [r["idle"] for r in rounds if "idle" in r and "cpu_cores" in r["idle"]]
    if idle:
        roles = sorted({k for r in idle for k in r["cpu_cores"]})
        agg["idle"] = {"cpu_cores": {k: _median([r["cpu_cores"].get(k, float("nan")) for r in idle]) for k in roles},
                       "redis_calls_per_s": _median([sum(r["redis_calls_per_s"].values()) for r in idle]),
                       "other_cores": _median([r["other_cores"] for r in idle])}
    for phase in ("closed", "open"):
        rs = [r[phase] for r in rounds if phase in r]
        if not rs:
            continue
        a: dict[str, Any] = {
            "rate": _median([r["rate"] for r in rs]),
            "p50_ms": _median([r["latency_ms"]["p50"] for r in rs]),
            "p99_ms": _median([r["latency_ms"]["p99"] for r in rs]),
            "errors": sum(r.get("errors", 0) for r in rs),
            "lost": sum(r.get("lost", 0) for r in rs),
            "other_cores": _median([r.get("other_cores", float("nan")) for r in rs]),
            "per_round": [{"rate": r["rate"], "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
                           "other_cores": r.get("other_cores", float("nan"))} for r in rs],
            "gen_cpu_self": _median([r.get("gen_cpu", float("nan")) for r in rs]),
        }
        roles = sorted({k for r in rs for k in r.get("cpu_us_per_job", {})})

        def med(key: str, role: str, sub: str | None = None, rs: list[dict[str, Any]] = rs) -> float:
            vals = []
            for r in rs:
                v = r.get(key, {}).get(role)
                if v is not None and sub is not None:
                    v = v.get(sub)
                if v is not None:
                    vals.append(v)
            return _median(vals)

        a["cpu_us_per_job"] = {k: med("cpu_us_per_job", k) for k in roles}
        a["cpu_cores"] = {k: med("cpu_cores", k) for k in roles}
        a["cpu_split_us_per_job"] = {k: {s: med("cpu_split_us_per_job", k, s) for s in ("user", "sys")}
                                     for k in roles}
        a["ctx_per_job"] = {k: {s: med("ctx_per_job", k, s) for s in ("voluntary", "involuntary")} for k in roles}
        a["redis_calls_per_job"] = _median([r.get("redis_calls_per_job", float("nan")) for r in rs])
        a["redis_script_calls_per_job"] = _median([r.get("redis_script_calls_per_job", float("nan")) for r in rs])
        a["redis_exec_us_per_job"] = {k: _median([r["redis_exec_us_per_job"][k] for r in rs
                                                  if "redis_exec_us_per_job" in r]) for k in ("scripts", "all_commands")}
        cmds = sorted({c for r in rs for c in r.get("redis_calls_by_command", {})})
        by = {c: _median([r.get("redis_calls_by_command", {}).get(c, 0.0) for r in rs]) for c in cmds}
        a["redis_calls_by_command"] = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        agg[phase] = a
    return agg


async def _run(profile: Profile, logdir: Path) -> dict[str, Any]:
    from dragoman.embedded import EmbeddedServer

    t_start = time.perf_counter()
    res: dict[str, Any] = {"profile": dataclasses.asdict(profile), "skipped": {}, "systems": {}, "raw": {}}
    installed: dict[str, Any] = {}
    wanted = {PEER_PACKAGE[s] for s in profile.systems if s in PEER_PACKAGE}
    if wanted:
        t0 = time.perf_counter()
        if profile.install:
            log(f"installing/checking peers ({', '.join(sorted(wanted))}) in {peer_install.BENCH_HOME} ...")
            got = await asyncio.to_thread(peer_install.install, sorted(wanted))
        else:
            got = {pkg: peer_install.InstallResult(pkg, peer_install.is_installed(pkg), "", skipped=True,
                                                   error="" if peer_install.is_installed(pkg) else "not installed")
                   for pkg in wanted}
        installed = {k: dataclasses.asdict(v) for k, v in got.items()}
        res["install"] = {"seconds": time.perf_counter() - t0, "results": installed}
        for s in profile.systems:
            pkg = PEER_PACKAGE.get(s)
            if pkg and not installed.get(pkg, {}).get("ok"):
                res["skipped"][s] = f"{pkg} not installed: {installed.get(pkg, {}).get('error', '?')}"
                log(f"  skipping {s}: {res['skipped'][s]}")
    systems = [s for s in profile.systems if s not in res["skipped"]]

    with EmbeddedServer() as server:
        assert server.proc is not None
        admin = redis.Redis.from_url(server.url, decode_responses=True)
        info = admin.info("server")
        res["env"] = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "cpu_count": os.cpu_count(),
            "cpu_model": cpu_model(), "platform": platform.platform(), "loadavg_start": loadavg(),
            "server": f"valkey {info.get('valkey_version')}" if info.get("valkey_version")
            else f"redis {info.get('redis_version')}", "io_threads": info.get("io_threads_active", 0),
            "versions": versions(profile.systems, installed)}
        ctx = Context(profile, server.url, server.proc.pid, logdir)
        rounds: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
        errors: dict[str, list[str]] = {s: [] for s in systems}
        for rnd in range(1, profile.rounds + 1):
            for s in systems:
                admin.flushall()
                log(f"round {rnd}/{profile.rounds}: {s} ...")
                t0 = time.perf_counter()
                try:
                    r = await (run_dragoman(ctx, rnd, uvloop=s == "dragoman-uvloop") if s.startswith("dragoman")
                               else run_peer(ctx, s, rnd))
                except Exception as exc:  # noqa: BLE001 - one failed round of one system never stops the run
                    errors[s].append(f"round {rnd}: {exc!r}"[:600])
                    log(f"  {s} round {rnd} failed: {exc!r}"[:600])
                    continue
                r["elapsed_s"] = time.perf_counter() - t0
                rounds[s].append(r)
                c, o = r.get("closed", {}), r.get("open", {})
                log(f"  {s}: closed {c.get('rate', float('nan')):,.0f}/s, open p50/p99 "
                    f"{o.get('latency_ms', {}).get('p50', float('nan')):.2f}/"
                    f"{o.get('latency_ms', {}).get('p99', float('nan')):.2f} ms ({r['elapsed_s']:.0f} s)")
        if profile.profile_scheduler and "dragoman" in systems:
            if _pyspy() is None:
                got = await asyncio.to_thread(peer_install.install, ["pyspy"])
                if not got["pyspy"].ok:
                    res["profile_error"] = f"py-spy not installed: {got['pyspy'].error}"
            if _pyspy() is not None:
                admin.flushall()
                log("profiling the scheduler (extra Dragoman round, py-spy over the closed-loop window) ...")
                spy_out = logdir / "scheduler-pyspy.txt"
                try:
                    r = await run_dragoman(ctx, 0, spy_out=spy_out)
                    us = r["closed"]["cpu_us_per_job"]["scheduler"]
                    res["scheduler_profile"] = {
                        "closed_rate": r["closed"]["rate"], "scheduler_cpu_us_per_job": us,
                        **analyse_profile(spy_out.read_text() if spy_out.exists() else "", us)}
                except Exception as exc:  # noqa: BLE001 - the profile is a diagnostic
                    res["profile_error"] = repr(exc)[:500]
        admin.flushall()
        admin.close()
        ctx.admin.close()
    for s in systems:
        res["raw"][s] = rounds[s]
        if rounds[s]:
            res["systems"][s] = aggregate(rounds[s])
            if errors[s]:
                res["systems"][s]["failed_rounds"] = errors[s]
        else:
            res["skipped"][s] = "every round failed: " + "; ".join(errors[s])
    res["analysis"] = analyse(res)
    res["env"]["loadavg_end"] = loadavg()
    res["elapsed_s"] = time.perf_counter() - t_start
    res["logdir"] = str(logdir)
    return res


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    s = res["systems"]
    a: dict[str, Any] = {}
    d = s.get("dragoman")
    if not d:
        return a

    def rate(name: str) -> float | None:
        return s[name]["closed"]["rate"] if name in s and "closed" in s[name] else None

    def per_round(name: str) -> list[float]:
        """Dragoman's closed rate / the peer's, round by round (adjacent in time, so alike in noise)."""
        ds, ps = d["closed"]["per_round"], s[name]["closed"]["per_round"]
        return [x["rate"] / y["rate"] for x, y in zip(ds, ps, strict=False) if y["rate"]]

    for peer in ("bullmq", "arq10"):
        if rate(peer):
            a[f"closed_vs_{peer}_rounds"] = per_round(peer)
            a[f"closed_vs_{peer}_rounds_median"] = _median(per_round(peer))
    if rate("bullmq"):
        a["closed_vs_bullmq"] = d["closed"]["rate"] / rate("bullmq")
        a["closed_ge_bullmq"] = a["closed_vs_bullmq"] >= 1.0
        a["open_p99_vs_bullmq"] = d["open"]["p99_ms"] / s["bullmq"]["open"]["p99_ms"]
        a["open_p99_le_bullmq"] = d["open"]["p99_ms"] <= s["bullmq"]["open"]["p99_ms"]
    if rate("arq10"):
        a["closed_vs_arq10"] = d["closed"]["rate"] / rate("arq10")
        a["closed_ge_2x_arq10"] = a["closed_vs_arq10"] >= 2.0
    for phase in ("closed", "open"):
        us = d[phase]["cpu_us_per_job"].get("scheduler", float("nan"))
        a[f"scheduler_cpu_us_per_job_{phase}"] = us
        a[f"scheduler_cpu_le_400us_{phase}"] = us <= 400
    return a


def run_comparison(profile: Profile | str = "full", logdir: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the whole comparison and return every figure as a dict (``summary(res)`` prints it,
    ``markdown(res)`` makes a page section). ``profile``: ``"full"``, ``"quick"`` or a Profile;
    ``overrides``: Profile fields (e.g. ``rounds=1``, ``systems=("dragoman", "bullmq")``)."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if overrides:
        prof = dataclasses.replace(prof, **overrides)
    if logdir is None:
        logdir = ROOT / ".bench" / "logs" / time.strftime("%Y%m%d-%H%M%S")
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_run(prof, logdir))
    finally:
        Proc.kill_all_now()


# ----------------------------------------------------------------------------------------- output
def _f(x: float | None, nd: int = 0) -> str:
    if x is None or x != x:
        return "-"
    return f"{x:,.{nd}f}"


def _roles(name: str) -> tuple[str, str]:
    """(server-side role, client-side roles) for the CPU columns."""
    return ("scheduler", "nodes+sessions") if name.startswith("dragoman") else ("worker", "submitter")


def _cpu(a: dict[str, Any], roles: str) -> float:
    return sum(a["cpu_us_per_job"].get(r, 0.0) for r in roles.split("+"))


def table_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name in KNOWN_SYSTEMS:
        a = res["systems"].get(name)
        if not a:
            continue
        c, o = a["closed"], a["open"]
        server, clients = _roles(name)
        rows.append([LABELS[name], _f(c["rate"]), _f(c["p50_ms"], 1), _f(c["p99_ms"], 1), _f(o["p50_ms"], 2),
                     _f(o["p99_ms"], 2), _f(_cpu(c, server)), _f(_cpu(c, clients)), _f(_cpu(c, "redis")),
                     _f(c["redis_calls_per_job"], 1), _f(_cpu(o, server)), _f(_cpu(o, "redis")),
                     f"{c['other_cores']:.2f}/{o['other_cores']:.2f}"])
    return rows


HEAD = ["system", "closed jobs/s", "closed p50 ms", "p99 ms", "open p50 ms", "open p99 ms",
        "server CPU µs/job", "load-gen CPU µs/job", "Redis CPU µs/job", "Redis calls/job",
        "open: server µs/job", "open: Redis µs/job", "other CPU (cores)"]


def summary(res: dict[str, Any]) -> str:
    p, env = res["profile"], res["env"]
    lines = [f"Dragoman end to end vs job-queue peers ({p['name']}: {p['inflight']} in flight closed loop, open loop "
             f"{p['rate']:.0f}/s; {p['window']:.1f} s windows after {p['warmup']:.1f} s warm-up; median of "
             f"{p['rounds']} round(s); {env['server']}, {env['cpu_count']} CPUs, load {env['loadavg_start']} -> "
             f"{env.get('loadavg_end', '?')})"]
    rows = [HEAD] + table_rows(res)
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    for k, r in enumerate(rows):
        lines.append("  " + "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)))
        if k == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    lines.append("  server = Dragoman's scheduler process / the peer's worker process; load-gen = Dragoman's node "
                 "and session programs / the peer's submitter (its client library).")
    spread = []
    for name in KNOWN_SYSTEMS:
        a = res["systems"].get(name)
        if a and len(a["closed"]["per_round"]) > 1:
            rates = [r["rate"] for r in a["closed"]["per_round"]]
            spread.append(f"{name} {min(rates):,.0f}-{max(rates):,.0f}")
    if spread:
        lines.append("  closed jobs/s over the rounds (min-max): " + ", ".join(spread))
    others = [a[ph]["other_cores"] for a in res["systems"].values() for ph in ("closed", "open")]
    busy = _median(others) if others else float("nan")
    if busy > 0.3:
        lines.append(f"  NOTE: other processes used {busy:.2f} cores (median over the windows) of this machine's "
                     f"{res['env']['cpu_count']}: every figure here is depressed and noisy; compare within a round")
    a = res["analysis"]
    if "closed_vs_bullmq" in a:
        lines.append(f"  Dragoman/BullMQ closed loop {a['closed_vs_bullmq']:.2f}x (target >= 1: "
                     f"{'PASS' if a['closed_ge_bullmq'] else 'MISS'}); open p99 {a['open_p99_vs_bullmq']:.2f}x of "
                     f"BullMQ's (target <= 1: {'PASS' if a['open_p99_le_bullmq'] else 'MISS'})")
    if "closed_vs_arq10" in a:
        lines.append(f"  Dragoman/arq10 closed loop {a['closed_vs_arq10']:.2f}x (target >= 2: "
                     f"{'PASS' if a['closed_ge_2x_arq10'] else 'MISS'})")
    for peer in ("bullmq", "arq10"):
        rr = a.get(f"closed_vs_{peer}_rounds")
        if rr and len(rr) > 1:
            lines.append(f"  Dragoman/{peer} closed loop round by round: {', '.join(f'{x:.2f}' for x in rr)} "
                         f"(median {a[f'closed_vs_{peer}_rounds_median']:.2f}x)")
    if "scheduler_cpu_us_per_job_closed" in a:
        lines.append(f"  scheduler CPU per job: closed {a['scheduler_cpu_us_per_job_closed']:.0f} µs, open "
                     f"{a['scheduler_cpu_us_per_job_open']:.0f} µs (target <= 400: "
                     f"{'PASS' if a['scheduler_cpu_le_400us_closed'] and a['scheduler_cpu_le_400us_open'] else 'MISS'})")
    d = res["systems"].get("dragoman")
    if d and "idle" in d:
        ic = d["idle"]["cpu_cores"]
        lines.append(f"  dragoman idle (all sockets open, no load): scheduler {ic.get('scheduler', 0):.3f} cores, "
                     f"Redis {ic.get('redis', 0):.3f} cores, {d['idle']['redis_calls_per_s']:.0f} Redis calls/s; "
                     f"at {p['rate']:.0f} jobs/s that fixed cost is {ic.get('scheduler', 0) / p['rate'] * 1e6:.0f} "
                     "µs/job of the scheduler's open-loop figure")
    if d:
        for phase in ("closed", "open"):
            x = d[phase]
            sp, cx = x["cpu_split_us_per_job"].get("scheduler", {}), x["ctx_per_job"].get("scheduler", {})
            top = ", ".join(f"{k} {v:.1f}" for k, v in list(x["redis_calls_by_command"].items())[:8])
            lines.append(f"  dragoman {phase}: scheduler user {_f(sp.get('user'))} + sys {_f(sp.get('sys'))} µs/job, "
                         f"{cx.get('voluntary', float('nan')):.1f} voluntary ctx switches/job; nodes "
                         f"{_f(x['cpu_us_per_job'].get('nodes'))} + sessions {_f(x['cpu_us_per_job'].get('sessions'))} "
                         f"µs/job ({x['cpu_cores'].get('nodes', 0) + x['cpu_cores'].get('sessions', 0):.2f} cores); "
                         f"Redis: {x['redis_calls_per_job']:.1f} calls/job ({x['redis_script_calls_per_job']:.1f} "
                         f"scripts, {x['redis_exec_us_per_job']['scripts']:.0f} µs in scripts): {top}")
    prof = res.get("scheduler_profile")
    if prof and prof.get("samples"):
        lines.append(f"  scheduler profile (extra round under py-spy: {prof['closed_rate']:,.0f} jobs/s, "
                     f"{prof['scheduler_cpu_us_per_job']:.0f} µs/job, {prof['samples']} samples), µs/job by component "
                     "(innermost Python frame): " + ", ".join(
                         f"{x['name']} {x['us_per_job']:.0f}" for x in prof["self_by_component"][:12]))
        lines.append("    inclusive, by Dragoman function: " + ", ".join(
            f"{x['name']} {x['us_per_job']:.0f}" for x in prof["inclusive_by_function"][:12]))
        lines.append("    by task the event loop was running: " + ", ".join(
            f"{x['name']} {x['us_per_job']:.0f}" for x in prof["by_task"][:8]))
    elif res.get("profile_error"):
        lines.append(f"  scheduler profile failed: {res['profile_error']}")
    for s, why in res["skipped"].items():
        lines.append(f"  skipped {s}: {why}")
    for s, a2 in res["systems"].items():
        for e in a2.get("failed_rounds", []):
            lines.append(f"  {s} failed {e}")
        errs = a2["closed"]["errors"] + a2["open"]["errors"] + a2["open"]["lost"]
        if errs:
            lines.append(f"  {s}: {errs} failed or lost jobs in the windows")
    v = res["env"]["versions"]
    lines.append("  versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val))
    if "install" in res:
        lines.append(f"  peers installed/checked in {res['install']['seconds']:.1f} s (bench-only: .bench/); "
                     f"logs in {res.get('logdir')}")
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    """A Markdown section (for docs/benchmarks.md) with the table and the Dragoman breakdown."""
    p, env = res["profile"], res["env"]
    L = ["## End to end vs job-queue peers", "",
         f"One run, one {env['server']} on {env['cpu_count']} CPUs ({env['cpu_model']}), load "
         f"{env['loadavg_start']} at the start. Each system does the same no-op job with {p['inflight']} in flight "
         f"(closed loop, {p['window']:.0f} s window after {p['warmup']:.0f} s warm-up), then {p['rate']:.0f} jobs/s "
         f"(open loop, latency of the jobs started in the window); rounds alternate between systems "
         f"({p['rounds']} rounds, medians). Dragoman: `dragoman serve` as its own process, {p['nodes']} node "
         f"sockets answering every `job_assign` at once and {p['sessions']} sessions sending one 256 ms Opus chunk "
         f"with `is_final` per utterance, from separate processes. CPU from /proc over each window.", "",
         "| " + " | ".join(HEAD) + " |", "|---|" + "---:|" * (len(HEAD) - 1)]
    L += ["| " + " | ".join(r) + " |" for r in table_rows(res)]
    L += ["", "Each round (the spread shows the machine's noise; *other CPU* is what other processes used):", "",
          "| system | round | closed jobs/s | closed p99 ms | open p50 ms | open p99 ms | other CPU closed/open |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for name in KNOWN_SYSTEMS:
        a = res["systems"].get(name)
        if not a:
            continue
        for i, (c, o) in enumerate(zip(a["closed"]["per_round"], a["open"]["per_round"], strict=False), 1):
            L.append(f"| {LABELS[name]} | {i} | {_f(c['rate'])} | {_f(c['p99_ms'], 1)} | {_f(o['p50_ms'], 2)} | "
                     f"{_f(o['p99_ms'], 2)} | {c['other_cores']:.2f}/{o['other_cores']:.2f} |")
    L += ["", "```", summary(res), "```", ""]
    return "\n".join(L)
