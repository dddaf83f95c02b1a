"""Where the scheduler's CPU goes: py-spy (from PyPI, in the bench-only ``.bench/venv-pyspy``)
samples the scheduler process over one closed-loop window of an extra Dragoman round (its rate is
not in the tables: the profiler perturbs it), and the collapsed stacks are folded three ways
(component, event-loop task, Dragoman function), each share turned into µs per job by the
scheduler's CPU per job in that round (from /proc).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from bench.peers import install as peer_install


def pyspy_exe() -> str | None:
    exe = peer_install.venv_dir("pyspy") / "bin" / "py-spy"
    return str(exe) if exe.exists() else None


def start_record(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes]:
    """py-spy record of one process (and its threads) for ``seconds``, raw collapsed stacks to ``out``;
    ``--nonblocking``: the process is not paused to sample it."""
    exe = pyspy_exe()
    assert exe is not None
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))), "--rate", "250",
         "--format", "raw", "--nonblocking", "--full-filenames", "--output", str(out)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


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
