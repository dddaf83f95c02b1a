"""One fault run's world: a fresh Valkey, two scheduler processes, node agents, and the proxies.

    valkey (EmbeddedServer, fixed port so it can be restarted in place)
      ^                ^
    scheduler A      scheduler B          (``python -m dragoman.cli.main serve``, one Redis)
      ^ preferred      ^ preferred
    node proxy       session proxy        (chaos/proxy.py; each fails over to the other scheduler)
      ^                ^
    node agents      speakers             (``dragoman node --engine simulated`` / SessionClient)

Every child process gets its own process group and ``PR_SET_PDEATHSIG`` (SIGKILL), so nothing
survives the harness, even when the harness itself is killed; ``stop`` kills the groups anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from dragoman.config import Settings
from dragoman.embedded import EmbeddedCluster, EmbeddedSentinelSet, EmbeddedServer, free_port
from dragoman.store.connect import make_client
from dragoman.store.keys import CellKeys, cell_of_node

from .proxy import Proxy

PAIRS = "zh:en,en:zh"

# The shipped defaults: what is promised is what an operator gets without tuning anything.
SCHEDULER_ENV = {"DRAGOMAN_LOG_LEVEL": "warning"}


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the harness dies (Linux), so no process outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


async def poll_until(done: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll a condition (a process's exit has no event to await) until true or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


class Proc:
    """A child process in its own process group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.args = args
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True,
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)

    async def wait_exit(self, timeout: float) -> bool:
        return await poll_until(lambda: not self.alive(), timeout)

    async def stop(self) -> None:
        """SIGKILL to the group: the run is over and its state already audited, so nothing is gained
        by a graceful exit (a node agent's first SIGTERM would drain for up to two minutes)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        await self.wait_exit(5.0)


@dataclass
class Shape:
    """The topology's size and the schedulers' settings."""

    nodes: int = 5
    slots: int = 6
    scheduler_env: dict[str, str] = field(default_factory=dict)  # on top of SCHEDULER_ENV
    redis_args: tuple[str, ...] = ()
    redis_kind: str = "single"  # "single" | "sentinel" (primary, replica, 3 Sentinels) | "cluster" (3+3)

    @property
    def cells(self) -> tuple[str, ...]:
        return ("c0", "c1", "c2") if self.redis_kind == "cluster" else ("c0",)

    def env(self) -> dict[str, str]:
        return SCHEDULER_ENV | {"DRAGOMAN_CELLS": ",".join(self.cells)} | self.scheduler_env

    def setting_ms(self, name: str) -> int:
        """A setting of the schedulers: from their environment, else the shipped default."""
        value = self.env().get(f"DRAGOMAN_{name.upper()}")
        return int(value) if value is not None else int(getattr(Settings(), name))


class Topology:
    def __init__(self, workdir: Path, shape: Shape) -> None:
        self.workdir = workdir
        self.shape = shape
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis_dir = workdir / "valkey"
        self.redis_dir.mkdir(exist_ok=True)
        self.redis_port = free_port()
        self.redis: EmbeddedServer | None = None
        self.ha: EmbeddedSentinelSet | None = None  # redis_kind "sentinel"
        self.cluster: EmbeddedCluster | None = None  # redis_kind "cluster"
        self.redis_restarts = 0
        self.schedulers: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}
        self.nodes: dict[str, Proc] = {}
        self.node_proxy: Proxy | None = None
        self.session_proxy: Proxy | None = None
        self._redis_client: aioredis.Redis | None = None

    # ------------------------------------------------------------------ addresses
    @property
    def redis_url(self) -> str:
        if self.ha is not None:
            return self.ha.url
        if self.cluster is not None:
            return "redis+cluster://" + ",".join(f"{h}:{p}" for h, p in self.cluster.startup_nodes)
        return f"redis://127.0.0.1:{self.redis_port}/0"

    def cell_keys(self, cell: str = "c0") -> CellKeys:
        return CellKeys("dragoman", cell)

    def node_cell(self, node_id: str) -> CellKeys:
        return self.cell_keys(cell_of_node(node_id, self.shape.cells))

    def http(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def ws(self, name: str) -> str:
        return f"ws://127.0.0.1:{self.ports[name]}"

    @property
    def session_url(self) -> str:
        assert self.session_proxy is not None
        return f"ws://127.0.0.1:{self.session_proxy.port}/ws/session"

    def node_url(self, tag: str) -> str:
        assert self.node_proxy is not None
        return f"ws://127.0.0.1:{self.node_proxy.port}/ws/node?chaos={tag}"

    @property
    def rc(self) -> aioredis.Redis:
        """The harness's own Redis client (audits and Redis-side faults); it follows a failover."""
        if self._redis_client is None and self.shape.redis_kind != "single":
            self._redis_client = make_client(self.redis_url)[0]
        if self._redis_client is None:
            self._redis_client = aioredis.Redis.from_url(
                self.redis_url, socket_timeout=2, socket_connect_timeout=2,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 6),
                retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
        return self._redis_client

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.start_redis()
        for name in ("A", "B"):
            self.start_scheduler(name)
        await asyncio.gather(*(self.wait_ready(n) for n in ("A", "B")))
        self.node_proxy = Proxy("node-proxy", [("127.0.0.1", self.ports["A"]), ("127.0.0.1", self.ports["B"])])
        self.session_proxy = Proxy("session-proxy", [("127.0.0.1", self.ports["B"]), ("127.0.0.1", self.ports["A"])])
        await self.node_proxy.start()
        await self.session_proxy.start()
        for i in range(1, self.shape.nodes + 1):
            self.start_node(f"n{i}")
        await self.wait_nodes_ready(timeout=30)

    def start_redis(self) -> None:
        if self.shape.redis_kind == "sentinel":
            self.ha = EmbeddedSentinelSet().start()
            return
        if self.shape.redis_kind == "cluster":
            self.cluster = EmbeddedCluster(size=3, replicas=1, node_timeout_ms=1000).start()
            return
        self.redis = EmbeddedServer(port=self.redis_port, workdir=str(self.redis_dir),
                                    extra_args=self.shape.redis_args)
        self.redis.start()

    async def kill_redis(self) -> None:
        """SIGKILL, as a crash: no shutdown save, no AOF rewrite."""
        assert self.redis is not None and self.redis.proc is not None
        proc = self.redis.proc
        proc.kill()
        await poll_until(lambda: proc.poll() is not None, 5.0, 0.01)

    def redis_pid(self) -> int:
        assert self.redis is not None and self.redis.proc is not None
        return self.redis.proc.pid

    def start_scheduler(self, name: str) -> Proc:
        port = self.ports.get(name) or free_port()
        self.ports[name] = port
        env = os.environ | self.shape.env() | {"DRAGOMAN_REDIS_URL": self.redis_url, "DRAGOMAN_PORT": str(port)}
        proc = Proc(f"scheduler-{name}", [sys.executable, "-m", "dragoman.cli.main", "serve"], env,
                    self.logs / f"scheduler-{name}.log")
        self.schedulers[name] = proc
        return proc

    async def wait_ready(self, name: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if not self.schedulers[name].alive():
                    raise RuntimeError(f"scheduler {name} exited; see {self.schedulers[name].log}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(self.http(name) + "/readyz", timeout=1)).status_code == 200:
                        return
                await asyncio.sleep(0.05)
        raise RuntimeError(f"scheduler {name} not ready within {timeout}s; see {self.schedulers[name].log}")

    async def counters(self, prefixes: tuple[str, ...]) -> dict[str, float]:
        """Prometheus counters of the live schedulers whose sample names start with ``prefixes``,
        summed over the processes (labels kept in the name)."""
        out: dict[str, float] = {}
        async with httpx.AsyncClient() as client:
            for name, proc in self.schedulers.items():
                if not proc.alive():
                    continue
                with contextlib.suppress(httpx.HTTPError):
                    text = (await client.get(self.http(name) + "/metrics", timeout=5)).text
                    for line in text.splitlines():
                        if line.startswith(prefixes) and not line.startswith("#"):
                            sample, _, value = line.rpartition(" ")
                            out[sample] = out.get(sample, 0.0) + float(value)
        return out

    def node_id(self, tag: str) -> str:
        return f"chaos-{tag}"

    def start_node(self, tag: str) -> Proc:
        args = [sys.executable, "-m", "dragoman.cli.main", "node", "--scheduler", self.node_url(tag),
                "--pairs", PAIRS, "--slots", str(self.shape.slots), "--engine", "simulated",
                "--node-id", self.node_id(tag), "--log-level", "warning"]
        proc = Proc(f"node-{tag}", args, os.environ.copy(), self.logs / f"node-{tag}.log")
        self.nodes[tag] = proc
        return proc

    async def wait_nodes_ready(self, timeout: float) -> None:
        want = {self.node_id(t) for t in self.nodes}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready = set()
            for nid in want:
                state = await self.rc.hget(self.node_cell(nid).node(nid), "state")
                if state == b"ready":
                    ready.add(nid)
            if ready == want:
                return
            for tag, proc in self.nodes.items():
                if not proc.alive():
                    raise RuntimeError(f"node {tag} exited; see {proc.log}")
            await asyncio.sleep(0.1)
        raise RuntimeError(f"nodes not ready within {timeout}s: {sorted(want - ready)}")

    def processes(self) -> list[Proc]:
        return [*self.schedulers.values(), *self.nodes.values()]

    async def stop(self) -> None:
        for proxy in (self.node_proxy, self.session_proxy):
            if proxy is not None:
                await proxy.close()
        await asyncio.gather(*(p.stop() for p in self.nodes.values()))
        await asyncio.gather(*(p.stop() for p in self.schedulers.values()))
        if self._redis_client is not None:
            with contextlib.suppress(Exception):
                await self._redis_client.aclose()
            self._redis_client = None
        for ha in (self.ha, self.cluster):
            if ha is not None:
                ha.stop()
        if self.redis is not None:
            if self.redis.proc is not None and self.redis.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.redis.proc.pid, signal.SIGCONT)
            self.redis.stop()

    def describe(self) -> dict[str, Any]:
        return {"redis": self.redis_url, "schedulers": dict(self.ports),
                "node_proxy": self.node_proxy.port if self.node_proxy else None,
                "session_proxy": self.session_proxy.port if self.session_proxy else None}
