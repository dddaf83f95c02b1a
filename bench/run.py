"""Store benchmarks: ``python -m bench.run [--quick] [--out PAGE]``; ``make bench`` runs them as the
store-level section of docs/benchmarks.md (``python -m bench``, ``markdown(res, embedded=True)``).

One run starts its own embedded Valkey (``EmbeddedServer``) and measures, with one client harness
(one redis-py asyncio client made like ``Store.from_url`` makes it, N concurrent coroutines in this
process, a warm-up, then a fixed window; ``reps`` rounds, median taken; 1 and 2 are interleaved, one
window of each per round, so changes in the machine's load hit both alike):

1. baseline: calls/s of a no-op script (``bench/noop-1.lua``) called through ``Scripts.call``, the same
   FCALL path the transition scripts use (each root is one library of functions);
2. dispatch+complete pairs/s through ``Store.dispatch`` / ``Store.complete`` with 50 nodes in a pool,
   and the ratio to the baseline;
3. the cost of one dispatch (sequential, one at a time) with 10, 1,000 and 10,000 nodes in the pool.

Diagnostics, to show where the time goes: CPU per operation of the client and the server process;
the server's execution time per script, one call at a time (FCALL ``usec`` in INFO commandstats,
read around every call) and busy (Store's calls replayed in pipelined batches); the Redis commands
the scripts issue per call; and section 2's loop with the scripts replaced by stubs
(``bench/stubs/``), which is what the client path alone allows. The results go to stdout and, with
``--out``, to a Markdown page.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from bench.e2e.facts import cpu_model
from bench.e2e.procs import loadavg, proc_times, system_busy_s
from dragoman.config import Settings
from dragoman.embedded import EmbeddedServer, find_server_binary
from dragoman.store.api import JobSpec, Store
from dragoman.store.keys import CellKeys
from dragoman.store.scripts import Scripts

BENCH_DIR = Path(__file__).resolve().parent
POOL = "zh>en"
NODE_TTL_MS = 3_600_000  # nodes must outlive the run (no heartbeats here)
JOB_DATA = json.dumps({"type": "job_assign", "src_lang": "zh", "tgt_lang": "en", "audio_ms": 1800,
                       "format": "pcm_s16le", "sample_rate": 16000})
RESULT = json.dumps({"text": "The weather is nice today.", "confidence": 0.93})

_NOT_FROM_LUA = {"cmdstat_fcall", "cmdstat_info", "cmdstat_config|resetstat"}
PAIR_TARGET = 0.5  # pairs/s ÷ no-op calls/s, at least
SCALE_TARGET = 1.5  # p50 dispatch at 10,000 nodes ÷ at 10 nodes, at most


@dataclasses.dataclass(frozen=True)
class Profile:
    name: str
    concurrency: int
    warmup_s: float
    window_s: float
    reps: int
    pool_nodes: int  # section 2
    pool_capacity: int
    sizes: tuple[int, ...]  # section 3
    size_capacity: int
    samples: int  # per rep, section 3
    warmup_samples: int
    diag_calls: int  # calls (or pairs) profiled server-side per scenario
    hot_batches: int = 50  # hot_profile: pipelined batches ...
    hot_batch: int = 20  # ... of this many dispatches (then as many completes)


FULL = Profile("full", concurrency=16, warmup_s=1.0, window_s=4.0, reps=3, pool_nodes=50, pool_capacity=4,
               sizes=(10, 1_000, 10_000), size_capacity=4, samples=2_000, warmup_samples=300,
               diag_calls=1_000)
QUICK = Profile("quick", concurrency=16, warmup_s=0.2, window_s=0.3, reps=3, pool_nodes=50, pool_capacity=4,
                sizes=(10, 1_000, 10_000), size_capacity=4, samples=200, warmup_samples=50, diag_calls=200,
                hot_batches=10)


# ---------------------------------------------------------------------------------------------- helpers
def pct(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[i]


def summarize_us(ns: list[int]) -> dict[str, float]:
    vals = sorted(v / 1000 for v in ns)
    return {"n": len(vals), "mean": statistics.fmean(vals) if vals else float("nan"),
            "p50": pct(vals, 50), "p90": pct(vals, 90), "p99": pct(vals, 99),
            "max": vals[-1] if vals else float("nan")}


def median_of(items: list[dict[str, float]], key: str) -> float:
    return statistics.median(i[key] for i in items)


def proc_cpu_s(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc), or nan elsewhere."""
    return sum(proc_times(pid))


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------- harness
class _Recorder:
    """Stands in for Scripts: records each call Store would make and answers a canned reply."""

    _CANNED = {"dispatch_task": [b'{"status":"assigned","node":"-","attempt":1}', b"[]"],
               "complete_task": [b'{"status":"completed"}', b"[]"]}

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[str], list[Any]]] = []

    async def call(self, name: str, keys: list[str], args: list[Any], *_client_and_wait: Any, **_kw: Any
                   ) -> list[bytes]:
        self.calls.append((name, list(keys), list(args)))
        return self._CANNED[name]


