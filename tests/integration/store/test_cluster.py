"""The scripts on a real local Valkey Cluster (three primaries): every key a script touches,
including the ones it derives from the cell prefix, must sit in the cell's hash slot (I9)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.cluster import RedisCluster as SyncCluster

from dragoman.config import Settings
from dragoman.embedded import EmbeddedCluster
from dragoman.store.api import JobSpec, Store
from dragoman.store.keys import CellKeys

pytestmark = pytest.mark.cluster
CELLS = ("c0", "c1", "c2")


@pytest.fixture(scope="module")
def cluster() -> Iterator[EmbeddedCluster]:
    with EmbeddedCluster(size=3) as c:
        yield c


@pytest.fixture
async def cstore(cluster: EmbeddedCluster) -> AsyncIterator[Store]:
    sync = SyncCluster(host="127.0.0.1", port=cluster.servers[0].port)
    sync.flushall(target_nodes=SyncCluster.PRIMARIES)
    sync.close()
    store = Store.from_url(cluster.url, Settings(cells=CELLS, queue_max=2, warmup_ms=0), proc="p1", cluster=True,
                           test_clock=True)
    yield store
    await store.aclose()


def test_cells_spread_over_the_cluster(cluster: EmbeddedCluster) -> None:
    sync = SyncCluster(host="127.0.0.1", port=cluster.servers[0].port)
    owners = {sync.get_node_from_key(CellKeys("dragoman", c).nodes).port for c in CELLS}
    sync.close()
    assert len(owners) >= 2  # the cells really live on different primaries


async def test_full_lifecycle_on_a_cluster(cstore: Store) -> None:
    ids = [f"n{i}" for i in range(9)]
    for nid in ids:
        r = await cstore.register_node(nid, conn="c", max_concurrency=1, pools=["zh>en"])
        assert r.status == "registered"
    served = {cstore.keys_for_node(n).cell for n in ids}
    assert len(served) >= 2
    placed = []
    for i in range(9):
        d = await cstore.dispatch(JobSpec(pool="zh>en", session_id=f"s{i}", utterance_index=0, tgt_lang="en",
                                          body='{"type":"job_assign"}'))
        assert d.status == "assigned", d
        placed.append(d)
    # every node is full now: the last cell tried queues the job
    q = await cstore.dispatch(JobSpec(pool="zh>en", session_id="sq", utterance_index=0, tgt_lang="en", body="{}"))
    assert q.status == "queued"
    # a completion in the queue's cell hands its slot on in the same script
    same_cell = [d for d in placed if d.cell == q.cell]
    done = await cstore.complete(same_cell[0].job_id, same_cell[0].node, 1, "completed", payload="{}")
    assert {e.kind for e in done.effects} == {"outcome", "assign"}
    # node death, reassignment and reaping with derived keys
    victim = placed[1]
    gone = await cstore.node_offline(victim.node, conn="c")
    assert gone.status == "offline"
    await cstore.set_clock_offset(10_000_000)
    replies = await cstore.reap()
    assert {r.status for r in replies} == {"ok"}
    report = await cstore.slot_report()
    assert report["violations"] == []
    assert await cstore.stats()


async def test_cross_process_inbox_on_a_cluster(cstore: Store, cluster: EmbeddedCluster) -> None:
    other = Store.from_url(cluster.url, Settings(cells=CELLS, warmup_ms=0), proc="p2", cluster=True)
    try:
        await cstore.touch_proc()
        await other.touch_proc()
        await other.register_node("far", conn="c", max_concurrency=1, pools=["de>en"])
        d = await cstore.dispatch(JobSpec(pool="de>en", session_id="s", utterance_index=0, tgt_lang="en",
                                          body='{"x":1}'))
        assert d.node == "far" and d.effects == []
        got = await other.read_inbox(d.cell, "0", block_ms=200)
        assert [(e.kind, e.payload) for _, e in got] == [("assign", '{"x":1}')]
    finally:
        await other.aclose()


async def test_session_lifecycle_across_cells_on_a_cluster(cstore: Store) -> None:
    """Sessions' records live in every cell they use; open, dispatch, resume, acknowledge, check and
    end touch only keys of one cell's slot each (I9)."""
    ids = [f"n{i}" for i in range(6)]
    for nid in ids:
        await cstore.register_node(nid, conn="c", max_concurrency=1, pools=["zh>en"])
    await cstore.open_session("sx", "{}")
    placed = [await cstore.dispatch(JobSpec(pool="zh>en", session_id="sx", utterance_index=i, tgt_lang="en",
                                            body="{}", commit=(i + 1, i, 0, -1))) for i in range(6)]
    assert len({d.cell for d in placed}) >= 2 and {d.status for d in placed} == {"assigned"}
    await cstore.complete(placed[0].job_id, placed[0].node, 1, "completed", payload='{"t":0}')
    statuses = await cstore.get_jobs([d.job_id for d in placed])
    assert statuses[placed[0].job_id].result == '{"t":0}'
    replies = await cstore.resume_session("sx")
    assert replies[0].next_utt == 6
    owed = {j.job for r in replies for j in r.jobs}
    assert owed == {d.job_id for d in placed}
    assert await cstore.ack("sx", [placed[0].job_id]) == 1
    # a batched ack naming jobs of two cells: one call per cell, the counts summed
    other = next(d for d in placed[2:] if d.cell != placed[0].cell)
    for d in (placed[0], other):
        await cstore.complete(d.job_id, d.node, 1, "completed", payload="{}")
    assert await cstore.ack("sx", [placed[0].job_id, other.job_id], batched=True) == 2
    assert await cstore.job(other.job_id) is None
    relay = await cstore.relay_partial(placed[1].job_id, placed[1].node, "sx", 1, "{}")
    assert relay.status == "relayed"
    await cstore.close_session("sx", 2, detach=False, cells={r.cell for r in replies})
    assert await cstore.unfinished_jobs() == []
    assert (await cstore.slot_report())["used"] == 0
