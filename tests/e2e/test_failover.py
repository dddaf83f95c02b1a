"""Redis high availability end to end: a real Sentinel set (primary, replica, three Sentinels) and a
real Cluster with replicas, started by the test; a scheduler process on it; steady load; SIGKILL of
the primary. Every utterance sent before, during and after gets exactly one outcome at the client,
no slot is leaked, no job is left unfinished, even when the replica lagged and writes were lost."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis

from dragoman.client import SessionClient
from dragoman.embedded import EmbeddedCluster, EmbeddedSentinelSet
from dragoman.store.connect import make_client
from dragoman.wire import ErrorMessage, MissingResult, TranslationResult
from tests.e2e.peers import ScriptedNode
from tests.e2e.test_node_plane import one_utterance, ws
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
UTTERANCES = 40


@pytest.fixture
def ha() -> Iterator[EmbeddedSentinelSet]:
    with EmbeddedSentinelSet() as s:
        yield s


async def answering(node: ScriptedNode) -> None:
    """A node that answers every job it gets, at once (a duty loop, not synchronisation)."""
    while True:
        job = await node.expect("job_assign", timeout=3600)
        await node.result(job, f"u{job['utterance_index']}")


async def run_through_a_failover(base: str, kill: callable, redis_url: str) -> dict:  # type: ignore[valid-type]
    nodes = [await ScriptedNode.connect(ws(base), node_id=f"ha-{i}", slots=4) for i in range(2)]
    duties = [asyncio.create_task(d) for n in nodes for d in (n.keep_alive(), answering(n))]
    try:
        async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
            killed_at = None
            for i in range(UTTERANCES):
                if i == UTTERANCES // 3:
                    killed_at = time.monotonic()
                    await kill()
                await one_utterance(client, ms=200)
                await asyncio.sleep(0.1)  # a speaker's pace (the load's shape, not synchronisation)
            outcomes = await client.results(UTTERANCES, timeout=60)
            await client.close(timeout=60)
        first_after = min((m.scheduler_sent_at_ms for m in outcomes if isinstance(m, TranslationResult)
                           and m.utterance_index >= UTTERANCES // 3), default=None)
        assert killed_at is not None
        async with httpx.AsyncClient() as c:
            stats = (await c.get(base + "/api/v1/stats")).json()
        kinds: dict[str, int] = {}
        for m in outcomes:
            key = ("translated" if isinstance(m, TranslationResult) else
                   f"missing:{m.reason}" if isinstance(m, MissingResult) else f"error:{m.code}")
            kinds[key] = kinds.get(key, 0) + 1
        return {"outcomes": outcomes, "kinds": kinds, "stats": stats, "resent": client.repeated,
                "first_after_ms": first_after}
    finally:
        for d in duties:
            d.cancel()


async def no_unfinished_jobs(redis_url: str) -> None:
    client, _ = make_client(redis_url)
    try:
        async def settled() -> bool:
            keys = [k async for k in client.scan_iter(match="dragoman:*:job:*")]
            states = [await client.hget(k, "state") for k in keys]
            return all(s in (b"completed", b"completed_empty", b"failed", None) for s in states)

        await wait_for(settled, timeout=30)
    finally:
        await client.aclose()


def check(run: dict) -> None:
    indexes = sorted(m.utterance_index if not isinstance(m, ErrorMessage) else m.details["utterance_index"]
                     for m in run["outcomes"])
    assert indexes == list(range(UTTERANCES)), run["kinds"]  # exactly one outcome each
    assert run["kinds"] == {"translated": UTTERANCES}, run["kinds"]  # and every one served
    assert run["stats"]["slots"]["used"] == 0 and not run["stats"]["slots"]["violations"]


async def test_a_sentinel_failover_under_load_loses_nothing(scheduler, ha: EmbeddedSentinelSet) -> None:
    base = scheduler(DRAGOMAN_REDIS_URL=ha.url, DRAGOMAN_WARMUP_MS="10000")
    killed: list[int] = []

    async def kill() -> None:
        killed.append(ha.kill_primary().port)

    run = await run_through_a_failover(base, kill, ha.url)
    check(run)
    await no_unfinished_jobs(ha.url)
    async with httpx.AsyncClient() as c:
        async def failover_seen() -> bool:
            metrics = (await c.get(base + "/metrics")).text
            return "dragoman_redis_failovers_total 1.0" in metrics

        await wait_for(failover_seen, timeout=20)

        # /readyz names the promoted replica (as the Sentinels see it once they all know of the
        # failover: one that has not heard yet still names the killed server for a moment)
        async def promoted_named() -> bool:
            ready = (await c.get(base + "/readyz")).json()
            port = ha.primary.port
            return port not in killed and ready["primary"] == f"127.0.0.1:{port}"

        await wait_for(promoted_named, timeout=20)


async def test_a_failover_that_lost_writes_is_repaired(scheduler, ha: EmbeddedSentinelSet) -> None:
    """The replica is paused and more than the socket buffers is written behind the scheduler's
    last writes before the primary dies: the new primary lacks them (jobs, results, registrations),
    and the scheduler repairs it: lost jobs run again, nodes' slots are rebuilt."""
    base = scheduler(DRAGOMAN_REDIS_URL=ha.url, DRAGOMAN_WARMUP_MS="10000")
    side = aioredis.Redis(port=ha.primary.port)

    async def kill() -> None:
        replica = ha.replica
        ha.pause(replica)
        blob = b"x" * (1 << 20)
        for i in range(24):  # fills the replication link, so what the scheduler writes next is lost
            await side.set(f"filler{i}", blob)
        await asyncio.sleep(0.5)  # the scheduler goes on writing meanwhile (this is what is lost)
        ha.kill_primary()
        ha.resume(replica)

    try:
        run = await run_through_a_failover(base, kill, ha.url)
    finally:
        await side.aclose()
    check(run)
    await no_unfinished_jobs(ha.url)


@pytest.mark.cluster
async def test_a_cluster_primary_failover_under_load_loses_nothing(scheduler) -> None:
    with EmbeddedCluster(size=3, replicas=1, node_timeout_ms=1000) as cluster:
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in cluster.servers[:3])
        base = scheduler(DRAGOMAN_REDIS_URL=url, DRAGOMAN_CELLS="c0,c1,c2", DRAGOMAN_WARMUP_MS="10000")

        async def kill() -> None:
            cluster.kill_primary_of("dragoman:{c0}:nodes")

        run = await run_through_a_failover(base, kill, url)
        check(run)
        await no_unfinished_jobs(url)