class Bench:
    def __init__(self, server: EmbeddedServer, profile: Profile) -> None:
        self.server = server
        self.profile = profile
        self.settings = Settings()
        # The measured client is made exactly as the service makes it (Store.from_url).
        self.store = Store.from_url(server.url, self.settings, proc="bench")
        self.noop = Scripts(self.store.client, root=BENCH_DIR)
        # Diagnostics only: the same Store path, its scripts replaced by stubs with canned replies.
        self.stub_store = Store.from_url(server.url, self.settings, proc="bench")
        self.stub_store.scripts = Scripts(self.stub_store.client, root=BENCH_DIR / "stubs")
        self.functions = self.store.scripts.library.functions
        # Diagnostics only: a Store whose script calls are recorded, not sent (see hot_profile).
        self.recorder = _Recorder()
        self.rec_store = Store.from_url(server.url, self.settings, proc="bench")
        self.rec_store.scripts = self.recorder  # type: ignore[assignment]
        self.ck: CellKeys = self.store.cells[self.settings.cells[0]]
        # A separate client for control and observation (never on the measured connection pool).
        self.admin = aioredis.Redis.from_url(server.url, decode_responses=True)
        self._probe_samples: dict[str, list[float]] = {}
        self._probe_cmds: dict[str, dict[str, int]] = {}
        self._probe_inner_us: dict[str, list[float]] = {}  # per call: µs of the commands the script issued
        self._probe_last: tuple[int, int, dict[str, int], int] | None = None

    async def aclose(self) -> None:
        await self.store.aclose()
        await self.stub_store.aclose()
        await self.rec_store.aclose()
        await self.admin.aclose()

    # ----------------------------------------------------------------- operations
    async def noop_call(self, worker: int = 0) -> None:
        raw = await self.noop.call("noop", [self.ck.nodes], [])
        if not raw:
            raise RuntimeError("noop answered nothing")

    async def pair(self, session: str, utt: int, probe: bool = False, store: Store | None = None
                   ) -> tuple[int, int]:
        """One dispatch then its complete; returns (dispatch ns, complete ns). With ``probe``, the
        server time of each script call is recorded (see server_profile)."""
        store = store or self.store
        spec = JobSpec(pool=POOL, session_id=session, utterance_index=utt, tgt_lang="en", body=JOB_DATA)
        t0 = time.perf_counter_ns()
        d = await store.dispatch(spec)
        t1 = time.perf_counter_ns()
        if d.status != "assigned":
            raise RuntimeError(f"dispatch did not assign: {d}")
        if probe:
            await self.fcall_usec("dispatch_task")
        c = await store.complete(d.job_id, d.node, d.attempt, "completed", payload=RESULT)
        t2 = time.perf_counter_ns()
        if c.status != "completed":
            raise RuntimeError(f"complete refused: {c}")
        if probe:
            await self.fcall_usec("complete_task")
        return t1 - t0, t2 - t1

    async def register_nodes(self, count: int, capacity: int, parallel: int = 64) -> float:
        """Register ``count`` nodes in POOL through Store.register_node, ``parallel`` at a time."""
        ids = iter(range(count))
        t0 = time.perf_counter()

        async def worker() -> None:
            for i in ids:
                r = await self.store.register_node(f"node-{i:05d}", conn=f"conn-{i}", max_concurrency=capacity,
                                                   pools=[POOL], node_ttl_ms=NODE_TTL_MS)
                if r.status != "registered":
                    raise RuntimeError(f"register_node: {r}")

        await asyncio.gather(*(worker() for _ in range(parallel)))
        elapsed = time.perf_counter() - t0
        members = await self.admin.zcard(self.ck.pool(POOL))
        if members != count:
            raise RuntimeError(f"pool has {members} members after registering {count} nodes")
        return elapsed

    async def fresh_db(self) -> None:
        await self.admin.flushdb()

    # ----------------------------------------------------------------- throughput
    async def window(self, op: Callable[[int, int], Awaitable[Any]], ops_per_call: int) -> dict[str, Any]:
        """Run ``op(worker, k)`` in ``concurrency`` coroutines without pause; after the warm-up, count
        the operations completed in one window of ``window_s`` seconds."""
        p = self.profile
        state: dict[str, Any] = {"count": 0, "stop": False, "error": None}
        lat: list[int] = []

        async def worker(w: int) -> None:
            k = 0
            try:
                while not state["stop"]:
                    t0 = time.perf_counter_ns()
                    await op(w, k)
                    lat.append(time.perf_counter_ns() - t0)
                    state["count"] += 1
                    k += 1
            except Exception as exc:  # noqa: BLE001 - reported below, stops the run
                state["error"] = exc
                state["stop"] = True

        tasks = [asyncio.create_task(worker(w)) for w in range(p.concurrency)]
        try:
            await asyncio.sleep(p.warmup_s)
            await self.admin.config_resetstat()
            lat.clear()
            c0, cpu0, srv0, sys0, t0 = state["count"], time.process_time(), proc_cpu_s(self.server_pid), \
                system_busy_s(), time.perf_counter()
            await asyncio.sleep(p.window_s)
            c1, cpu1, srv1, sys1, t1 = state["count"], time.process_time(), proc_cpu_s(self.server_pid), \
                system_busy_s(), time.perf_counter()
            window_lat = list(lat)
            stats = await self.admin.info("commandstats")
        finally:
            state["stop"] = True
            await asyncio.gather(*tasks, return_exceptions=True)
        if state["error"]:
            raise state["error"]
        ev = stats.get("cmdstat_fcall", {})
        secs = t1 - t0
        return {
            "ops": c1 - c0, "seconds": secs, "rate": (c1 - c0) / secs,
            "script_calls_per_s": (c1 - c0) * ops_per_call / secs,
            "latency_us": summarize_us(window_lat),
            "client_cpu": (cpu1 - cpu0) / secs, "server_cpu": (srv1 - srv0) / secs,
            "other_cpu": ((sys1 - sys0) - (cpu1 - cpu0) - (srv1 - srv0)) / secs,
            "fcall_calls": int(ev.get("calls", 0)),
            "fcall_usec_per_call": float(ev.get("usec_per_call", float("nan"))),
        }

    @staticmethod
    def aggregate(windows: list[dict[str, Any]]) -> dict[str, Any]:
        def med(key: str) -> float:
            return statistics.median(w[key] for w in windows)

        return {"windows": windows, "rate": med("rate"), "script_calls_per_s": med("script_calls_per_s"),
                "latency_us_p50": statistics.median(w["latency_us"]["p50"] for w in windows),
                "latency_us_p99": statistics.median(w["latency_us"]["p99"] for w in windows),
                "client_cpu": med("client_cpu"), "server_cpu": med("server_cpu"), "other_cpu": med("other_cpu"),
                "client_cpu_us_per_op": statistics.median(w["client_cpu"] / w["rate"] * 1e6 for w in windows),
                "server_cpu_us_per_op": statistics.median(w["server_cpu"] / w["rate"] * 1e6 for w in windows),
                "fcall_usec_per_call": med("fcall_usec_per_call")}

    # ----------------------------------------------------------------- server-side profile
    async def fcall_usec(self, label: str) -> None:
        """Probe: attribute the FCALL time accrued since the previous probe to ``label``."""
        stats = await self.admin.info("commandstats")
        ev = stats.get("cmdstat_fcall", {})
        calls, usec = int(ev.get("calls", 0)), int(ev.get("usec", 0))
        inner = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()
                 if k.startswith("cmdstat_") and k not in _NOT_FROM_LUA}
        inner_us = sum(int(v["usec"]) for k, v in stats.items() if k.startswith("cmdstat_") and k not in _NOT_FROM_LUA)
        if self._probe_last is not None and label:
            c0, u0, inner0, iu0 = self._probe_last
            if calls - c0 == 1:
                self._probe_samples.setdefault(label, []).append(usec - u0)
                self._probe_inner_us.setdefault(label, []).append(inner_us - iu0)
                counts = self._probe_cmds.setdefault(label, {})
                for cmd, n in inner.items():
                    if n - inner0.get(cmd, 0):
                        counts[cmd] = counts.get(cmd, 0) + n - inner0.get(cmd, 0)
        self._probe_last = (calls, usec, inner, inner_us)

    async def server_profile(self, run: Callable[[int], Awaitable[None]], count: int) -> dict[str, Any]:
        """Run ``run(count)`` sequentially, reading INFO commandstats around every script call: the
        server's execution time of each call (FCALL ``usec``, whole microseconds) by script, and
        the commands the scripts issue from Lua per call. (SLOWLOG is not used: at a 0 us threshold
        it also logs every command a script issues, which inflates the script's own time.)"""
        self._probe_samples = {}
        self._probe_cmds = {}
        self._probe_inner_us = {}
        self._probe_last = None
        await self.admin.config_resetstat()
        await self.fcall_usec("")
        await run(count)
        cmdstats = await self.admin.info("commandstats")
        fcall_calls = int(cmdstats.get("cmdstat_fcall", {}).get("calls", 0)) or 1
        inner = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in cmdstats.items()
                 if k.startswith("cmdstat_") and k not in _NOT_FROM_LUA}
        scripts = {}
        for name, us in sorted(self._probe_samples.items()):
            s = sorted(us)
            cmds = self._probe_cmds.get(name, {})
            commands_us = statistics.fmean(self._probe_inner_us.get(name) or [0.0])
            scripts[name] = {"n": len(s), "mean": statistics.fmean(s), "p50": pct(s, 50), "p99": pct(s, 99),
                             "commands_us": commands_us, "lua_own_us": statistics.fmean(s) - commands_us,
                             "lua_commands": sum(cmds.values()) / len(s),
                             "lua_command_mix": {k: v / len(s) for k, v in
                                                 sorted(cmds.items(), key=lambda kv: (-kv[1], kv[0]))}}
        return {"scripts": scripts, "fcall_calls": fcall_calls,
                "inner_calls_total": sum(inner.values()),
                "inner_calls_per_fcall": sum(inner.values()) / fcall_calls,
                "inner_calls": dict(sorted(inner.items(), key=lambda kv: -kv[1]))}

    async def _pipelined(self, calls: list[tuple[str, list[str], list[Any]]]) -> tuple[list[Any], float]:
        """Send recorded script calls in one pipeline (the server runs them back to back); answer the
        replies and the server's mean FCALL time over the batch."""
        pipe = self.store.client.pipeline(transaction=False)
        for name, keys, args in calls:
            pipe.execute_command("FCALL", self.functions[name], len(keys), *keys, *args)
        await self.admin.config_resetstat()
        replies = await pipe.execute()
        ev = (await self.admin.info("commandstats")).get("cmdstat_fcall", {})
        if int(ev.get("calls", 0)) != len(calls):
            raise RuntimeError(f"expected {len(calls)} FCALL calls, server counted {ev.get('calls')}")
        return replies, float(ev["usec_per_call"])

    async def hot_profile(self, tag: str) -> dict[str, Any]:
        """Server time per script with the server busy (no idle gap between calls): batches of
        dispatches, then of their completes, each batch pipelined. The calls are the ones Store makes
        (recorded from Store.dispatch / Store.complete), sent with the same client."""
        p = self.profile
        per: dict[str, list[float]] = {"dispatch_task": [], "complete_task": []}
        for b in range(p.hot_batches):
            self.recorder.calls.clear()
            jobs = []
            for k in range(p.hot_batch):
                d = await self.rec_store.dispatch(JobSpec(pool=POOL, session_id=f"{tag}-hot-{b}-{k}",
                                                          utterance_index=0, tgt_lang="en", body=JOB_DATA))
                jobs.append(d.job_id)
            replies, usec = await self._pipelined(list(self.recorder.calls))
            per["dispatch_task"].append(usec)
            self.recorder.calls.clear()
            for job_id, raw in zip(jobs, replies, strict=True):
                d = json.loads(raw[0])
                if d["status"] != "assigned":
                    raise RuntimeError(f"hot_profile: dispatch did not assign: {d}")
                await self.rec_store.complete(job_id, d["node"], d["attempt"], "completed", payload=RESULT)
            replies, usec = await self._pipelined(list(self.recorder.calls))
            per["complete_task"].append(usec)
            bad = [r for r in replies if json.loads(r[0])["status"] != "completed"]
            if bad:
                raise RuntimeError(f"hot_profile: complete refused: {bad[0]!r}")
        return {name: {"batches": len(v), "batch": p.hot_batch, "p50": statistics.median(v),
                       "mean": statistics.fmean(v), "min": min(v), "max": max(v)} for name, v in per.items()}

    @property
    def server_pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    # ----------------------------------------------------------------- sections
    async def section_throughput(self) -> dict[str, Any]:
        """Sections 1 and 2 (and the stub diagnostic), interleaved: each round runs one window of each,
        so a change in the machine's load hits all of them alike."""
        p = self.profile
        await self.fresh_db()
        reg_s = await self.register_nodes(p.pool_nodes, p.pool_capacity)

        async def noop(w: int, k: int) -> None:
            await self.noop_call(w)

        async def noop_pairs(w: int, k: int) -> None:  # the pair loop's shape, both calls no-ops
            await self.noop_call(w)
            await self.noop_call(w)

        # Each coroutine is one session sending utterance after utterance (the service's shape).
        async def pairs(w: int, k: int) -> None:
            await self.pair(f"sess-{w}", k)

        async def stub_pairs(w: int, k: int) -> None:
            await self.pair(f"sess-{w}", k, store=self.stub_store)

        kinds: dict[str, tuple[Callable[[int, int], Awaitable[None]], int]] = {
            "noop": (noop, 1), "noop_pairs": (noop_pairs, 2), "pairs": (pairs, 2), "stub_pairs": (stub_pairs, 2)}
        windows: dict[str, list[dict[str, Any]]] = {k: [] for k in kinds}
        for r in range(p.reps):
            for kind, (op, calls) in kinds.items():
                print(f"  round {r + 1}/{p.reps}: {kind}", file=sys.stderr, flush=True)
                windows[kind].append(await self.window(op, calls))
        out = {kind: self.aggregate(ws) for kind, ws in windows.items()}
        out["pairs"]["register_s"] = reg_s
        out["round_ratios"] = [pw["rate"] / nw["rate"] for pw, nw in zip(windows["pairs"], windows["noop"],
                                                                          strict=True)]

        async def run_noop(n: int) -> None:
            for _ in range(n):
                await self.noop_call()
                await self.fcall_usec("noop")

        async def run_pairs(n: int) -> None:
            for k in range(n):
                await self.pair("sess-diag", k, probe=True)

        print("  server-side profile", file=sys.stderr, flush=True)
        out["noop"]["server"] = await self.server_profile(run_noop, p.diag_calls)
        out["pairs"]["server"] = await self.server_profile(run_pairs, p.diag_calls)
        return out

    async def section_sizes(self) -> list[dict[str, Any]]:
        """Section 3. Rounds of (for each size: flush, register, warm up, one rep), so that a change in
        the machine's load hits every size alike; the server-side diagnostics run in the last round."""
        p = self.profile
        runs: dict[int, dict[str, Any]] = {size: {"reps": [], "register_s": []} for size in p.sizes}
        for r in range(p.reps):
            for size in p.sizes:
                print(f"  round {r + 1}/{p.reps}: {size:,} nodes", file=sys.stderr, flush=True)
                await self.fresh_db()
                runs[size]["register_s"].append(await self.register_nodes(size, p.size_capacity))
                tag = f"z{size}-r{r}"
                # A fresh session per dispatch: no affinity, so every dispatch selects a node from the pool.
                for k in range(p.warmup_samples):
                    await self.pair(f"{tag}-warm-{k}", 0)
                d_ns, c_ns = [], []
                cpu0, srv0, sys0, t0 = time.process_time(), proc_cpu_s(self.server_pid), system_busy_s(), \
                    time.perf_counter()
                for k in range(p.samples):
                    d, c = await self.pair(f"{tag}-{k}", 0)
                    d_ns.append(d)
                    c_ns.append(c)
                cpu1, srv1, sys1, t1 = time.process_time(), proc_cpu_s(self.server_pid), system_busy_s(), \
                    time.perf_counter()
                other = ((sys1 - sys0) - (cpu1 - cpu0) - (srv1 - srv0)) / (t1 - t0)
                runs[size]["reps"].append({"dispatch_us": summarize_us(d_ns), "complete_us": summarize_us(c_ns),
                                           "other_cpu": other})
                if r == p.reps - 1:

                    async def run(n: int, tag: str = tag) -> None:
                        for k in range(n):
                            await self.pair(f"{tag}-diag-{k}", 0, probe=True)

                    runs[size]["server"] = await self.server_profile(run, p.diag_calls)
                    runs[size]["hot"] = await self.hot_profile(tag)
        out = []
        for size in p.sizes:
            reps = runs[size]["reps"]
            d = [x["dispatch_us"] for x in reps]
            c = [x["complete_us"] for x in reps]
            out.append({"size": size, "register_s": statistics.median(runs[size]["register_s"]),
                        "register_s_all": runs[size]["register_s"], "reps": reps,
                        "dispatch_mean": median_of(d, "mean"), "dispatch_p50": median_of(d, "p50"),
                        "dispatch_p99": median_of(d, "p99"),
                        "complete_mean": median_of(c, "mean"), "complete_p50": median_of(c, "p50"),
                        "complete_p99": median_of(c, "p99"), "server": runs[size]["server"],
                        "hot": runs[size]["hot"]})
        return out


