"""High availability on real processes: a local Sentinel set (one primary, one replica, three
Sentinels) and a local cluster with one replica per primary. Primaries are SIGKILLed, replicas paused
with SIGSTOP; the clients make_client builds must find the new primary.

Failover and recovery times are printed (run with ``-s`` to see them)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from dragoman.embedded import EmbeddedCluster, EmbeddedSentinelSet, EmbeddedServer, _command, _info, _ping
from dragoman.store.connect import current_primary, make_client, parse_redis_url
from dragoman.store.scripts import Scripts
from tests.helpers import wait_for

FAILOVER_BOUND_S = 10.0  # kill -> writes succeed again; measured ~2.3 s with down-after 1000 ms
LOAD_INTERVAL_S = 0.002  # the writers' pace (a load of ~500 writes/s), not a synchronisation


def assert_all_stopped(servers: list[EmbeddedServer]) -> None:
    assert servers, "no servers were started"
    assert not any(s.running for s in servers)
    assert not any(_ping(s.port) for s in servers), "a server still answers after stop()"


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[EmbeddedSentinelSet]:
    ha = EmbeddedSentinelSet()
    with ha:
        members = [*ha.servers, *ha.sentinels]
        yield ha
    assert_all_stopped(members)


@pytest.fixture
async def ha(sentinel_set: EmbeddedSentinelSet) -> AsyncIterator[EmbeddedSentinelSet]:
    """The set, healthy and empty; healed again after the test's chaos."""
    await asyncio.to_thread(sentinel_set.heal)
    _command(sentinel_set.primary.port, "FLUSHALL")
    yield sentinel_set
    await asyncio.to_thread(sentinel_set.heal)


class Writer:
    """A steady load of ``SET <prefix><n> <n>`` through one client, recording what was acknowledged
    and what failed, with times."""

    def __init__(self, client: Any, prefix: str = "w") -> None:
        self.client = client
        self.prefix = prefix
        self.acked: list[tuple[float, int]] = []  # (time the write was sent, n)
        self.errors: list[tuple[float, BaseException]] = []
        self._stop = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Writer:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        n = 0
        while not self._stop:
            n += 1
            sent = time.monotonic()
            try:
                await self.client.set(f"{self.prefix}{n}", n)
                self.acked.append((sent, n))
            except Exception as exc:  # noqa: BLE001 - recorded, the test asserts on the kinds
                self.errors.append((time.monotonic(), exc))
            await asyncio.sleep(LOAD_INTERVAL_S)

    async def stop(self) -> None:
        self._stop = True
        assert self._task is not None
        await self._task

    def acked_since(self, t: float) -> list[int]:
        return [n for sent, n in self.acked if sent >= t]


def holds(condition: Any) -> Any:
    """An async predicate for wait_for from a plain one."""
    async def predicate() -> Any:
        return condition()

    return predicate


async def until_ok(call: Any, timeout: float = FAILOVER_BOUND_S) -> Any:
    """Retry ``call`` on connection errors (the ones a failover causes) until it answers."""
    async def attempt() -> Any:
        try:
            return ("ok", await call())
        except RedisConnectionError:
            return None

    return (await wait_for(attempt, timeout=timeout))[1]


# ---------------------------------------------------------------------------------------- Sentinel


async def test_the_set_starts_and_its_url_works(ha: EmbeddedSentinelSet) -> None:
    target = parse_redis_url(ha.url)
    assert target.kind == "sentinel" and target.service_name == ha.service_name
    assert list(target.hosts) == ha.sentinel_addresses and len(ha.sentinels) == 3
    assert ha.primary is not ha.replica
    client, describe = make_client(ha.url)
    try:
        await client.set("greeting", "hello")
        assert await client.get("greeting") == b"hello"
        assert await current_primary(client) == f"127.0.0.1:{ha.primary.port}"
        assert await client.wait(1, 2000) == 1  # the replica acknowledged it
        assert _command(ha.replica.port, "GET", "greeting") == "hello"
        assert "Sentinel service 'dragoman'" in describe
    finally:
        await client.aclose()


