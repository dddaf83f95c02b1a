"""Benchmarks for the Redis-backed store (``make bench`` -> ``python -m bench.run``)."""