# ---------------------------------------------------------------------------------------------- environment
def environment(server: EmbeddedServer, loop_name: str, profile: Profile) -> dict[str, Any]:
    c = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        info = c.info("server")
    finally:
        c.close()
    try:
        import hiredis  # noqa: F401

        parser = "hiredis"
    except ImportError:
        parser = "python"
    version = info.get("valkey_version") or info.get("redis_version", "?")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "event_loop": loop_name,
        "redis_py": redis.__version__,
        "parser": parser,
        "server": f"{'valkey' if 'valkey_version' in info else 'redis'} {version}",
        "server_binary": find_server_binary(),
        "io_threads": info.get("io_threads_active", "?"),
        "commit": git_commit(),
        "loadavg_start": loadavg(),
        "profile": profile.name,
        "concurrency": profile.concurrency,
    }


# ---------------------------------------------------------------------------------------------- report
BUSY_WARN = 0.25  # cores used by other processes during a window before the page warns


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def fmt(x: float, nd: int = 0) -> str:
    return f"{x:,.{nd}f}"


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    noop, pairs, stub = res["noop"], res["pairs"], res["stub_pairs"]
    sizes = res["sizes"]
    small, large = sizes[0], sizes[-1]
    windows = noop["windows"] + pairs["windows"] + stub["windows"]
    return {
        "pair_ratio": pairs["rate"] / noop["rate"],
        "per_call_ratio": 2 * pairs["rate"] / noop["rate"],
        # The figure: pairs/s vs "the same harness calling a no-op script", i.e. the same
        # loop (two script calls per iteration) with both calls no-ops.
        "pair_ok": pairs["rate"] / res["noop_pairs"]["rate"] >= PAIR_TARGET,
        "stub_ratio": stub["rate"] / noop["rate"],
        "noop_pair_ratio": pairs["rate"] / res["noop_pairs"]["rate"],
        "round_ratios": res["round_ratios"],
        "round_ratio_median": statistics.median(res["round_ratios"]),
        "small": small["size"], "large": large["size"],
        "scale_p50": large["dispatch_p50"] / small["dispatch_p50"],
        "scale_mean": large["dispatch_mean"] / small["dispatch_mean"],
        "scale_p99": large["dispatch_p99"] / small["dispatch_p99"],
        "scale_ok": large["dispatch_p50"] / small["dispatch_p50"] <= SCALE_TARGET,
        "server_scale": large["hot"]["dispatch_task"]["p50"] / small["hot"]["dispatch_task"]["p50"],
        "server_scale_cold": (large["server"]["scripts"]["dispatch_task"]["p50"]
                              / small["server"]["scripts"]["dispatch_task"]["p50"]),
        "max_other_cpu": max([w["other_cpu"] for w in windows]
                             + [r["other_cpu"] for s in sizes for r in s["reps"]]),
    }


