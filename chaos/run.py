"""One fault run: a fresh topology, the load, the fault at a fixed instant, then drain, quiesce, audit.

Timeline (seconds; quick values in brackets):

    start topology -> warm-up 5 [2] -> fault (injector runs; d s) -> recovery window 10 [3]
    -> speakers stop, close their sessions (waits for every owed outcome, bounded)
    -> quiesce (until no slot is taken and no job is live in Redis, bounded) -> audit -> teardown

The phases are timed on purpose: they are the experiment's design. Waits for a state (ready, closed,
quiescent) poll that state with a timeout.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import shutil
import statistics
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .audit import Audit, quiesce
from .faults import FAULTS, Ctx
from .load import Ledger, Speaker
from .monitor import Monitor
from .topology import Shape, Topology


@dataclass
class Load:
    sessions: int = 20
    rate: float = 50.0  # utterances per second, all sessions together
    audio_ms: tuple[int, int] = (1000, 9000)  # simulated job time = 50 ms + 5% of the audio: 100-500 ms
    warmup: float = 5.0
    recovery: float = 10.0

    @classmethod
    def quick(cls) -> Load:
        return cls(warmup=2.0, recovery=3.0)


@dataclass
class FaultResult:
    name: str
    title: str
    sent: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    translated: int = 0
    lost: int = 0
    duplicates: int = 0
    duplicate_repeats: int = 0  # of which: the same job's same outcome again
    failed: int = 0
    leaked: int = 0
    non_terminal: int = 0
    audit: dict[str, Any] = field(default_factory=dict)
    recover_s: float | None = None
    first_ok_s: float | None = None
    baseline: dict[str, Any] = field(default_factory=dict)
    unexpected: dict[str, int] = field(default_factory=dict)
    session_errors: dict[str, int] = field(default_factory=dict)
    error_messages: dict[str, dict[str, int]] = field(default_factory=dict)  # code -> message -> count
    misrouted: int = 0
    forged: int = 0
    forged_kinds: dict[str, int] = field(default_factory=dict)
    forged_samples: list[str] = field(default_factory=list)
    sessions_opened: int = 0
    sessions_lost: int = 0
    send_failures: int = 0
    crashed: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def judge(r: FaultResult, attack: bool) -> list[str]:
    problems = []
    if r.error:
        problems.append(f"run error: {r.error}")
    # "failed" too: in every fault here the failed party (a node, a scheduler process, Redis) is
    # replaced or back within seconds, so every utterance is to wait and be served
    for name in ("lost", "duplicates", "leaked", "non_terminal", "misrouted", "failed"):
        if getattr(r, name):
            problems.append(f"{name.replace('_', '-')} {getattr(r, name)}")
    if r.audit.get("violations"):
        problems.append("I1 violations")
    if r.audit.get("error"):
        problems.append("audit failed")
    if r.forged:
        problems.append(f"forged text delivered {r.forged}")
    if r.crashed:
        problems.append("crashed: " + ", ".join(r.crashed))
    if r.sent == 0:
        problems.append("no load")
    return problems


def recovery(ledger: Ledger, t_fault: float, t_end: float, prompt_s: float) -> tuple[float | None, float | None]:
    """(time to recover, time to first served) after ``t_fault``.

    Recovered: the first instant after the fault from which *every* 1 s window of utterances sent,
    until the load stopped, had at least 80% translated within ``prompt_s`` (the caller takes the
    later of this and first served); a service that collapses later (an attack that knocks the nodes
    out one by one) has not recovered. First served: the first translation_result for an utterance
    sent after the fault."""
    sends = sorted((t, k) for k, t in ledger.sent.items() if t >= t_fault)
    times = [t for t, _ in sends]

    def ok(key: tuple[str, int, str], t: float) -> bool:
        outs = ledger.outcomes.get(key)
        return bool(outs) and outs[0].kind == "translated" and outs[0].at - t <= prompt_s

    good = [ok(k, t) for t, k in sends]
    first = [outs[0].at for t, k in sends if (outs := ledger.outcomes.get(k)) and outs[0].kind == "translated"]
    first_ok = (min(first) - t_fault) if first else None

    def window_ok(lo: float) -> bool:
        a, b = bisect.bisect_left(times, lo), bisect.bisect_left(times, lo + 1.0)
        return b > a and sum(good[a:b]) >= 0.8 * (b - a)

    steps = int((t_end - t_fault - 1.0) / 0.25) + 1
    if steps <= 0:
        return None, first_ok
    recovered: float | None = None
    for i in reversed(range(steps)):  # from the last window back: the start of the final good run
        if not window_ok(t_fault + i * 0.25):
            break
        recovered = i * 0.25
    return recovered, first_ok


def baseline(ledger: Ledger, lo: float, hi: float, t_fault: float) -> dict[str, Any]:
    """Throughput and latency before the fault: translations of utterances sent in [lo, hi) that
    arrived before the fault, so the fault's own delays stay out of the baseline."""
    lat = sorted(outs[0].at - t for k, t in ledger.sent.items() if lo <= t < hi
                 and (outs := ledger.outcomes.get(k)) and outs[0].kind == "translated" and outs[0].at < t_fault)
    if not lat:
        return {"translated/s": 0.0}
    return {"translated/s": round(len(lat) / max(1e-9, hi - lo), 1),
            "latency p50 ms": round(1000 * statistics.median(lat)),
            "latency p95 ms": round(1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))])}


