"""The comparison itself: Dragoman end to end and the job-queue peers, alternating rounds, one Redis.

See the package docstring (``bench/e2e/__init__.py``) for what is measured and how to run it. This
module holds the load profiles, the systems compared, the round-robin over them (``alternate``,
also used by ``bench.e2e.durability``) and the analysis against the issue's targets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis

from bench.e2e import facts, floor, pyspy
from bench.e2e.meter import aggregate, median
from bench.e2e.procs import Proc, loadavg
from bench.e2e.systems import PEER_PACKAGE, Context, DragomanSpec, log, run_dragoman, run_peer
from bench.peers import install as peer_install

ROOT = Path(__file__).resolve().parents[2]

ALL_SYSTEMS = ("dragoman", "bullmq", "arq10", "arq", "celery", "saq")
# ``dragoman serve --workers N``: closed loop only (the scaling question is throughput)
SCALING = ("dragoman-w1", "dragoman-w2")
# Not in the default run: the same scheduler code with uvloop's event loop installed from outside.
EXPERIMENTS = ("dragoman-uvloop",)
KNOWN_SYSTEMS = ALL_SYSTEMS + SCALING + EXPERIMENTS
DRAGOMAN_SPECS = {
    "dragoman": DragomanSpec(),
    "dragoman-w1": DragomanSpec(workers=1, phases=("closed",)),
    "dragoman-w2": DragomanSpec(workers=2, phases=("closed",)),
    "dragoman-uvloop": DragomanSpec(uvloop=True),
}
LABELS = {"dragoman": "Dragoman (2 WebSockets)", "dragoman-uvloop": "Dragoman, scheduler on uvloop (experiment)",
          "dragoman-w1": "Dragoman, serve --workers 1", "dragoman-w2": "Dragoman, serve --workers 2",
          "bullmq": "BullMQ", "arq10": "arq (poll 10 ms)", "arq": "arq (default, poll 0.5 s)",
          "celery": "Celery (threads pool)", "saq": "SAQ (apply, default)"}


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
    profile_phase: str = "closed"  # the window the profile round samples
    # the floor under the scheduler's CPU per job: a bare uvloop relay doing only a job's socket
    # work under the same closed loop (bench/e2e/floor.py), run this many times after the rounds
    floor_runs: int = 0


FULL = Profile("full", warmup=2.0, window=5.0, drain=5.0, rounds=3, systems=ALL_SYSTEMS + SCALING,
               profile_scheduler=True, floor_runs=3)
QUICK = Profile("quick", warmup=1.0, window=2.5, drain=3.0, rounds=1, systems=("dragoman", "bullmq", "arq10"))
PROFILES = {"full": FULL, "quick": QUICK}


async def alternate(names: list[str], rounds: int, run_one: Callable[[str, int], Awaitable[dict[str, Any]]],
                    before_each: Callable[[], None] | None = None
                    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[str]]]:
    """Round 1 of every system, then round 2 of every system, ...: a change in the machine's load
    hits them alike. A failed round of one system is recorded and never stops the others."""
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in names}
    errors: dict[str, list[str]] = {s: [] for s in names}
    for rnd in range(1, rounds + 1):
        for s in names:
            if before_each is not None:
                before_each()
            log(f"round {rnd}/{rounds}: {s} ...")
            t0 = time.perf_counter()
            try:
                r = await run_one(s, rnd)
            except Exception as exc:  # noqa: BLE001 - one failed round of one system never stops the run
                errors[s].append(f"round {rnd}: {exc!r}"[:600])
                log(f"  {s} round {rnd} failed: {exc!r}"[:600])
                continue
            r["elapsed_s"] = time.perf_counter() - t0
            results[s].append(r)
            c, o = r.get("closed", {}), r.get("open", {})
            line = f"  {s}: closed {c.get('rate', float('nan')):,.0f}/s"
            if o:
                line += (f", open p50/p99 {o.get('latency_ms', {}).get('p50', float('nan')):.2f}/"
                         f"{o.get('latency_ms', {}).get('p99', float('nan')):.2f} ms")
            log(f"{line} ({r['elapsed_s']:.0f} s)")
    return results, errors


def install_peers(systems: tuple[str, ...], install: bool) -> tuple[dict[str, Any], dict[str, str]]:
    """Install (or only check) what the peers among ``systems`` need: (install report, skipped)."""
    wanted = sorted({PEER_PACKAGE[s] for s in systems if s in PEER_PACKAGE})
    skipped: dict[str, str] = {}
    if not wanted:
        return {}, skipped
    t0 = time.perf_counter()
    if install:
        log(f"installing/checking peers ({', '.join(wanted)}) in {peer_install.BENCH_HOME} ...")
        got = peer_install.install(wanted)
    else:
        got = {pkg: peer_install.InstallResult(pkg, peer_install.is_installed(pkg), "", skipped=True,
                                               error="" if peer_install.is_installed(pkg) else "not installed")
               for pkg in wanted}
    installed = {k: dataclasses.asdict(v) for k, v in got.items()}
    for s in systems:
        pkg = PEER_PACKAGE.get(s)
        if pkg and not installed.get(pkg, {}).get("ok"):
            skipped[s] = f"{pkg} not installed: {installed.get(pkg, {}).get('error', '?')}"
            log(f"  skipping {s}: {skipped[s]}")
    return {"seconds": time.perf_counter() - t0, "results": installed}, skipped


async def _profile_round(ctx: Context, logdir: Path) -> dict[str, Any]:
    """An extra Dragoman round with py-spy over the closed-loop window: the scheduler's CPU by component."""
    if pyspy.pyspy_exe() is None:
        got = await asyncio.to_thread(peer_install.install, ["pyspy"])
        if not got["pyspy"].ok:
            return {"error": f"py-spy not installed: {got['pyspy'].error}"}
    phase = ctx.profile.profile_phase
    log(f"profiling the scheduler (extra Dragoman round, py-spy over the {phase}-loop window) ...")
    spy_out = logdir / "scheduler-pyspy.txt"
    try:
        r = await run_dragoman(ctx, 0, DragomanSpec(phases=(phase,)), name="dragoman-profile", spy_out=spy_out)
    except Exception as exc:  # noqa: BLE001 - the profile is a diagnostic
        return {"error": repr(exc)[:500]}
    us = r[phase]["cpu_us_per_job"]["scheduler"]
    text = spy_out.read_text() if spy_out.exists() else ""
    return {"tool": "py-spy (sampling, 250 Hz, --nonblocking)", "phase": phase, f"{phase}_rate": r[phase]["rate"],
            "scheduler_cpu_us_per_job": us, **pyspy.analyse_profile(text, us)}