def server_table(rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| scenario | script | calls profiled | server µs mean | p50 | p99 | Lua commands / call "
             "| of the mean: its commands µs | the Lua itself µs |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, server in rows:
        for name, s in server["scripts"].items():
            lines.append(f"| {label} | `{name}` | {s['n']:,} | {fmt(s['mean'], 1)} | {fmt(s['p50'], 1)} | "
                         f"{fmt(s['p99'], 1)} | {s['lua_commands']:.1f} | {fmt(s.get('commands_us', float('nan')), 1)} "
                         f"| {fmt(s.get('lua_own_us', float('nan')), 1)} |")
    return lines


def mix_lines(server: dict[str, Any]) -> list[str]:
    out = []
    for name, s in server["scripts"].items():
        if s["lua_commands"]:
            parts = ", ".join(f"{k} {v:g}" for k, v in s["lua_command_mix"].items())
            out.append(f"- `{name}`: {s['lua_commands']:.1f} per call ({parts})")
    return out


def cores(x: float) -> str:
    return f"{max(0.0, x):.2f}"


def markdown(res: dict[str, Any], embedded: bool = False) -> str:
    """The page (``embedded``: a section of the full docs/benchmarks.md written by ``python -m bench``:
    its own title, headings one level down, the environment table and raw numbers left out)."""
    page = _page(res)
    if not embedded:
        return page
    body = page.split("\n## Environment\n", 1)
    intro = body[0].split("\n\n", 2)[2]  # past the page title and the "Generated by" line
    rest = body[1].split("\n## Targets\n", 1)[1].split("\n## Raw numbers\n", 1)[0]
    text = ("## Store level: the transition scripts alone\n\n"
            "The Redis side of the scheduler without the WebSockets (`python -m bench.run`, run in-process by "
            "`python -m bench`): " + intro + "\n## Targets\n" + rest)
    return "\n".join("#" + ln if ln.startswith("## ") and i else ln for i, ln in enumerate(text.splitlines())) + "\n"


def _page(res: dict[str, Any]) -> str:
    env, a, p = res["env"], res["analysis"], res["profile"]
    noop, pairs, stub, sizes = res["noop"], res["pairs"], res["stub_pairs"], res["sizes"]
    L: list[str] = []
    L += ["# Benchmarks", "",
          "Generated by `python -m bench.run --out docs/benchmarks.md` (`make bench`); do not edit by hand. "
          "Reproduce with `make bench` (full run, 1-2 minutes) or `python -m bench.run --quick` (smoke "
          "test, a few seconds; add `--out FILE` to write a page).", "",
          "One run starts its own Valkey (`dragoman.embedded.EmbeddedServer`, a fresh server on a free "
          "loopback port) and measures everything with one client harness: a redis-py asyncio client made "
          f"as `Store.from_url` makes it, {p['concurrency']} concurrent coroutines in one process "
          f"({env['event_loop']} event loop). A throughput figure is the median of {p['reps']} windows of "
          f"{p['window_s']:g} s, each after its own {p['warmup_s']:g} s warm-up; sections 1 and 2 (and the "
          "stub diagnostic below) are interleaved, one window of each per round, so a change in the "
          "machine's load hits them alike.", "",
          "1. **Baseline**: a no-op script (`bench/noop-1.lua`: KEYS[1] = the cell registry key, returns a "
          "short JSON string) called through `dragoman.store.scripts.Scripts.call`, the same "
          "FCALL path as every transition script (`Scripts` loads each folder of scripts as one library). It is the cheapest script call "
          "this harness can make (no key read, no argument, reply not decoded). Measured two ways: one "
          "no-op call per iteration (*no-op calls/s*), and the pair loop's shape with both of its calls "
          "no-ops (*no-op pairs/s*); the target compares pairs with the latter, the same loop calling a "
          "no-op script, and the stricter one-call ratio is reported beside it.",
          f"2. **dispatch+complete pairs/s**: {p['pool_nodes']} nodes × {p['pool_capacity']} slots in "
          f"pool `{POOL}`; each coroutine is one session that dispatches its next utterance's job "
          "(`Store.dispatch(JobSpec)`) and completes it with the assigned node and attempt "
          "(`Store.complete`, small JSON payload), in a loop: the whole `Store` path (argument checks, "
          "FCALL, reply decoding).",
          f"3. **Cost of one dispatch vs pool size**: {', '.join(f'{s:,}' for s in p['sizes'])} nodes in one "
          "pool (registered by concurrent `Store.register_node` calls; database flushed between sizes), "
          f"then {p['samples']:,} sequential dispatch+complete pairs after {p['warmup_samples']} warm-up "
          f"pairs; {p['reps']} rounds, each going through every size (flush, register, warm up, measure), "
          "so a change in the machine's load hits every size alike. Only `Store.dispatch` is inside the "
          "dispatch timing "
          "(`complete` is timed on its own). Every dispatch comes from a new session, so no affinity "
          "applies and each one selects a node from the pool. Figures are medians over the rounds.", "",
          "Diagnostics (not targets): the CPU each side spends per operation (client: this process's CPU "
          "time; server: the valkey-server process's, from /proc), the server's execution time per script "
          "call (FCALL `usec` in INFO commandstats, read before and after every call of a separate "
          f"sequential run of {p['diag_calls']:,}; excludes network and parsing), the Redis commands the "
          "scripts issue per call, and section 2's loop run again with the two scripts replaced by stubs "
          "(`bench/stubs/`: same keys and arguments, canned replies of the real size, no key touched), "
          "which shows what the client path alone allows.", ""]
    if p["name"] != "full":
        L += [f"> **Note:** this page comes from a `--{p['name']}` run; its numbers are rough.", ""]
    if a["max_other_cpu"] > BUSY_WARN:
        L += [f"> **Note:** the machine was not idle: other processes used up to {a['max_other_cpu']:.2f} "
              f"of its {env['cpu_count']} cores during a measurement (columns *other CPU* below), so "
              "rates are lower, and noisier, than on an idle machine.", ""]

    L += ["## Environment", "", "| | |", "|---|---|"]
    for k in ("date", "cpu_count", "cpu_model", "platform", "python", "event_loop", "redis_py", "parser",
              "server", "io_threads", "commit", "loadavg_start", "loadavg_end", "profile", "concurrency"):
        L.append(f"| {k} | {env.get(k, '?')} |")
    L.append("")

    L += ["## Targets", "", "| target | measured | result |", "|---|---|---|",
          f"| dispatch+complete pairs/s ÷ no-op pairs/s (the same loop, both script calls no-ops) ≥ {PAIR_TARGET} | "
          f"{fmt(pairs['rate'])} ÷ {fmt(res['noop_pairs']['rate'])} = **{a['noop_pair_ratio']:.3f}** | "
          f"{verdict(a['pair_ok'])} |",
          f"| (stricter reading) pairs/s ÷ single no-op calls/s ≥ {PAIR_TARGET} | {fmt(pairs['rate'])} ÷ "
          f"{fmt(noop['rate'])} = **{a['pair_ratio']:.3f}** (per script call {a['per_call_ratio']:.3f}) | "
          f"{verdict(a['pair_ratio'] >= PAIR_TARGET)} |",
          f"| p50 dispatch at {a['large']:,} nodes ÷ at {a['small']:,} nodes ≤ {SCALE_TARGET} | "
          f"**{a['scale_p50']:.2f}×** (mean {a['scale_mean']:.2f}×, p99 {a['scale_p99']:.2f}×; server-side busy "
          f"dispatch_task {a['server_scale']:.2f}×) | {verdict(a['scale_ok'])} |", ""]

    def tp_row(label: str, sec: dict[str, Any], per: str) -> str:
        return (f"| {label} | {fmt(sec['rate'])} {per} | {fmt(sec['script_calls_per_s'])} | "
                f"{fmt(sec['latency_us_p50'], 1)} | {fmt(sec['latency_us_p99'], 1)} | "
                f"{sec['client_cpu']:.2f} | {sec['server_cpu']:.2f} | {cores(sec['other_cpu'])} | "
                f"{fmt(sec['fcall_usec_per_call'], 1)} |")

    tp_head = ["| | rate | script calls/s | latency p50 µs | p99 µs | client CPU (cores) | server CPU | "
               "other CPU | server µs / FCALL |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    L += ["## 1. Baseline: no-op script", ""] + tp_head + [tp_row("no-op", noop, "calls/s"), ""]
    L += ["## 2. dispatch+complete pairs", ""] + tp_head + [
        tp_row("dispatch+complete", pairs, "pairs/s"), "",
        f"Ratio to the baseline: pairs/s ÷ no-op calls/s = **{a['pair_ratio']:.3f}** (target ≥ {PAIR_TARGET}); "
        f"per script call (2 × pairs/s ÷ no-op calls/s) = {a['per_call_ratio']:.3f}. Ratio within each round "
        f"(adjacent windows): {', '.join(f'{x:.3f}' for x in a['round_ratios'])} (median "
        f"{a['round_ratio_median']:.3f}). Latency is one pair "
        f"(dispatch then complete) under load. Setup: {p['pool_nodes']} registrations in "
        f"{pairs['register_s']:.2f} s.", ""]

    L += ["## 3. Cost of one dispatch vs pool size", "",
          "| nodes in pool | register all (s, median) | dispatch mean µs | p50 | p99 | complete mean µs | p50 | p99 | "
          "server µs / dispatch_task: busy | one at a time (p50) | server µs / complete_task: busy | "
          "one at a time (p50) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        sv, hot = s["server"]["scripts"], s["hot"]
        L.append(f"| {s['size']:,} | {s['register_s']:.2f} | {fmt(s['dispatch_mean'], 1)} | "
                 f"{fmt(s['dispatch_p50'], 1)} | {fmt(s['dispatch_p99'], 1)} | {fmt(s['complete_mean'], 1)} | "
                 f"{fmt(s['complete_p50'], 1)} | {fmt(s['complete_p99'], 1)} | "
                 f"{fmt(hot['dispatch_task']['p50'], 1)} | {fmt(sv['dispatch_task']['p50'], 0)} | "
                 f"{fmt(hot['complete_task']['p50'], 1)} | {fmt(sv['complete_task']['p50'], 0)} |")
    L += ["", f"{a['large']:,} vs {a['small']:,} nodes: p50 **{a['scale_p50']:.2f}×** (target ≤ {SCALE_TARGET}), "
          f"mean {a['scale_mean']:.2f}×, p99 {a['scale_p99']:.2f}×. Server-side dispatch_task: "
          f"{a['server_scale']:.2f}× busy, {a['server_scale_cold']:.2f}× one at a time.", "",
          "Client-side times (dispatch, complete) are one call at a time and include the round trip and "
          "both processes waking up; figures are medians over the rounds. *Busy* server times: Store's "
          "calls recorded and replayed in "
          f"pipelined batches of {p['hot_batch']} dispatches, then their {p['hot_batch']} completes "
          f"({p['hot_batches']} batches; median of the batches' mean FCALL time), so the server runs "
          "them back to back. *One at a time*: the sequential run of the diagnostics. Both are measured in "
          "the last round.", ""]

    cpu_rows = [("no-op call", noop, 1), ("dispatch+complete pair", pairs, 2),
                ("pair, stub scripts", stub, 2)]
    L += ["## Where the time goes", "",
          "CPU spent per operation during the throughput windows (medians), the server's execution time "
          "per FCALL, and the rate reached:", "",
          "| operation | ops/s | ÷ no-op calls/s | client CPU µs / op | server CPU µs / op | "
          "server µs / FCALL | other CPU (cores) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for label, sec, _calls in cpu_rows:
        L.append(f"| {label} | {fmt(sec['rate'])} | {sec['rate'] / noop['rate']:.3f} | "
                 f"{fmt(sec['client_cpu_us_per_op'], 1)} | {fmt(sec['server_cpu_us_per_op'], 1)} | "
                 f"{fmt(sec['fcall_usec_per_call'], 1)} | {cores(sec['other_cpu'])} |")
    L += ["", "Server CPU per operation includes reading and writing the sockets; *server µs / FCALL* is "
          "script execution alone. With the stub scripts the pair loop keeps the whole client path and "
          f"drops the Lua work: it reaches {a['stub_ratio']:.3f} of the no-op rate, the most this client "
          "harness could show for pairs with scripts that cost nothing.", "",
          "Server execution time per script, sequential calls (no queueing):", ""]
    rows = [("no-op", noop["server"]), (f"pairs, {p['pool_nodes']} nodes", pairs["server"])]
    rows += [(f"{s['size']:,} nodes", s["server"]) for s in sizes]
    L += server_table(rows) + [
        "", "One call at a time, a script takes longer than under load (*server µs / FCALL* above, and "
        "the *busy* figures of section 3) for the same commands issued: the server idles between calls. "
        "*Its commands* is the `usec` of the commands the call issued from Lua (commandstats, read around "
        "the call); *the Lua itself* is the rest: the interpreter running the function (the shared `local "
        "function`s of the includes are made once, when the library is loaded).", "",
        "Redis commands issued from Lua per call (INFO commandstats, section 2's loop):", ""]
    L += mix_lines(pairs["server"]) + [""]

    L += ["## Raw numbers", "", "Throughput windows:", "",
          "| section | window | ops | seconds | ops/s | latency p50 µs | p99 µs | client CPU | server CPU | "
          "other CPU | FCALL calls | server µs / FCALL |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, sec in (("no-op", noop), ("pairs", pairs), ("pairs, stubs", stub)):
        for i, w in enumerate(sec["windows"], 1):
            L.append(f"| {label} | {i} | {w['ops']:,} | {w['seconds']:.2f} | {fmt(w['rate'])} | "
                     f"{fmt(w['latency_us']['p50'], 1)} | {fmt(w['latency_us']['p99'], 1)} | "
                     f"{w['client_cpu']:.2f} | {w['server_cpu']:.2f} | {cores(w['other_cpu'])} | "
                     f"{w['fcall_calls']:,} | {fmt(w['fcall_usec_per_call'], 1)} |")
    L += ["", "Dispatch cost per round (section 3), client-side µs:", "",
          "| nodes | round | samples | dispatch mean | p50 | p90 | p99 | max | complete mean | p50 | p99 | "
          "other CPU (cores) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in sizes:
        for i, r in enumerate(s["reps"], 1):
            d, c = r["dispatch_us"], r["complete_us"]
            L.append(f"| {s['size']:,} | {i} | {d['n']:,} | {fmt(d['mean'], 1)} | {fmt(d['p50'], 1)} | "
                     f"{fmt(d['p90'], 1)} | {fmt(d['p99'], 1)} | {fmt(d['max'], 1)} | {fmt(c['mean'], 1)} | "
                     f"{fmt(c['p50'], 1)} | {fmt(c['p99'], 1)} | {cores(r['other_cpu'])} |")
    L += ["", "<details><summary>All results as JSON</summary>", "", "```json",
          json.dumps(res, indent=1, default=str), "```", "", "</details>", ""]
    return "\n".join(L)


def summary(res: dict[str, Any]) -> str:
    a, noop, pairs, stub = res["analysis"], res["noop"], res["pairs"], res["stub_pairs"]
    env = res["env"]
    lines = [
        f"dragoman bench ({res['profile']['name']}: {env['server']}, {env['cpu_count']} CPUs, "
        f"{env['event_loop']}, concurrency {res['profile']['concurrency']}, load {env['loadavg_start']})",
        f"  no-op script          {noop['rate']:>9,.0f} calls/s  (client {noop['client_cpu_us_per_op']:.0f} µs "
        f"CPU/call, server {noop['fcall_usec_per_call']:.1f} µs/FCALL)",
        f"  dispatch+complete     {pairs['rate']:>9,.0f} pairs/s  (client {pairs['client_cpu_us_per_op']:.0f} µs "
        f"CPU/pair, server {pairs['fcall_usec_per_call']:.1f} µs/FCALL)",
        f"  pairs ÷ no-op calls   {a['pair_ratio']:>9.3f}          (per call {a['per_call_ratio']:.3f}; "
        f"stricter reading, >= {PAIR_TARGET}: {'PASS' if a['pair_ratio'] >= PAIR_TARGET else 'MISS'})",
        f"  pairs, stub scripts   {stub['rate']:>9,.0f} pairs/s  (= {a['stub_ratio']:.3f} of no-op: the client "
        "path's ceiling)",
        f"  no-op pairs           {res['noop_pairs']['rate']:>9,.0f} pairs/s  pairs ÷ no-op pairs "
        f"{a['noop_pair_ratio']:.3f}   target >= {PAIR_TARGET}: {'PASS' if a['pair_ok'] else 'MISS'}",
    ]
    for s in res["sizes"]:
        lines.append(f"  dispatch @ {s['size']:>6,} nodes  mean {s['dispatch_mean']:6.1f} µs  p50 "
                     f"{s['dispatch_p50']:6.1f}  p99 {s['dispatch_p99']:7.1f}  (server p50 "
                     f"{s['server']['scripts']['dispatch_task']['p50']:.0f} µs; register {s['register_s']:.2f} s)")
    lines.append(f"  {a['large']:,} vs {a['small']:,} nodes     p50 {a['scale_p50']:.2f}x  mean "
                 f"{a['scale_mean']:.2f}x   target <= {SCALE_TARGET}: {'PASS' if a['scale_ok'] else 'MISS'}")
    if a["max_other_cpu"] > BUSY_WARN:
        lines.append(f"  note: other processes used up to {a['max_other_cpu']:.2f} cores during the windows")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
async def run_all(server: EmbeddedServer, profile: Profile, loop_name: str) -> dict[str, Any]:
    bench = Bench(server, profile)
    try:
        await bench.store.load_scripts()
        await bench.noop.load_all(bench.store.client)
        await bench.stub_store.load_scripts()
        t0 = time.perf_counter()
        res: dict[str, Any] = {"profile": dataclasses.asdict(profile),
                               "env": environment(server, loop_name, profile)}
        print("no-op baseline, dispatch+complete pairs, pairs with stub scripts ...", file=sys.stderr, flush=True)
        res.update(await bench.section_throughput())
        print("dispatch cost vs pool size ...", file=sys.stderr, flush=True)
        res["sizes"] = await bench.section_sizes()
        res["analysis"] = analyse(res)
        res["elapsed_s"] = time.perf_counter() - t0
        res["env"]["loadavg_end"] = loadavg()
        return res
    finally:
        await bench.aclose()


def measure(profile: Profile, loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None,
            loop_name: str = "asyncio") -> dict[str, Any]:
    """One whole run on a fresh embedded server: every figure as a dict."""
    with EmbeddedServer() as server, asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(run_all(server, profile, loop_name))


def default_loop() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop when installed (as uvicorn picks it), else asyncio's own loop."""
    try:
        import uvloop

        return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"
    except ImportError:
        return None, "asyncio"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="write the Markdown report here (e.g. docs/benchmarks.md)")
    ap.add_argument("--quick", action="store_true", help="a short run (a few seconds) for smoke testing")
    ap.add_argument("--concurrency", type=int, help="concurrent coroutines for sections 1 and 2")
    ap.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                    help="event loop (auto: uvloop when installed, as uvicorn does)")
    ap.add_argument("--json", type=Path, help="also write all results as JSON here")
    args = ap.parse_args(argv)

    profile = QUICK if args.quick else FULL
    if args.concurrency:
        profile = dataclasses.replace(profile, concurrency=args.concurrency)
    loop_factory, loop_name = default_loop() if args.loop != "asyncio" else (None, "asyncio")
    if args.loop == "uvloop" and loop_factory is None:
        ap.error("uvloop is not installed")

    res = measure(profile, loop_factory, loop_name)
    text = summary(res)
    print(text)
    print(f"  (run took {res['elapsed_s']:.1f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(res))
        print(f"wrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
