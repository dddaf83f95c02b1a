"""Closed- and open-loop load for one submitter process, and the JSON-lines it reports (stdlib only).

Every load program of the end-to-end comparison (the Python peers run from their own bench
virtualenvs, Dragoman's session generator from the project's) drives its jobs through these two
loops, so they are measured the same way:

* closed loop: ``inflight`` coroutines (or threads), each submitting one job and waiting for its
  result, then the next; after ``warmup`` seconds, the completions of one ``window`` are counted;
* open loop: jobs are started at a fixed ``rate`` (a schedule, not a reaction to completions); the
  latency (submit -> result in hand) of every job *started* inside the window is kept; after the
  window the loop waits up to ``drain`` seconds for stragglers, and counts the ones still missing
  as ``lost``.

A program prints, one JSON object per line on stdout (the runner reads them as they come):
``{"event": "ready", ...}`` when it can take load, ``{"event": "window", "phase": P, "edge":
"start"|"end"}`` at the window's edges (the runner samples /proc and Redis INFO there), and
``{"event": "result", "phase": P, ...}`` with the figures. Anything else goes to stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_print_lock = threading.Lock()


def emit(event: str, **fields: Any) -> None:
    line = json.dumps({"event": event, "t": time.time(), **fields})
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def error_frame_seen(stats: Any, code: str | None, message: str | None, who: str) -> None:
    """Count an ``error`` frame in ``stats`` (``errors``, ``first_error``); the first is logged."""
    stats.errors += 1
    if not stats.first_error:
        stats.first_error = f"{code}: {message}"
        log(f"{who}: error frame {stats.first_error}")


def pct(sorted_vals: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_vals:
        return float("nan")
    i = min(len(sorted_vals) - 1, max(0, round(q / 100 * len(sorted_vals) + 0.5) - 1))
    return sorted_vals[i]


def summarize_ms(lat_s: list[float]) -> dict[str, float]:
    vals = sorted(v * 1000 for v in lat_s)
    n = len(vals)
    return {"n": n, "mean": sum(vals) / n if n else float("nan"), "p50": pct(vals, 50), "p90": pct(vals, 90),
            "p99": pct(vals, 99), "max": vals[-1] if vals else float("nan")}


def cpu_s() -> float:
    """This process's CPU seconds (all threads)."""
    t = os.times()
    return t.user + t.system


# --------------------------------------------------------------------------------------- asyncio
async def closed_loop(one: Callable[[int], Awaitable[Any]], inflight: int, warmup: float, window: float,
                      phase: str = "closed") -> dict[str, Any]:
    """``inflight`` coroutines run ``await one(slot)`` back to back; the completions of one window
    after the warm-up are counted."""
    st = {"done": 0, "errors": 0, "stop": False, "first_error": ""}
    lat: list[float] = []
    recording = [False]

    async def worker(slot: int) -> None:
        while not st["stop"]:
            t0 = time.perf_counter()
            try:
                await one(slot)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                st["errors"] += 1
                st["first_error"] = st["first_error"] or repr(exc)[:300]
                await asyncio.sleep(0.01)
                continue
            st["done"] += 1
            if recording[0]:
                lat.append(time.perf_counter() - t0)

    tasks = [asyncio.create_task(worker(i)) for i in range(inflight)]
    await asyncio.sleep(warmup)
    emit("window", phase=phase, edge="start")
    d0, e0, c0, t0 = st["done"], st["errors"], cpu_s(), time.perf_counter()
    recording[0] = True
    await asyncio.sleep(window)
    d1, e1, c1, t1 = st["done"], st["errors"], cpu_s(), time.perf_counter()
    emit("window", phase=phase, edge="end")
    recording[0] = False
    st["stop"] = True
    done, pending = await asyncio.wait(tasks, timeout=10)
    for t in pending:
        t.cancel()
    secs = t1 - t0
    return {"phase": phase, "mode": "closed", "inflight": inflight, "completed": d1 - d0, "seconds": secs,
            "rate": (d1 - d0) / secs, "errors": e1 - e0, "first_error": st["first_error"],
            "latency_ms": summarize_ms(lat), "gen_cpu": (c1 - c0) / secs, "unfinished_at_stop": len(pending)}


