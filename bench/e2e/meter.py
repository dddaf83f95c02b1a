"""What one measurement window cost: CPU of each process (/proc), the machine's busy time, Redis work.

A load program prints ``{"event": "window", "phase": P, "edge": "start"|"end"}`` at the edges of
each measured window; ``Meter.on_event`` samples, at each edge:

* CPU seconds (user, system) of every tracked process from ``/proc/<pid>/stat``; a role can be a
  whole process group (``dragoman serve --workers N``: the parent and its N workers), summed, with
  each process's share kept to tell whether one of them was saturated;
* voluntary / involuntary context switches (``/proc/<pid>/status``);
* the machine's busy CPU seconds (``/proc/stat``), so what *other* processes used is known;
* Redis ``INFO commandstats`` (calls and server-side µs by command, commands issued from Lua
  included; the runner's own INFO/FLUSHALL/... left out).

``per_job`` divides the deltas by the jobs the load program completed in the window;
``aggregate`` takes the median of every figure over the rounds; ``limit`` says which resource was
saturated (the machine's cores, Redis's one core, a scheduler process's core, a load generator).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import redis

from bench.e2e.procs import Proc, ctx_switches, group_times, proc_times, system_busy_s

# Commands the runner itself issues on the shared server (never counted as a system's work).
OWN_COMMANDS = {"info", "flushall", "config|resetstat", "ping", "client|setname", "client|setinfo", "hello"}
SCRIPT_COMMANDS = {"evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro"}
SATURATED = 0.85  # cores: a single-threaded process at or above this was the limit


def median(vals: list[float]) -> float:
    vals = [v for v in vals if v == v]  # drop nan
    return statistics.median(vals) if vals else float("nan")


class Meter:
    """Samples the tracked processes and Redis at each window edge a load program reports.

    ``tracked``: role -> pid; roles in ``groups`` are process-group leaders whose whole group is
    summed. ``admin``: a client of the Redis server whose commandstats count (the primary)."""

    def __init__(self, admin: redis.Redis, tracked: dict[str, int], groups: tuple[str, ...] = ()) -> None:
        self.admin = admin
        self.tracked = dict(tracked)
        self.groups = set(groups)
        self._start: dict[str, dict[str, Any]] = {}
        self.windows: dict[str, dict[str, Any]] = {}
        self.on_start: Any = None  # called with the phase at each window start (the profiler hook)

    def _cpu(self) -> dict[str, dict[int, tuple[float, float]]]:
        return {role: group_times(pid) if role in self.groups else {pid: proc_times(pid)}
                for role, pid in self.tracked.items()}

    def snap(self) -> dict[str, Any]:
        t = time.perf_counter()
        cpu = self._cpu()
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
            self._start[phase] = self.snap()
        elif ev.get("edge") == "end" and phase in self._start:
            self.windows[phase] = delta(self._start.pop(phase), self.snap())


def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """The cost of the window between two snapshots."""
    secs = b["t"] - a["t"]
    cpu = {}
    for role, procs0 in a["cpu"].items():
        procs1 = b["cpu"].get(role, {})
        per_proc = []
        u = s = 0.0
        for pid, (u1, s1) in procs1.items():
            u0, s0 = procs0.get(pid, (0.0, 0.0))  # a process born inside the window: all of its CPU
            if u1 == u1 and u0 == u0:
                u, s = u + u1 - u0, s + s1 - s0
                per_proc.append((u1 - u0 + s1 - s0) / secs)
        cpu[role] = {"user_s": u, "sys_s": s, "cores": (u + s) / secs, "procs": len(per_proc),
                     "max_proc_cores": max(per_proc, default=0.0)}
    ctx = {role: {"voluntary": b["ctx"][role][0] - a["ctx"][role][0],
                  "involuntary": b["ctx"][role][1] - a["ctx"][role][1]} for role in a["ctx"]}
    calls: dict[str, int] = {}
    usec: dict[str, int] = {}
    for key, stat in b["cmd"].items():
        name = key.removeprefix("cmdstat_")
        if name in OWN_COMMANDS:
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
    out["window"] = win
    out["cpu_cores"] = {role: c["cores"] for role, c in win["cpu"].items()}
    out["max_proc_cores"] = {role: c["max_proc_cores"] for role, c in win["cpu"].items()}
    out["procs"] = {role: c["procs"] for role, c in win["cpu"].items()}
    out["other_cores"] = win["other_cores"]
    out["busy_cores"] = win["busy_cores"]
    if res.get("mode") == "idle":  # no jobs: CPU in cores, Redis calls per second
        out["redis_calls_per_s"] = {k: v / win["seconds"] for k, v in sorted(win["calls"].items(),
                                                                            key=lambda kv: -kv[1])}
        return out
    jobs = max(1, int(res.get("completed", 0)))
    out["cpu_us_per_job"] = {role: (c["user_s"] + c["sys_s"]) / jobs * 1e6 for role, c in win["cpu"].items()}
    out["cpu_split_us_per_job"] = {role: {"user": c["user_s"] / jobs * 1e6, "sys": c["sys_s"] / jobs * 1e6}
                                   for role, c in win["cpu"].items()}
    out["ctx_per_job"] = {role: {k: v / jobs for k, v in c.items()} for role, c in win["ctx"].items()}
    calls, usec = win["calls"], win["usec"]
    out["redis_calls_per_job"] = sum(calls.values()) / jobs
    out["redis_script_calls_per_job"] = sum(v for k, v in calls.items() if k in SCRIPT_COMMANDS) / jobs
    out["redis_calls_by_command"] = {k: v / jobs for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}
    out["redis_exec_us_per_job"] = {
        "scripts": sum(v for k, v in usec.items() if k in SCRIPT_COMMANDS) / jobs,
        "all_commands": sum(usec.values()) / jobs}
    out["redis_usec_by_command"] = {k: v / jobs for k, v in sorted(usec.items(), key=lambda kv: -kv[1])}
    return out


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the rounds of every figure the tables show."""
    agg: dict[str, Any] = {"rounds": len(rounds)}
    idle = [r["idle"] for r in rounds if "idle" in r and "cpu_cores" in r["idle"]]
    if idle:
        roles = sorted({k for r in idle for k in r["cpu_cores"]})
        agg["idle"] = {"cpu_cores": {k: median([r["cpu_cores"].get(k, float("nan")) for r in idle]) for k in roles},
                       "redis_calls_per_s": median([sum(r["redis_calls_per_s"].values()) for r in idle]),
                       "other_cores": median([r["other_cores"] for r in idle])}
    for phase in ("closed", "open"):
        rs = [r[phase] for r in rounds if phase in r]
        if not rs:
            continue
        a: dict[str, Any] = {
            "rate": median([r["rate"] for r in rs]),
            "p50_ms": median([r["latency_ms"]["p50"] for r in rs]),
            "p99_ms": median([r["latency_ms"]["p99"] for r in rs]),
            "errors": sum(r.get("errors", 0) for r in rs),
            "lost": sum(r.get("lost", 0) for r in rs),
            "other_cores": median([r.get("other_cores", float("nan")) for r in rs]),
            "busy_cores": median([r.get("busy_cores", float("nan")) for r in rs]),
            "per_round": [{"rate": r["rate"], "p50_ms": r["latency_ms"]["p50"], "p99_ms": r["latency_ms"]["p99"],
                           "other_cores": r.get("other_cores", float("nan"))} for r in rs],
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
            return median(vals)

        for key in ("cpu_us_per_job", "cpu_cores", "max_proc_cores", "procs"):
            a[key] = {k: med(key, k) for k in roles}
        a["cpu_split_us_per_job"] = {k: {s: med("cpu_split_us_per_job", k, s) for s in ("user", "sys")}
                                     for k in roles}
        a["ctx_per_job"] = {k: {s: med("ctx_per_job", k, s) for s in ("voluntary", "involuntary")} for k in roles}
        a["redis_calls_per_job"] = median([r.get("redis_calls_per_job", float("nan")) for r in rs])
        a["redis_script_calls_per_job"] = median([r.get("redis_script_calls_per_job", float("nan")) for r in rs])
        a["redis_exec_us_per_job"] = {k: median([r["redis_exec_us_per_job"][k] for r in rs
                                                 if "redis_exec_us_per_job" in r]) for k in ("scripts", "all_commands")}
        for key in ("redis_calls_by_command", "redis_usec_by_command"):
            names = sorted({c for r in rs for c in r.get(key, {})})
            by = {c: median([r.get(key, {}).get(c, 0.0) for r in rs]) for c in names}
            a[key] = dict(sorted(by.items(), key=lambda kv: -kv[1]))
        a["limit"] = limit(a, server_role(rs), cpu_count=None)
        agg[phase] = a
    return agg


def server_role(rs: list[dict[str, Any]]) -> str:
    roles = {k for r in rs for k in r.get("cpu_cores", {})}
    return "scheduler" if "scheduler" in roles else "worker"


def limit(a: dict[str, Any], server: str, cpu_count: int | None) -> dict[str, Any]:
    """Which resource held the rate back in a (median) window: every one at or near saturation,
    with the figures. ``cpu_count``: the machine's cores (None: os.cpu_count())."""
    import os

    ncpu = cpu_count or os.cpu_count() or 1
    cores = a.get("cpu_cores", {})
    maxp = a.get("max_proc_cores", {})
    busy = a.get("busy_cores", float("nan"))
    gens = {k: v for k, v in cores.items() if k not in (server, "redis", "replica")}
    found = []
    other = a.get("other_cores", float("nan"))
    if busy >= 0.9 * ncpu:
        found.append(f"the machine's {ncpu} cores ({busy:.2f} busy"
                     + (f", {other:.2f} of them by other processes)" if other >= 0.1 else ")"))
    if cores.get("redis", 0.0) >= SATURATED:
        found.append(f"Redis's one core ({cores['redis']:.2f})")
    if maxp.get(server, 0.0) >= SATURATED:
        n = int(a.get("procs", {}).get(server, 1) or 1)
        who = "a scheduler process's core" if server == "scheduler" else "the worker process's core"
        found.append(f"{who} ({maxp[server]:.2f}{f' of {n} processes' if n > 1 else ''})")
    for role, c in gens.items():
        if maxp.get(role, c) >= SATURATED:
            found.append(f"the load generator ({role}: {c:.2f} cores)")
    figures = (f"busy {busy:.2f}/{ncpu} cores: {server} {cores.get(server, 0.0):.2f}, Redis "
               f"{cores.get('redis', 0.0):.2f}, load generators {sum(gens.values()):.2f}, other processes "
               f"{other:.2f}")
    return {"saturated": found, "figures": figures,
            "text": ("; ".join(found) if found else "nothing saturated (bound by round trips)") + f" [{figures}]"}
