"""``LoopHistogram``: the same exposition as prometheus_client's ``Histogram`` for the same
observations (bucket edges included), and the dashboard's percentiles from it."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from dragoman.app.metrics import LATENCY_BUCKETS, LoopHistogram, Metrics


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text exposition, the creation time's value left out (the two were made at different times)."""
    return [line.rsplit(" ", 1)[0] if line.startswith("x_seconds_created ") else line
            for line in generate_latest(registry).decode().splitlines()]


def test_exposition_matches_prometheus_clients_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = LoopHistogram("x_seconds", "doc", LATENCY_BUCKETS, ours)
    ref = Histogram("x_seconds", "doc", buckets=LATENCY_BUCKETS, registry=theirs)
    for v in (0.0, 0.0005, 0.00051, 0.001, 0.0042, 0.1, 0.25, 9.99, 30, 31, 1e9):  # (edges, between, beyond)
        h.observe(v)
        ref.observe(v)
    assert exposition(ours) == exposition(theirs)
    assert 'x_seconds_bucket{le="0.0005"} 2.0' in exposition(ours)
    assert 'x_seconds_count 11.0' in exposition(ours)
    assert "x_seconds_created" in exposition(ours)


def test_snapshot_percentiles() -> None:
    m = Metrics()
    assert m.snapshot()["e2e"]["p50_ms"] is None  # nothing observed
    for _ in range(98):
        m.observe("e2e", 0.004)  # bucket le=5 ms
    m.observe("e2e", 0.2)
    m.observe("e2e", 100.0)  # beyond the last bound
    snap = m.snapshot()["e2e"]
    assert snap["count"] == 100
    assert snap["p50_ms"] == 5.0 and snap["p95_ms"] == 5.0
    assert snap["p99_ms"] == 250.0
    assert sum(snap["counts"]) == 99 and len(snap["counts"]) == len(snap["buckets_ms"]) == len(LATENCY_BUCKETS)
