"""Shared fixtures: one real embedded Valkey server per test session, a clean database per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from dragoman.config import Settings
from dragoman.embedded import EmbeddedServer
from dragoman.store.api import Store


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: EmbeddedServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
def settings() -> Settings:
    return Settings(node_ttl_ms=45_000, job_timeout_ms=60_000, pending_timeout_ms=10_000, queue_max=4, warmup_ms=0,
                    redis_retry_ms=3_000)


@pytest.fixture
async def store(redis_url: str, settings: Settings) -> AsyncIterator[Store]:
    s = Store.from_url(redis_url, settings, proc="p1", test_clock=True)
    yield s
    await s.aclose()


def pytest_report_header(config: pytest.Config) -> str:
    return f"dragoman tests; CI={os.environ.get('CI', '')}"
