"""The durability option (``redis_min_replicas_ack``): a transition returns only once a replica has
it (WAIT), on a real Sentinel set. With the replica paused a transition is not acknowledged: it is
retried and then reported as Redis being out of reach, never as done."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis

from dragoman.config import Settings
from dragoman.embedded import EmbeddedSentinelSet
from dragoman.errors import ConfigError, DependencyDown
from dragoman.store.api import JobSpec, Store
from dragoman.store.replies import Status

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def ha() -> Iterator[EmbeddedSentinelSet]:
    with EmbeddedSentinelSet() as s:
        yield s


def settings(**kw) -> Settings:
    return Settings(warmup_ms=0, redis_min_replicas_ack=1, redis_replica_wait_ms=200, redis_retry_ms=1_000, **kw)


async def test_a_transition_returns_once_a_replica_has_it(ha: EmbeddedSentinelSet) -> None:
    store = Store.from_url(ha.url, settings(), proc="p1")
    try:
        r = await store.register_node("n1", conn="c1", max_concurrency=1, pools=["zh>en"])
        assert r.status == Status.REGISTERED
        d = await store.dispatch(JobSpec(pool="zh>en", session_id="s1", utterance_index=0, tgt_lang="en",
                                         body=json.dumps({})))
        assert d.node == "n1"
        # WAIT returned, so the replica holds the job's assignment now, read straight from it
        on_replica = redis.Redis(port=ha.replica.port)
        try:
            assert on_replica.hget(store.keys_for_job(d.job_id).job(d.job_id), "node") == b"n1"
        finally:
            on_replica.close()
    finally:
        await store.aclose()


async def test_without_a_replica_a_transition_is_not_reported_done(ha: EmbeddedSentinelSet) -> None:
    store = Store.from_url(ha.url, settings(), proc="p2")
    replica = ha.replica
    try:
        ha.pause(replica)
        with pytest.raises(DependencyDown):
            await store.register_node("n2", conn="c2", max_concurrency=1, pools=["zh>en"])
        ha.resume(replica)
        # the retried transition is safe to make again: the registration happened exactly once
        r = await store.register_node("n2", conn="c2", max_concurrency=1, pools=["zh>en"])
        assert r.status == Status.REGISTERED and (r.max, r.used) == (1, 0)
    finally:
        ha.resume(replica)
        await store.aclose()


def test_a_cluster_url_with_replica_acks_is_refused() -> None:
    with pytest.raises(ConfigError, match="Cluster"):
        Store.from_url("redis+cluster://127.0.0.1:1", settings(), proc="p3")