async def test_writes_move_to_the_new_primary_after_the_old_one_is_killed(ha: EmbeddedSentinelSet) -> None:
    client, _ = make_client(ha.url)
    writer = Writer(client).start()
    try:
        await wait_for(holds(lambda: len(writer.acked) >= 20))
        killed_at = time.monotonic()
        old = ha.kill_primary()
        new_address = await asyncio.to_thread(ha.wait_for_failover, old.port)
        switched_at = time.monotonic()
        await wait_for(holds(lambda: len(writer.acked_since(switched_at)) >= 20),
                       timeout=FAILOVER_BOUND_S)
    finally:
        await writer.stop()
        await client.aclose()
    assert new_address[1] != old.port and new_address[1] in [s.port for s in ha.servers]
    last_error = max(t for t, _ in writer.errors)
    recovered_at = min(sent for sent, _ in writer.acked if sent > last_error)
    print(f"\n[sentinel] kill -> Sentinels agree on the new primary: {switched_at - killed_at:.2f} s; "
          f"kill -> writes succeed again: {recovered_at - killed_at:.2f} s; "
          f"{len(writer.errors)} failed writes ({sorted({type(e).__name__ for _, e in writer.errors})})")
    assert recovered_at - killed_at < FAILOVER_BOUND_S
    assert all(isinstance(e, RedisConnectionError) for _, e in writer.errors)  # DependencyDown for the Store
    last = writer.acked[-1][1]
    assert _command(new_address[1], "GET", f"w{last}") == str(last)  # it landed on the new primary


async def test_the_scripts_library_is_on_the_new_primary(ha: EmbeddedSentinelSet, tmp_path: Path) -> None:
    (tmp_path / "incr-1.lua").write_text("return redis.call('INCR', KEYS[1])\n")
    client, _ = make_client(ha.url)
    scripts = Scripts(client, root=tmp_path)  # a library of one function, as the Store's scripts are
    try:
        assert await scripts.call("incr", ["counter"], []) == 1  # loaded on first use
        assert await client.wait(1, 2000) == 1
        old = ha.kill_primary()
        new_port = (await asyncio.to_thread(ha.wait_for_failover, old.port))[1]
        # Functions are replicated with the data: the promoted replica has the library already ...
        assert _command(new_port, "FUNCTION", "LIST", "LIBRARYNAME", scripts.library.name)
        # ... and the call goes on there (no reload), with the replicated count.
        assert await until_ok(lambda: scripts.call("incr", ["counter"], [])) == 2
    finally:
        await client.aclose()


async def test_a_lagging_replica_loses_acknowledged_writes_on_failover(ha: EmbeddedSentinelSet) -> None:
    client, _ = make_client(ha.url)
    try:
        await client.set("before", "kept")
        assert await client.wait(1, 2000) == 1
        primary, replica = ha.primary, ha.replica
        replicated = int(_info(replica.port, "replication")["slave_repl_offset"])
        ha.pause(replica)  # SIGSTOP: the replica reads nothing more
        # More than the kernel buffers between the two hold (a few MB on loopback), so that what
        # follows stays in the primary's memory, and dies with it.
        blob = b"x" * (1 << 20)
        for i in range(24):
            await client.set(f"filler{i}", blob)
        assert await client.set("acked", "lost") is True  # the primary acknowledged it
        lag = int(_info(primary.port, "replication")["master_repl_offset"]) - replicated
        ha.kill_primary()
        ha.resume(replica)
        new_port = (await asyncio.to_thread(ha.wait_for_failover, primary.port))[1]
        assert new_port == replica.port
        assert await until_ok(lambda: client.get("before")) == b"kept"
        assert await client.get("acked") is None  # acknowledged, and gone
        survived = sum([await client.exists(f"filler{i}") for i in range(24)])
        print(f"\n[sentinel] paused replica: {lag / 1e6:.1f} MB of replication stream written after the pause; "
              f"{survived}/24 filler values reached it; the acknowledged write after them is lost")
        assert survived < 24
    finally:
        await client.aclose()