async def _run(profile: Profile, logdir: Path) -> dict[str, Any]:
    from dragoman.embedded import EmbeddedServer

    t_start = time.perf_counter()
    res: dict[str, Any] = {"profile": dataclasses.asdict(profile), "skipped": {}, "systems": {}, "raw": {}}
    install, skipped = await asyncio.to_thread(install_peers, profile.systems, profile.install)
    if install:
        res["install"] = install
    res["skipped"].update(skipped)
    if any(s in SCALING for s in profile.systems) and not await asyncio.to_thread(facts.serve_has_workers):
        for s in SCALING:
            if s in profile.systems:
                res["skipped"][s] = "not available: `dragoman serve` has no --workers flag in this tree"
                log(f"  skipping {s}: {res['skipped'][s]}")
    systems = [s for s in profile.systems if s not in res["skipped"]]
    installed = (install or {}).get("results", {})

    with EmbeddedServer() as server:
        assert server.proc is not None
        admin = redis.Redis.from_url(server.url, decode_responses=True)
        info = admin.info("server")
        res["env"] = {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), **facts.machine(),
            "loadavg_start": loadavg(), "commit": facts.commit(),
            "server": f"valkey {info.get('valkey_version')}" if info.get("valkey_version")
            else f"redis {info.get('redis_version')}", "io_threads": info.get("io_threads_active", 0),
            "versions": facts.versions(profile.systems, installed)}
        ctx = Context(profile, server.url, server.proc.pid, logdir)

        async def run_one(s: str, rnd: int) -> dict[str, Any]:
            if s in DRAGOMAN_SPECS:
                return await run_dragoman(ctx, rnd, DRAGOMAN_SPECS[s], name=s)
            return await run_peer(ctx, s, rnd)

        rounds, errors = await alternate(systems, profile.rounds, run_one, admin.flushall)
        if profile.profile_scheduler and "dragoman" in systems:
            admin.flushall()
            res["scheduler_profile"] = await _profile_round(ctx, logdir)
        admin.flushall()
        admin.close()
        ctx.close()
    for s in systems:
        res["raw"][s] = rounds[s]
        if rounds[s]:
            res["systems"][s] = aggregate(rounds[s])
            if errors[s]:
                res["systems"][s]["failed_rounds"] = errors[s]
        else:
            res["skipped"][s] = "every round failed: " + "; ".join(errors[s])
    if profile.floor_runs and "closed" in res["systems"].get("dragoman", {}):
        rate = res["systems"]["dragoman"]["closed"]["rate"]  # (paced to it: as many wake-ups per job)
        runs = [await asyncio.to_thread(floor.measure, profile.window, profile.warmup, rate)
                for _ in range(profile.floor_runs)]
        unpaced = await asyncio.to_thread(floor.measure, profile.window, profile.warmup)
        res["floor"] = {"runs": runs, "us_per_job": median([r["us_per_job"] for r in runs]),
                        "jobs_per_s": median([r["jobs_per_s"] for r in runs]), "unpaced": unpaced}
    res["analysis"] = analyse(res)
    res["env"]["loadavg_end"] = loadavg()
    res["elapsed_s"] = time.perf_counter() - t_start
    res["logdir"] = str(logdir)
    return res