async def run_fault(name: str, *, quick: bool = False, workdir: Path, load: Load | None = None,
                    keep_logs: bool = True, log: Any = print) -> FaultResult:
    fault = FAULTS[name]
    load = load or (Load.quick() if quick else Load())
    shape = Shape()
    if fault.shape is not None:
        fault.shape(shape)
    result = FaultResult(name, fault.title)
    run_dir = fresh_dir(workdir, name)
    topo = Topology(run_dir, shape)
    ledger = Ledger()
    ctx = Ctx(topo, ledger, quick)
    started = time.monotonic()
    speakers: list[Speaker] = []
    try:
        if fault.prepare is not None:
            fault.prepare(ctx)
        await topo.start()
        rng = random.Random(zlib.crc32(name.encode()))
        per_session = load.rate / load.sessions
        speakers = [Speaker(i, topo.session_url, per_session, ledger, random.Random(rng.random()), load.audio_ms)
                    for i in range(load.sessions)]
        disruption = fault.disruption(quick)
        t_load = time.monotonic()
        t_fault = t_load + load.warmup
        t_stop = t_fault + disruption + load.recovery
        talking = [asyncio.create_task(s.run(t_load, t_stop)) for s in speakers]
        monitor = Monitor(topo)
        watching = asyncio.create_task(monitor.run())
        await asyncio.sleep(max(0.0, t_fault - time.monotonic()))  # warm-up (the experiment's design)
        log(f"  [{name}] fault at +{load.warmup:.0f}s: {fault.title}")
        t_fault = time.monotonic()
        await fault.inject(ctx)
        await asyncio.gather(*talking)
        t_end = time.monotonic()
        watching.cancel()
        result.notes["load achieved"] = (f"{len(ledger.sent) / (t_end - t_load):.1f} utterances/s over "
                                         f"{t_end - t_load:.1f} s, {load.sessions} sessions")
        result.notes.update(monitor.summary(t_fault))
        log(f"  [{name}] load stopped after {t_end - t_load:.1f}s; closing sessions")
        s = shape
        drain = (s.setting_ms("outcome_check_ms") + s.setting_ms("pending_timeout_ms") + s.setting_ms("job_timeout_ms")) / 1000 + 3
        await asyncio.gather(*(sp.close(drain) for sp in speakers))
        attempts = 3
        bound = (attempts * s.setting_ms("job_timeout_ms") + s.setting_ms("pending_timeout_ms")
                 + s.setting_ms("node_ttl_ms")) / 1000
        audit, waited = await quiesce(topo.rc, bound)
        log(f"  [{name}] quiescent check after {waited:.1f}s")
        seen = await topo.counters(("dragoman_redis_failovers_total", "dragoman_redis_data_lost_total",
                                    "dragoman_session_events_total"))
        if any(seen.values()):
            result.notes["what the schedulers saw (their /metrics, summed)"] = {
                k.removeprefix("dragoman_"): int(v) for k, v in seen.items() if v}
        _fill(result, ledger, audit)
        margin = min(1.0, load.warmup / 4)
        base = baseline(ledger, t_load + margin, t_fault - margin, t_fault)
        result.baseline = base
        prompt = max(2.0, 3 * base.get("latency p95 ms", 0) / 1000)
        result.baseline["prompt s"] = round(prompt, 2)
        result.recover_s, result.first_ok_s = recovery(ledger, t_fault, t_end, prompt)
        if result.recover_s is not None and result.first_ok_s is not None:
            result.recover_s = max(result.recover_s, result.first_ok_s)
        for proc in topo.processes():
            if not proc.alive() and proc.name not in ctx.killed:
                result.crashed.append(f"{proc.name} (exit {proc.popen.returncode})")
        if topo.node_proxy and topo.session_proxy:
            result.notes["proxy failovers (nodes, sessions)"] = (topo.node_proxy.failovers,
                                                                  topo.session_proxy.failovers)
    except Exception as exc:  # report it as the fault's result rather than stopping the suite
        result.error = f"{type(exc).__name__}: {exc}"
        (run_dir / "harness-error.txt").write_text(traceback.format_exc())
        log(f"  [{name}] harness error: {result.error} (traceback in {run_dir / 'harness-error.txt'})")
        _fill(result, ledger, Audit(error="not audited"))
    finally:
        for sp in speakers:
            sp.closing = True
        await topo.stop()
        if not keep_logs:
            shutil.rmtree(run_dir, ignore_errors=True)
    result.notes.update(ctx.notes)
    result.seconds = round(time.monotonic() - started, 1)
    result.problems = judge(result, fault.attack)
    return result


def fresh_dir(workdir: Path, name: str) -> Path:
    """An empty directory for one run (absolute: valkey-server changes into its --dir)."""
    run_dir = workdir.resolve() / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return run_dir


def _fill(result: FaultResult, ledger: Ledger, audit: Audit) -> None:
    c = ledger.counts()
    result.sent, result.kinds, result.translated = c["sent"], c["kinds"], c["translated"]
    result.lost, result.duplicates, result.failed = c["lost"], c["duplicates"], c["failed"]
    result.duplicate_repeats = c["duplicate_repeats"]
    result.leaked, result.non_terminal = audit.leaked, audit.non_terminal
    result.audit = {"nodes": audit.nodes, "violations": audit.violations[:10],
                    "non_terminal_states": audit.non_terminal_states, "error": audit.error}
    result.unexpected = dict(ledger.unexpected)
    result.session_errors = dict(ledger.session_errors)
    result.error_messages = {code: dict(c.most_common(3)) for code, c in ledger.error_samples.items()}
    result.misrouted, result.forged, result.forged_samples = ledger.misrouted, ledger.forged, ledger.forged_samples
    result.forged_kinds = dict(ledger.forged_kinds)
    result.sessions_opened, result.sessions_lost = ledger.sessions_opened, ledger.sessions_lost
    result.send_failures = ledger.send_failures