async def test_readonly_from_a_demoted_primary_sends_the_client_back_to_the_sentinels(
        ha: EmbeddedSentinelSet) -> None:
    """A Sentinel that has not heard of a failover yet names the old primary, now a replica. redis-py
    (SentinelManagedConnection) turns its READONLY into a ConnectionError and drops the connection;
    once the Sentinels name the primary, the next command reaches it."""
    client, _ = make_client(ha.url)
    try:
        pool = client.connection_pool
        real_discover = pool.sentinel_manager.discover_master
        demoted, primary = ha.replica, ha.primary
        stale = True
        answers: list[tuple[str, int]] = []

        async def stale_sentinel(service_name: str) -> tuple[str, int]:
            answer = demoted.address if stale else await real_discover(service_name)
            answers.append(answer)
            return answer

        pool.sentinel_manager.discover_master = stale_sentinel
        script = client.register_script("return redis.call('SET', KEYS[1], ARGV[1])")
        with pytest.raises(RedisConnectionError, match="The previous master is now a slave"):
            await script(keys=["k"], args=["v"])
        assert all(not c.is_connected for c in pool._available_connections)  # that connection was dropped
        stale = False  # the Sentinel catches up
        assert await script(keys=["k"], args=["v"]) == b"OK"
        assert answers[0] == demoted.address and answers[-1] == primary.address
        assert _command(primary.port, "GET", "k") == "v"
    finally:
        await client.aclose()


async def test_pooled_connections_leave_a_deposed_primary_that_lives_on(ha: EmbeddedSentinelSet) -> None:
    """After a failover that leaves the old primary running (forced here; a partition or a pause does
    the same), Sentinel demotes it only seconds later. redis-py alone keeps using its pooled
    connections to it (those writes are lost on demotion); make_client's pool re-asks the Sentinels
    every second and moves."""
    plain, _ = make_client(ha.url, primary_check_interval=None)  # redis-py's own behaviour
    checked, _ = make_client(ha.url)  # the default: re-ask every second
    try:
        await plain.set("warm", 1)
        await checked.set("warm", 1)  # each pool now holds a connection to the primary
        old, new = ha.primary, ha.replica
        assert _command(ha.sentinels[0].port, "SENTINEL", "FAILOVER", ha.service_name) == "OK"
        assert (await asyncio.to_thread(ha.wait_for_failover, old.port))[1] == new.port
        switched_at = time.monotonic()
        assert _info(old.port, "replication")["role"] == "master"  # not demoted yet

        await plain.set("stale", "write")
        assert _command(old.port, "GET", "stale") == "write" and _command(new.port, "GET", "stale") is None

        n = 0

        async def landed_on_new_primary() -> bool:
            nonlocal n
            n += 1
            await checked.set(f"c{n}", n)
            return _command(new.port, "GET", f"c{n}") == str(n)

        await wait_for(landed_on_new_primary, timeout=3)
        print(f"\n[sentinel] forced failover: the checked pool wrote to the new primary "
              f"{time.monotonic() - switched_at:.2f} s after the switch")
        assert time.monotonic() - switched_at < 1.0 + 1.0  # primary_check_interval + slack
    finally:
        await plain.aclose()
        await checked.aclose()


async def test_a_dead_sentinel_is_skipped_at_once(ha: EmbeddedSentinelSet) -> None:
    dead = ha.sentinels[0]
    dead.kill()
    assert ha.url.startswith(f"redis+sentinel://127.0.0.1:{dead.port},")  # asked first
    client, _ = make_client(ha.url)
    try:
        started = time.monotonic()
        await client.set("k", "v")
        assert await current_primary(client) == f"127.0.0.1:{ha.primary.port}"
        assert time.monotonic() - started < 1.0
    finally:
        await client.aclose()


