"""End-to-end fixtures: real scheduler processes (``dragoman serve``) on the embedded Valkey."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from dragoman.embedded import free_port

FAST = {  # short timeouts so failure paths finish in seconds
    "DRAGOMAN_HEARTBEAT_INTERVAL_MS": "300",
    "DRAGOMAN_NODE_TTL_MS": "1500",
    "DRAGOMAN_JOB_TIMEOUT_MS": "2500",
    "DRAGOMAN_REAPER_INTERVAL_MS": "100",
    "DRAGOMAN_PENDING_TIMEOUT_MS": "4000",
    "DRAGOMAN_OUTCOME_CHECK_MS": "1000",
    "DRAGOMAN_PAUSE_MS": "800",
    "DRAGOMAN_WARMUP_MS": "0",  # tests that restart Redis set their own
    "DRAGOMAN_PROC_TTL_MS": "1500",
}


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self.popen = subprocess.Popen(args, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill(signal.SIGKILL)
                self.popen.wait()
        return self.popen.returncode


def wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} not ready within {timeout}s")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def start(*args: str, env: dict[str, str] | None = None, name: str = "proc") -> Proc:
        full_env = os.environ | (env or {})
        p = Proc([sys.executable, "-m", "dragoman.cli.main", *args], full_env, tmp_path / f"{name}-{len(procs)}.log")
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


class Scheduler(str):
    """A scheduler's base URL (http://127.0.0.1:PORT), with its process."""

    proc: Proc


@pytest.fixture
def scheduler(spawn, redis_url: str) -> Callable[..., Scheduler]:
    """Start a scheduler process; returns its base URL (``.proc`` is the process)."""

    def start(**overrides: str) -> Scheduler:
        port = free_port()
        env = FAST | {"DRAGOMAN_REDIS_URL": redis_url, "DRAGOMAN_PORT": str(port)} | overrides
        proc = spawn("serve", env=env, name="serve")
        base = Scheduler(f"http://127.0.0.1:{port}")
        base.proc = proc
        wait_http(base + "/readyz")
        return base

    return start