def analyse(res: dict[str, Any]) -> dict[str, Any]:
    """Dragoman against the issue's targets, as ratios (never asserted)."""
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
            a[f"closed_vs_{peer}_rounds_median"] = median(per_round(peer))
    if rate("bullmq") and "open" in d:
        a["closed_vs_bullmq"] = d["closed"]["rate"] / rate("bullmq")
        a["closed_ge_bullmq"] = a["closed_vs_bullmq"] >= 1.0
        a["open_p99_vs_bullmq"] = d["open"]["p99_ms"] / s["bullmq"]["open"]["p99_ms"]
        a["open_p99_le_bullmq"] = d["open"]["p99_ms"] <= s["bullmq"]["open"]["p99_ms"]
    if rate("arq10"):
        a["closed_vs_arq10"] = d["closed"]["rate"] / rate("arq10")
        a["closed_ge_2x_arq10"] = a["closed_vs_arq10"] >= 2.0
    for phase in ("closed", "open"):
        if phase in d:
            us = d[phase]["cpu_us_per_job"].get("scheduler", float("nan"))
            a[f"scheduler_cpu_us_per_job_{phase}"] = us
            a[f"scheduler_cpu_le_400us_{phase}"] = us <= 400
    audits = [r["audit"] for name, rounds in res.get("raw", {}).items() if name in DRAGOMAN_SPECS
              for r in rounds if "audit" in r]
    if audits:
        a["audit_rounds"] = len(audits)
        a["audit_slots_held"] = sum(x["slots_held"] for x in audits)
        a["audit_jobs_not_ended"] = sum(x["jobs_not_ended"] for x in audits)
        a["audit_problems"] = [p for x in audits for p in ([x["error"]] if x["error"] else []) + x["violations"]]
        a["audit_clean"] = all(x["clean"] for x in audits)
    for w in SCALING:
        if w in s and "closed" in s[w]:
            a[f"scaling_{w}_vs_dragoman"] = s[w]["closed"]["rate"] / d["closed"]["rate"]
    if "dragoman-w1" in s and "dragoman-w2" in s:
        a["scaling_w2_vs_w1"] = s["dragoman-w2"]["closed"]["rate"] / s["dragoman-w1"]["closed"]["rate"]
    return a


def run_comparison(profile: Profile | str = "full", logdir: Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Run the whole comparison and return every figure as a dict (``bench.e2e.report.summary(res)``
    prints it, ``report.markdown(res)`` makes a page section). ``profile``: ``"full"``, ``"quick"``
    or a Profile; ``overrides``: Profile fields (e.g. ``rounds=1``, ``systems=("dragoman", "bullmq")``)."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    if overrides:
        prof = dataclasses.replace(prof, **overrides)
    if logdir is None:
        logdir = new_logdir()
    logdir.mkdir(parents=True, exist_ok=True)
    try:
        return asyncio.run(_run(prof, logdir))
    finally:
        Proc.kill_all_now()


KEEP_LOGS = 30  # run log folders kept under BENCH_HOME/logs (the oldest are removed)


def new_logdir(tag: str = "") -> Path:
    """A fresh folder for one run's logs (child processes' output), the oldest beyond KEEP_LOGS removed."""
    import shutil

    root = peer_install.BENCH_HOME / "logs"
    d = root / (time.strftime("%Y%m%d-%H%M%S") + (f"-{tag}" if tag else ""))
    d.mkdir(parents=True, exist_ok=True)
    for old in sorted(p for p in root.iterdir() if p.is_dir())[:-KEEP_LOGS]:
        shutil.rmtree(old, ignore_errors=True)
    return d
