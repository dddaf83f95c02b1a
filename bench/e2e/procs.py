"""Child processes of the comparison (each in its own process group, killed as a group) and /proc readings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads (/proc/<pid>/stat); nan when gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan"), float("nan")


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (the leader and, e.g., ``serve --workers N``'s children)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[2] == str(pgid):
            pids.append(int(entry))
    return pids


def group_times(pgid: int) -> dict[int, tuple[float, float]]:
    """(user, system) CPU seconds of each process of a process group, by pid."""
    return {pid: proc_times(pid) for pid in group_pids(pgid)}


def rss_kb(pid: int) -> int:
    """Resident set size of a process in kB (VmRSS), 0 when gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft open-files limit to the hard limit; returns (soft, hard) after."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def ctx_switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a process's main thread."""
    vol = invol = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    vol = int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    invol = int(line.split()[1])
    except (OSError, ValueError):
        pass
    return vol, invol


def system_busy_s() -> float:
    """CPU seconds the whole machine spent busy (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        return (sum(vals[:8]) - idle) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when the runner dies, even by SIGKILL; and as many
    open files as the hard limit allows (the idle-socket benchmark holds over 10,000)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    raise_nofile()


class Proc:
    """One child process in its own session/process group. Its stdout is read line by line: JSON
    objects with an ``event`` key go to ``events`` (and to ``on_event`` at once, for the window
    edges); everything else, and all of stderr, goes to ``log_path``."""

    live: set[Proc] = set()  # every Proc not yet stopped, for the cleanup on exit

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 cwd: str | Path | None = None, on_event: Callable[[Proc, dict[str, Any]], None] | None = None):
        self.name, self.argv, self.log_path, self.env, self.cwd = name, argv, log_path, env, cwd
        self.on_event = on_event
        self.proc: asyncio.subprocess.Process | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.tail: deque[str] = deque(maxlen=20)
        self._readers: list[asyncio.Task[None]] = []
        self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> Proc:
        self._log = open(self.log_path, "a", buffering=1)  # noqa: ASYNC230 - a local log file, closed in stop()
        self._log.write(f"$ {' '.join(self.argv)}\n")
        env = dict(os.environ, **(self.env or {}))
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=env, cwd=self.cwd, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None, limit=16 * 1024 * 1024)
        Proc.live.add(self)
        self._readers = [asyncio.create_task(self._read(self.proc.stdout, True)),
                         asyncio.create_task(self._read(self.proc.stderr, False))]
        return self

    async def _read(self, stream: asyncio.StreamReader | None, parse: bool) -> None:
        assert stream is not None
        while True:
            line = await stream.readline()
            if not line:
                break
            text = line.decode(errors="replace").rstrip("\n")
            if parse and text.startswith("{"):
                try:
                    ev = json.loads(text)
                except ValueError:
                    ev = None
                if isinstance(ev, dict) and "event" in ev:
                    ev["_recv"] = time.perf_counter()
                    if self.on_event is not None:
                        self.on_event(self, ev)
                    self.events.put_nowait(ev)
                    if self._log:
                        self._log.write(text[:2000] + "\n")
                    continue
            self.tail.append(text[:500])
            if self._log:
                self._log.write(text + "\n")

    async def next_event(self, kinds: tuple[str, ...], timeout: float) -> dict[str, Any]:
        """The next event of these kinds; raises when the process exits first or the time is up."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no {'/'.join(kinds)} within {timeout:.0f} s; "
                                   f"last output: {' | '.join(self.tail)}")
            get = asyncio.ensure_future(self.events.get())
            exited = asyncio.ensure_future(self.proc.wait()) if self.proc else None
            waiters = {get} | ({exited} if exited else set())
            done, _ = await asyncio.wait(waiters, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if get in done:
                if exited:
                    exited.cancel()
                ev = get.result()
                if ev.get("event") in kinds:
                    return ev
                continue
            get.cancel()
            if exited and exited in done:
                await asyncio.sleep(0.2)  # let the readers drain the pipes
                while not self.events.empty():
                    ev = self.events.get_nowait()
                    if ev.get("event") in kinds:
                        return ev
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) before {'/'.join(kinds)}; "
                                   f"last output: {' | '.join(self.tail)}")

    async def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None

    async def stop(self, grace: float = 5.0) -> None:
        """SIGTERM to the whole process group, then SIGKILL after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            if await self.wait(grace) is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                await self.wait(5)
        # the group may still hold children of the leader
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for r in self._readers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(r, 2)
        if self._log:
            self._log.close()
            self._log = None
        Proc.live.discard(self)

    @classmethod
    def kill_all_now(cls) -> None:
        """Last resort (exit paths without an event loop): SIGKILL every group still live."""
        for p in list(cls.live):
            if p.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.proc.pid, signal.SIGKILL)
        cls.live.clear()