def test_the_cli_prints_a_working_url_and_its_servers_die_with_it() -> None:
    cli = subprocess.Popen([sys.executable, "-m", "dragoman.cli.main", "redis", "--sentinel"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("redis URL:"):
            line = cli.stdout.readline()  # type: ignore[union-attr]
            assert line, f"the command ended early: {''.join(lines)}"
            lines.append(line)
        text = "".join(lines)
        url = re.search(r"redis\+sentinel://\S+", text)[0]  # type: ignore[index]
        ports = [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)]
        assert len(set(ports)) == 5, text  # primary, replica, three Sentinels (and the URL repeats them)

        async def use() -> bytes:
            client, _ = make_client(url)
            try:
                await client.set("cli", "works")
                return await client.get("cli")
            finally:
                await client.aclose()

        assert asyncio.run(use()) == b"works"
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(10)
        deadline = time.monotonic() + 10
        while any(_ping(p) for p in set(ports)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(_ping(p) for p in set(ports)), "a server outlived the killed `dragoman redis`"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
        # A SIGKILLed parent cannot remove its temporary directory: do it here (a Sentinel may still
        # be rewriting its config while it exits, so until the directory stays gone).
        logs = re.search(r"logs\s+(\S+)", "".join(lines))
        if logs and logs[1].startswith(tempfile.gettempdir()):
            deadline = time.monotonic() + 10
            while os.path.exists(logs[1]) and time.monotonic() < deadline:
                shutil.rmtree(logs[1], ignore_errors=True)
            assert not os.path.exists(logs[1])


# ---------------------------------------------------------------------------------------- Cluster


@pytest.fixture(scope="module")
def ha_cluster() -> Iterator[EmbeddedCluster]:
    cluster = EmbeddedCluster(size=3, replicas=1, node_timeout_ms=1000)
    with cluster:
        members = list(cluster.servers)
        yield cluster
    assert_all_stopped(members)


@pytest.mark.cluster
async def test_every_cluster_primary_has_a_linked_replica(ha_cluster: EmbeddedCluster) -> None:
    assert len(ha_cluster.servers) == 6
    primaries, replicas = ha_cluster.servers[:3], ha_cluster.servers[3:]
    for primary, replica in zip(primaries, replicas, strict=True):
        info = _info(replica.port, "replication")
        assert (info["role"], info["master_link_status"], int(info["master_port"])) == ("slave", "up", primary.port)
    client, describe = make_client("redis+cluster://" + ",".join(f"{h}:{p}" for h, p in ha_cluster.startup_nodes))
    try:
        await client.set("k", "v")
        assert await client.get("k") == b"v"
        assert set((await current_primary(client)).split(",")) == {f"127.0.0.1:{p.port}" for p in primaries}
        assert describe.startswith("Redis Cluster via ")
    finally:
        await client.aclose()


@pytest.mark.cluster
async def test_a_cluster_replica_takes_over_a_killed_primary_and_the_client_follows(
        ha_cluster: EmbeddedCluster) -> None:
    key = "{cell-c0}:probe"
    replica_ports = {s.port for s in ha_cluster.servers[3:]}
    client, _ = make_client(ha_cluster.url, cluster=True)
    writer = Writer(client, prefix=key + ":").start()
    try:
        await wait_for(holds(lambda: len(writer.acked) >= 20))
        killed_at = time.monotonic()
        victim = ha_cluster.kill_primary_of(key)
        new_address = await asyncio.to_thread(ha_cluster.wait_for_promotion, key, victim.port)
        promoted_at = time.monotonic()
        await wait_for(holds(lambda: len(writer.acked_since(promoted_at)) >= 20),
                       timeout=FAILOVER_BOUND_S)
    finally:
        await writer.stop()
    try:
        assert new_address[1] in replica_ports  # the victim's replica, now a primary
        assert await current_primary(client) == ",".join(sorted(
            f"127.0.0.1:{ha_cluster.primary_of(slot).port}" for slot in (0, 6000, 12000)))
        errors_end = max((t for t, _ in writer.errors), default=killed_at)
        recovered_at = min(sent for sent, _ in writer.acked if sent > errors_end)
        print(f"\n[cluster] kill -> replica promoted (all nodes agree): {promoted_at - killed_at:.2f} s; "
              f"kill -> writes succeed again: {recovered_at - killed_at:.2f} s; "
              f"{len(writer.errors)} failed writes ({sorted({type(e).__name__ for _, e in writer.errors})})")
        assert recovered_at - killed_at < FAILOVER_BOUND_S
        last = writer.acked[-1][1]
        assert _command(new_address[1], "GET", f"{key}:{last}") == str(last)
    finally:
        await client.aclose()
