"""Redis URLs: what parse_redis_url accepts and refuses, and the clients make_client builds (on the
session's real server; the Sentinel and cluster clients are exercised in test_embedded_ha.py)."""

from __future__ import annotations

import time

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from dragoman.embedded import EmbeddedServer, free_port
from dragoman.errors import ConfigError
from dragoman.store.connect import (
    BlockingSentinelConnectionPool,
    RedisTarget,
    current_primary,
    make_client,
    parse_redis_url,
)


def test_a_sentinel_url_names_the_sentinels_the_service_and_the_db() -> None:
    t = parse_redis_url("redis+sentinel://:s3cret@10.0.0.1:26380,sentinel-b,[::1]:26381/mymaster/2")
    assert t == RedisTarget(kind="sentinel", hosts=(("10.0.0.1", 26380), ("sentinel-b", 26379), ("::1", 26381)),
                            service_name="mymaster", db=2, password="s3cret", url=t.url)
    assert t.password == "s3cret" and t.username is None


def test_sentinel_url_details() -> None:
    t = parse_redis_url("redis+sentinel://app:p%40ss@h:1/svc/?sentinel_password=sp")
    assert (t.username, t.password, t.db, t.service_name, t.sentinel_password) == ("app", "p@ss", 0, "svc", "sp")
    assert "p@ss" not in repr(t) and "sp" not in t.describe()


def test_single_and_cluster_urls() -> None:
    single = parse_redis_url("redis://:pw@cache:6380/3")
    assert (single.kind, single.hosts, single.db, single.password) == ("single", (("cache", 6380),), 3, "pw")
    assert parse_redis_url("unix:///run/valkey.sock?db=1").hosts == ()
    flagged = parse_redis_url("redis://node1:7000", cluster=True)
    assert (flagged.kind, flagged.hosts) == ("cluster", (("node1", 7000),))
    listed = parse_redis_url("redis+cluster://a:7000,b:7001,c")
    assert (listed.kind, listed.hosts) == ("cluster", (("a", 7000), ("b", 7001), ("c", 6379)))


@pytest.mark.parametrize(("url", "complaint"), [
    ("", "empty"),
    ("localhost:6379", "not a URL"),
    ("http://localhost:6379", "unknown scheme 'http'"),
    ("redis+sentinel://h1:26379,h2:26379", "no service name"),
    ("redis+sentinel://h1:26379,h2:26379/", "no service name"),
    ("redis+sentinel:///mymaster", "no hosts"),
    ("redis+sentinel://h1:26379,,h2/mymaster", "empty host"),
    ("redis+sentinel://h1:port/mymaster", "bad port 'port'"),
    ("redis+sentinel://h1:70000/mymaster", "bad port '70000'"),
    ("redis+sentinel://h1:26379/mymaster/x", "database must be a number"),
    ("redis+sentinel://h1:26379/mymaster/0/extra", "too many path parts"),
    ("redis+sentinel://h1:26379/mymaster?socket_timeout=1", "unknown option(s) socket_timeout"),
    ("redis+sentinel://::1:26379/mymaster", "IPv6"),
    ("redis+cluster://a:7000/mymaster", "only database 0"),
    ("redis://localhost:6379/1", "only database 0"),  # with cluster=True, below
    ("redis://localhost:notaport/0", "Port could not be cast"),
])
def test_malformed_urls_are_config_errors(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_redis_url(url, cluster=url == "redis://localhost:6379/1")
    assert complaint in str(err.value)


def test_a_password_never_shows_in_an_error() -> None:
    with pytest.raises(ConfigError) as err:
        parse_redis_url("redis+sentinel://:hunter2@h1:26379")
    assert "hunter2" not in str(err.value) and "***" in str(err.value)


def test_a_sentinel_url_with_the_cluster_flag_is_refused() -> None:
    with pytest.raises(ConfigError, match="cannot point at a Redis Cluster"):
        make_client("redis+sentinel://h1:26379/mymaster", cluster=True)


async def test_a_single_server_client_is_what_the_store_used(redis_url: str,
                                                              redis_server: EmbeddedServer) -> None:
    client, describe = make_client(redis_url)
    try:
        pool = client.connection_pool
        assert type(pool) is aioredis.BlockingConnectionPool
        assert (pool.max_connections, pool.timeout) == (256, 5)
        kwargs = pool.connection_kwargs
        assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"], kwargs["health_check_interval"]) == (
            5.0, 3.0, 10)
        await client.set("k", "v")
        assert await client.get("k") == b"v"  # bytes: decode_responses stays off
        assert await current_primary(client) == f"127.0.0.1:{redis_server.port}"
        assert describe == f"Redis at 127.0.0.1:{redis_server.port} (db 0)"
    finally:
        await client.aclose()


async def test_no_sentinel_reachable_is_a_connection_error_not_a_hang() -> None:
    dead = [free_port(), free_port()]
    client, _ = make_client(f"redis+sentinel://127.0.0.1:{dead[0]},127.0.0.1:{dead[1]}/nothing")
    assert isinstance(client.connection_pool, BlockingSentinelConnectionPool)
    started = time.monotonic()
    try:
        with pytest.raises(RedisConnectionError, match="No master found for 'nothing'"):
            await client.set("k", "v")
        with pytest.raises(RedisConnectionError):
            await current_primary(client)
    finally:
        await client.aclose()
    assert time.monotonic() - started < 5
