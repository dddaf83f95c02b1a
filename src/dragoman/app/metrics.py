"""Prometheus metrics of one scheduler process. Counters of work done here, plus gauges read from
Redis at scrape time (cluster-wide facts: nodes by state, slots, queue depths)."""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client import metrics as _prometheus_metrics
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from dragoman.store.api import Store
    from dragoman.store.replies import ReapReply

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5,
                   1, 2.5, 5, 10, 30)


class LoopHistogram:
    """A Prometheus histogram observed from the event loop's thread only, exposed at scrape time
    like prometheus_client's ``Histogram`` (``_bucket``, ``_sum``, ``_count``, ``_created``). Observing bumps one
    bucket and the sum: no lock (the library's takes one for the bucket, the sum and the count, and
    every job is observed twice)."""

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...], registry: CollectorRegistry) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = sorted(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # (the last: above every bound, +Inf)
        self.sum = 0.0
        self.created = time.time()
        registry.register(self)

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # (a bucket counts what is <= its bound)
        self.sum += seconds

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, n in zip([*self.bounds, float("inf")], self.counts, strict=True):
            cumulative += n
            buckets.append((floatToGoString(bound), cumulative))
        family = HistogramMetricFamily(self.name, self.documentation, buckets=buckets, sum_value=self.sum)
        if getattr(_prometheus_metrics, "_use_created", True):  # (PROMETHEUS_DISABLE_CREATED_SERIES, as theirs)
            family.samples.append(Sample(f"{self.name}_created", {}, self.created, None))
        yield family


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.dispatch_latency = LoopHistogram("dragoman_dispatch_seconds", "Time of one dispatch call (one script)",
                                              LATENCY_BUCKETS, r)
        self.e2e_latency = LoopHistogram("dragoman_e2e_seconds", "Utterance cut to result ready for the client",
                                         LATENCY_BUCKETS, r)
        self._outcome_children: dict[tuple[str, str], Any] = {}
        self.outcomes = Counter("dragoman_job_outcomes", "Jobs by terminal outcome (seen by this process)",
                                ["state", "code"], registry=r)
        self.reassignments = Counter("dragoman_reassignments", "Jobs sent again with a new attempt", registry=r)
        self.stale_results = Counter("dragoman_rejected_results", "Node results rejected (stale, foreign, unknown)",
                                     ["reason"], registry=r)
        self.invalid_frames = Counter("dragoman_invalid_frames", "Frames answered with INVALID_MESSAGE",
                                      ["endpoint"], registry=r)
        self.reaped = Counter("dragoman_reaped", "Items recovered by the reaper", ["kind"], registry=r)
        self.open_sockets = Gauge("dragoman_open_sockets", "WebSockets open on this process", ["endpoint"],
                                  registry=r)
        self.nodes = Gauge("dragoman_nodes", "Nodes by state (cluster-wide)", ["state"], registry=r)
        self.slots_used = Gauge("dragoman_slots_used", "Slots in use on live nodes (cluster-wide)", registry=r)
        self.slots_total = Gauge("dragoman_slots_total", "Slots of live nodes (cluster-wide)", registry=r)
        self.queue_depth = Gauge("dragoman_queue_depth", "Jobs waiting per pool", ["pool"], registry=r)
        self.jobs_total = Gauge("dragoman_jobs", "Cluster-wide job counters from Redis", ["counter"], registry=r)
        self.failovers = Counter("dragoman_redis_failovers", "Times this process saw the Redis primary change",
                                 registry=r)
        self.session_events = Counter("dragoman_session_events", "Notable events of this process's sessions "
                                      "(lost_job_rerun: Redis lost a job, run again from the session's audio)",
                                      ["event"], registry=r)
        self.pipeline_writes = Gauge("dragoman_redis_pipeline_writes", "Writes of the auto-pipeline to Redis "
                                     "(script calls / writes = calls sent per write)", registry=r)
        self.pipeline_commands = Gauge("dragoman_redis_pipeline_commands", "Commands sent by the auto-pipeline",
                                       registry=r)
        self.redis_resets = Counter("dragoman_redis_data_lost", "Times this process saw Redis lose its data "
                                    "and registered its nodes and sessions again", registry=r)

    def settled(self, state: str, code: str) -> None:
        """A session took a job's one outcome (``dragoman.types.Observer``)."""
        child = self._outcome_children.get((state, code))
        if child is None:  # (``labels`` takes a lock and builds a key: a job's outcome is counted once per job)
            child = self._outcome_children[(state, code)] = self.outcomes.labels(state, code or "")
        child.inc()

    def observe(self, name: str, seconds: float) -> None:
        """A session's measurement (``dragoman.types.Observer``)."""
        (self.dispatch_latency if name == "dispatch" else self.e2e_latency).observe(seconds)

    def count(self, name: str) -> None:
        """A session's notable event (``dragoman.types.Observer``)."""
        self.session_events.labels(name).inc()

    def reaped_reply(self, reply: ReapReply) -> None:
        for kind, n in (("dead_nodes", reply.dead_nodes), ("expired_leases", reply.expired_leases),
                        ("expired_pending", reply.expired_pending), ("dead_procs", reply.dead_procs),
                        ("abandoned_sessions", reply.abandoned)):
            if n:
                self.reaped.labels(kind).inc(n)

    async def refresh(self, store: Store) -> None:
        await store.flush_stats()  # this process's counts first (others' are at most stats_flush_ms old)
        nodes = await store.nodes()
        by_state: dict[str, int] = {"ready": 0, "draining": 0, "offline": 0}
        used = total = 0
        for n in nodes:
            by_state[n.get("state", "?")] = by_state.get(n.get("state", "?"), 0) + 1
            if n.get("state") != "offline":
                used += int(n.get("used", 0))
                total += int(n.get("max", 0))
        for state, count in by_state.items():
            self.nodes.labels(state).set(count)
        self.slots_used.set(used)
        self.slots_total.set(total)
        for pool in await store.pools():
            self.queue_depth.labels(pool["pool"]).set(pool["queue_depth"])
        if store.pipeline is not None:
            self.pipeline_writes.set(store.pipeline.writes)
            self.pipeline_commands.set(store.pipeline.commands)
        for key, value in (await store.stats()).items():
            self.jobs_total.labels(key).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict[str, Any]:
        """Latency percentiles and a histogram for the dashboard, from this process's histograms."""
        return {"e2e": _histogram(self.e2e_latency), "dispatch": _histogram(self.dispatch_latency)}


def _histogram(h: LoopHistogram) -> dict[str, Any]:
    count = sum(h.counts)

    def pct(q: float) -> float | None:
        target, cumulative = q * count, 0
        for le, n in zip(h.bounds, h.counts, strict=False):  # (past the last bound: +Inf, no figure)
            cumulative += n
            if count and cumulative >= target:
                return le * 1000
        return None

    return {"buckets_ms": [le * 1000 for le in h.bounds], "counts": h.counts[:-1], "count": count,
            "p50_ms": pct(0.5), "p95_ms": pct(0.95), "p99_ms": pct(0.99)}