async def open_loop(one: Callable[[int], Awaitable[Any]], rate: float, warmup: float, window: float,
                    drain: float = 5.0, phase: str = "open") -> dict[str, Any]:
    """Start ``one(i)`` at ``rate`` per second for warmup + window seconds; latencies of the jobs
    started inside the window."""
    st = {"errors": 0, "first_error": ""}
    lat: list[float] = []
    lags: list[float] = []
    window_jobs: set[asyncio.Task[Any]] = set()
    all_jobs: set[asyncio.Task[Any]] = set()

    async def job(i: int, t0: float, record: bool) -> None:
        # latency from the moment the pacer started the job (task start-up delays count against it)
        try:
            await one(i)
        except Exception as exc:  # noqa: BLE001
            st["errors"] += 1
            st["first_error"] = st["first_error"] or repr(exc)[:300]
            return
        if record:
            lat.append(time.perf_counter() - t0)

    # perf_counter, not loop.time(): uvloop's clock has millisecond resolution
    clock = time.perf_counter
    start = clock()
    w_start, w_end = start + warmup, start + warmup + window
    i, started = 0, False
    c0 = t0 = 0.0
    sent_in_window = 0
    while True:
        due = start + i / rate
        if due >= w_end:
            break
        now = clock()
        if due > now:
            await asyncio.sleep(due - now)
            now = clock()
        if not started and due >= w_start:
            started = True
            emit("window", phase=phase, edge="start")
            c0, t0 = cpu_s(), time.perf_counter()
        record = due >= w_start
        if record:
            lags.append(now - due)
            sent_in_window += 1
        task = asyncio.create_task(job(i, clock(), record))
        all_jobs.add(task)
        task.add_done_callback(all_jobs.discard)
        if record:
            window_jobs.add(task)
            task.add_done_callback(window_jobs.discard)
        i += 1
    now = clock()
    if w_end > now:
        await asyncio.sleep(w_end - now)
    c1, t1 = cpu_s(), time.perf_counter()
    emit("window", phase=phase, edge="end")
    if window_jobs:
        await asyncio.wait(set(window_jobs), timeout=drain)
    lost = len(window_jobs)
    for t in list(all_jobs):
        t.cancel()
    secs = t1 - t0
    return {"phase": phase, "mode": "open", "target_rate": rate, "sent": sent_in_window,
            "completed": len(lat), "seconds": secs, "rate": len(lat) / secs if secs else float("nan"),
            "errors": st["errors"], "first_error": st["first_error"], "lost": lost,
            "latency_ms": summarize_ms(lat), "send_lag_ms": summarize_ms(lags), "gen_cpu": (c1 - c0) / secs}


async def idle_phase(window: float, phase: str = "idle") -> dict[str, Any]:
    """A window with no load at all: what the system costs while connected and idle."""
    emit("window", phase=phase, edge="start")
    c0, t0 = cpu_s(), time.perf_counter()
    await asyncio.sleep(window)
    c1, t1 = cpu_s(), time.perf_counter()
    emit("window", phase=phase, edge="end")
    return {"phase": phase, "mode": "idle", "completed": 0, "seconds": t1 - t0, "rate": 0.0, "errors": 0,
            "latency_ms": summarize_ms([]), "gen_cpu": (c1 - c0) / (t1 - t0)}


# --------------------------------------------------------------------------------------- threads
def closed_loop_threads(one: Callable[[int], Any], inflight: int, warmup: float, window: float,
                        phase: str = "closed") -> dict[str, Any]:
    """The closed loop for a blocking client (one thread per job in flight)."""
    lock = threading.Lock()
    st = {"done": 0, "errors": 0, "first_error": ""}
    stop = threading.Event()
    recording = threading.Event()
    lat: list[float] = []

    def worker(slot: int) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                one(slot)
            except Exception as exc:  # noqa: BLE001
                with lock:
                    st["errors"] += 1
                    st["first_error"] = st["first_error"] or repr(exc)[:300]
                time.sleep(0.01)
                continue
            dt = time.perf_counter() - t0
            with lock:
                st["done"] += 1
                if recording.is_set():
                    lat.append(dt)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(inflight)]
    for t in threads:
        t.start()
    time.sleep(warmup)
    emit("window", phase=phase, edge="start")
    with lock:
        d0, e0 = st["done"], st["errors"]
    c0, t0 = cpu_s(), time.perf_counter()
    recording.set()
    time.sleep(window)
    with lock:
        d1, e1 = st["done"], st["errors"]
    c1, t1 = cpu_s(), time.perf_counter()
    emit("window", phase=phase, edge="end")
    recording.clear()
    stop.set()
    for t in threads:
        t.join(timeout=10)
    secs = t1 - t0
    return {"phase": phase, "mode": "closed", "inflight": inflight, "completed": d1 - d0, "seconds": secs,
            "rate": (d1 - d0) / secs, "errors": e1 - e0, "first_error": st["first_error"],
            "latency_ms": summarize_ms(lat), "gen_cpu": (c1 - c0) / secs,
            "unfinished_at_stop": sum(t.is_alive() for t in threads)}


def open_loop_threads(one: Callable[[int], Any], rate: float, warmup: float, window: float, drain: float = 5.0,
                      phase: str = "open", max_threads: int = 200) -> dict[str, Any]:
    """The open loop for a blocking client: a pacer hands each job to a thread pool."""
    lock = threading.Lock()
    st = {"errors": 0, "first_error": ""}
    lat: list[float] = []
    lags: list[float] = []
    pool = ThreadPoolExecutor(max_workers=max_threads)
    window_futs = []

    def job(i: int, t_sched: float, record: bool) -> None:
        # latency from the scheduled submit time: a pool thread that starts late counts against it
        try:
            one(i)
        except Exception as exc:  # noqa: BLE001
            with lock:
                st["errors"] += 1
                st["first_error"] = st["first_error"] or repr(exc)[:300]
            return
        if record:
            with lock:
                lat.append(time.perf_counter() - t_sched)

    start = time.perf_counter()
    w_start, w_end = start + warmup, start + warmup + window
    i, started = 0, False
    c0 = t0 = 0.0
    while True:
        due = start + i / rate
        if due >= w_end:
            break
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
            now = time.perf_counter()
        if not started and due >= w_start:
            started = True
            emit("window", phase=phase, edge="start")
            c0, t0 = cpu_s(), time.perf_counter()
        record = due >= w_start
        if record:
            lags.append(now - due)
        fut = pool.submit(job, i, time.perf_counter(), record)
        if record:
            window_futs.append(fut)
        i += 1
    now = time.perf_counter()
    if w_end > now:
        time.sleep(w_end - now)
    c1, t1 = cpu_s(), time.perf_counter()
    emit("window", phase=phase, edge="end")
    deadline = time.perf_counter() + drain
    for f in window_futs:
        try:
            f.result(timeout=max(0.0, deadline - time.perf_counter()))
        except Exception:  # noqa: BLE001 - timeouts are counted as lost below
            pass
    lost = sum(not f.done() for f in window_futs)
    pool.shutdown(wait=False, cancel_futures=True)
    secs = t1 - t0
    return {"phase": phase, "mode": "open", "target_rate": rate, "sent": len(window_futs),
            "completed": len(lat), "seconds": secs, "rate": len(lat) / secs if secs else float("nan"),
            "errors": st["errors"], "first_error": st["first_error"], "lost": lost,
            "latency_ms": summarize_ms(lat), "send_lag_ms": summarize_ms(lags), "gen_cpu": (c1 - c0) / secs}


# --------------------------------------------------------------------------------------- CLI glue
def add_load_args(ap: Any) -> None:
    """The arguments every submitter takes (argparse)."""
    ap.add_argument("--redis-url", required=True)
    ap.add_argument("--inflight", type=int, default=50)
    ap.add_argument("--rate", type=float, default=200.0, help="open loop: jobs started per second")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--drain", type=float, default=5.0)
    ap.add_argument("--phases", default="closed,open", help="closed, open (and idle, where supported), "
                    "comma separated, run in that order")
    ap.add_argument("--idle-window", type=float, default=2.0, help="length of the idle phase")


def phases(args: Any) -> list[str]:
    return [p.strip() for p in args.phases.split(",") if p.strip()]


async def run_phases(args: Any, one: Callable[[int], Awaitable[Any]],
                     extra: Callable[[], dict[str, Any]] | None = None) -> None:
    """Runs the asked phases in order (closed loop, open loop, idle) with ``one`` as the job and emits
    each phase's result line. ``extra``, called as a phase starts, returns what adds fields to its
    result when it ends (e.g. counters taken as differences over the phase)."""
    for phase in phases(args):
        finish = extra() if extra is not None else None
        if phase == "idle":
            res = await idle_phase(args.idle_window)
        elif phase == "closed":
            res = await closed_loop(one, args.inflight, args.warmup, args.window)
        else:
            res = await open_loop(one, args.rate, args.warmup, args.window, args.drain)
        if finish is not None:
            res.update(finish())
        emit("result", **res)
