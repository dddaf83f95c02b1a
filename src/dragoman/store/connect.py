"""From a Redis URL to the redis-py asyncio client the Store uses.

Three kinds of target, told apart by the URL's scheme (and the ``cluster`` flag):

- ``redis://[[user]:password@]host[:port][/db]`` (also ``rediss://``, ``unix://``): one server.
- ``redis+sentinel://[[user]:password@]host1[:port1],host2[:port2],.../service_name[/db]``: ask the
  Sentinels for the service's current primary. The password is the data servers' (the Sentinels are
  asked without one unless ``?sentinel_password=...`` is given). Sentinel ports default to 26379.
- ``redis+cluster://host1[:port1],host2[:port2],...`` or any ``redis://`` URL with ``cluster=True``:
  a Redis Cluster (the hosts are its startup nodes).

How a Sentinel client follows a failover (redis-py's ``SentinelConnectionPool`` and
``SentinelManagedConnection``): every new connection asks the Sentinels for the primary first; when
the primary's address changes the pool drops its idle connections; a connection that still reaches the
old primary after its demotion gets READONLY, which redis-py turns into a ConnectionError after closing
that connection. Commands are not retried (a transition script whose answer was lost must not run
twice), so the command in flight fails (the Store raises DependencyDown) and the next one goes to the
new primary. The scripts' library is there already: Functions are replicated with the data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Any, Literal
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from dragoman.errors import ConfigError

Kind = Literal["single", "sentinel", "cluster"]

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SINGLE_SCHEMES = ("redis", "rediss", "unix")
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_QUERY_OPTIONS = ("sentinel_password", "sentinel_username")

# What Store.from_url used: a blocking pool, timeouts above the inbox's 1 s blocking read (a stalled
# Redis becomes DependencyDown, not a hang).
MAX_CONNECTIONS = 256
CLUSTER_MAX_CONNECTIONS = 512
POOL_TIMEOUT = 5.0
HEALTH_CHECK_INTERVAL = 10
SOCKET_TIMEOUT = 5.0
SOCKET_CONNECT_TIMEOUT = 3.0
SENTINEL_SOCKET_TIMEOUT = 1.0  # a Sentinel that does not answer quickly is skipped for the next one
PRIMARY_CHECK_INTERVAL = 1.0  # see BlockingSentinelConnectionPool


@dataclasses.dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL. ``hosts`` are the Sentinels for ``sentinel``, the startup nodes for
    ``cluster``, the one server for ``single`` (empty for a unix socket)."""

    kind: Kind
    hosts: tuple[tuple[str, int], ...]
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = dataclasses.field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = dataclasses.field(default=None, repr=False)
    url: str = dataclasses.field(default="", repr=False)

    def describe(self) -> str:
        """For logs: where the client goes, without passwords."""
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts) or "unix socket"
        if self.kind == "sentinel":
            return f"Redis Sentinel service {self.service_name!r} via {hosts} (db {self.db})"
        if self.kind == "cluster":
            return f"Redis Cluster via {hosts}"
        return f"Redis at {hosts} (db {self.db})"


def _bad(url: str, problem: str) -> ConfigError:
    shown = _redact(url)
    return ConfigError(f"redis_url {shown!r}: {problem}")


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    userinfo, _, tail = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{tail}" if ":" in userinfo else f"{scheme}://{user}@{tail}"


def _host_port(url: str, text: str, default_port: int) -> tuple[str, int]:
    if not text:
        raise _bad(url, "empty host in the host list")
    if text.startswith("["):  # [ipv6]:port
        host, close, rest = text[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise _bad(url, f"bad IPv6 address {text!r} (write [addr]:port)")
        port_text = rest[1:]
    elif text.count(":") > 1:
        raise _bad(url, f"bad address {text!r} (write IPv6 addresses as [addr]:port)")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _bad(url, f"no host in {text!r}")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"bad port {port_text!r} in {text!r}")
    return host, int(port_text)


def _userinfo(url: str, netloc: str) -> tuple[str | None, str | None, str]:
    if "@" not in netloc:
        return None, None, netloc
    userinfo, _, hosts = netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if colon else None), hosts


def _db(url: str, text: str) -> int:
    if not text.isdigit():
        raise _bad(url, f"the database must be a number >= 0, not {text!r}")
    return int(text)


def _parse_single(url: str, cluster: bool) -> RedisTarget:
    from redis.asyncio.connection import parse_url

    try:
        options = parse_url(url)
    except (ValueError, TypeError) as exc:
        raise _bad(url, str(exc)) from None
    if "path" in options:
        if cluster:
            raise _bad(url, "a Redis Cluster cannot be reached over a unix socket")
        hosts: tuple[tuple[str, int], ...] = ()
    else:
        if not options.get("host"):
            raise _bad(url, "no host")
        hosts = ((options["host"], int(options.get("port", DEFAULT_PORT))),)
    db = int(options.get("db", 0))
    if cluster and db != 0:
        raise _bad(url, "a Redis Cluster has only database 0")
    return RedisTarget(kind="cluster" if cluster else "single", hosts=hosts, db=db,
                       username=options.get("username"), password=options.get("password"), url=url)


def parse_redis_url(url: str, *, cluster: bool = False) -> RedisTarget:
    """Parse and check a Redis URL (see the module's docstring). ConfigError says what is wrong."""
    url = (url or "").strip()
    if not url:
        raise ConfigError("redis_url is empty")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise _bad(url, "not a URL: expected redis://host:port/db, "
                        "redis+sentinel://host:port,.../service_name[/db] or redis+cluster://host:port,...")
    scheme = scheme.lower()
    if scheme in SINGLE_SCHEMES:
        return _parse_single(url, cluster)
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise _bad(url, f"unknown scheme {scheme!r}: use redis, rediss, unix, {SENTINEL_SCHEME} or {CLUSTER_SCHEME}")
    if scheme == SENTINEL_SCHEME and cluster:
        raise _bad(url, "a Sentinel URL cannot point at a Redis Cluster")

    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    username, password, host_list = _userinfo(url, netloc)
    if not host_list:
        raise _bad(url, "no hosts")
    default_port = DEFAULT_SENTINEL_PORT if scheme == SENTINEL_SCHEME else DEFAULT_PORT
    hosts = tuple(_host_port(url, h.strip(), default_port) for h in host_list.split(","))
    options = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}

    if scheme == CLUSTER_SCHEME:
        if path.strip("/") not in ("", "0"):
            raise _bad(url, "a Redis Cluster has only database 0 and takes no service name")
        if options:
            raise _bad(url, f"unknown option(s) {', '.join(sorted(options))} for {CLUSTER_SCHEME}")
        return RedisTarget(kind="cluster", hosts=hosts, username=username, password=password, url=url)

    parts = path.split("/") if path else []
    if parts and parts[-1] == "":  # a trailing slash
        parts.pop()
    if not parts or not parts[0]:
        raise _bad(url, "no service name: write redis+sentinel://host:port,host:port/service_name[/db]")
    if len(parts) > 2:
        raise _bad(url, "too many path parts: write redis+sentinel://host:port,.../service_name[/db]")
    unknown = sorted(set(options) - set(SENTINEL_QUERY_OPTIONS))
    if unknown:
        raise _bad(url, f"unknown option(s) {', '.join(unknown)}; {SENTINEL_SCHEME} takes "
                        f"{', '.join(SENTINEL_QUERY_OPTIONS)}")
    return RedisTarget(
        kind="sentinel", hosts=hosts, service_name=unquote(parts[0]),
        db=_db(url, parts[1]) if len(parts) == 2 else 0,
        username=username, password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None, url=url,
    )


class BlockingSentinelConnectionPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """redis-py's Sentinel pool with the blocking pool's behaviour when every connection is in use
    (wait up to ``timeout`` for one instead of failing), as for a single server, and one addition:
    every ``primary_check_interval`` seconds it asks the Sentinels again, and it never hands out a
    connection to any other address than the primary they named last.

    Why: redis-py asks the Sentinels only when it opens a connection. When the old primary lives on
    after a failover (a forced failover, a partition, a pause), pooled connections keep writing to it
    until Sentinel demotes it (seconds later; its writes are then thrown away). With the check, that
    window is at most ``primary_check_interval``. ``None`` turns the check off (redis-py's behaviour).
    """

    def __init__(self, service_name: str, sentinel_manager: Any, *,
                 primary_check_interval: float | None = PRIMARY_CHECK_INTERVAL, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        self.primary_check_interval = primary_check_interval
        self._next_check = 0.0

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self.primary_check_interval is not None and time.monotonic() >= self._next_check:
            self._next_check = time.monotonic() + self.primary_check_interval
            # Drops idle connections when the address changed; a failed check changes nothing here
            # (the connection attempt below re-asks and reports it).
            with contextlib.suppress(RedisConnectionError, RedisTimeoutError, OSError):
                await self.get_master_address()
        return await super().get_connection()

    async def ensure_connection(self, connection: Any) -> None:
        # A connection that was in use when the primary moved comes back to the pool still open to
        # the old address: close it, so that connect() asks the Sentinels.
        if (self.primary_check_interval is not None and self.master_address is not None
                and connection.is_connected and (connection.host, connection.port) != self.master_address):
            await connection.disconnect()
        await super().ensure_connection(connection)


class SentinelRedis(aioredis.Redis):
    """The client for a Sentinel-managed primary; closing it also closes its Sentinel connections."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        pool = self.connection_pool
        await super().aclose(close_connection_pool)
        if isinstance(pool, SentinelConnectionPool):
            await pool.sentinel_manager.aclose()


def make_client(url: str, *, cluster: bool = False, socket_timeout: float = SOCKET_TIMEOUT,
                socket_connect_timeout: float = SOCKET_CONNECT_TIMEOUT,
                sentinel_socket_timeout: float = SENTINEL_SOCKET_TIMEOUT,
                primary_check_interval: float | None = PRIMARY_CHECK_INTERVAL,
                max_connections: int | None = None) -> tuple[Any, str]:
    """The redis-py asyncio client for ``url`` and a one-line description of it (no passwords).

    Answers are bytes (decode_responses=False). A single server or a Sentinel primary gets a blocking
    pool of ``max_connections`` (256); a cluster client gets 512 per node. ``primary_check_interval``
    is for Sentinel targets (see BlockingSentinelConnectionPool)."""
    target = parse_redis_url(url, cluster=cluster)
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    client: Any
    if target.kind == "single":
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections or MAX_CONNECTIONS, timeout=POOL_TIMEOUT,
            health_check_interval=HEALTH_CHECK_INTERVAL, **timeouts)
        client = aioredis.Redis(connection_pool=pool, decode_responses=False)
    elif target.kind == "cluster":
        size = max_connections or CLUSTER_MAX_CONNECTIONS
        if url.lower().startswith(CLUSTER_SCHEME + "://"):
            nodes = [ClusterNode(host, port) for host, port in target.hosts]
            client = RedisCluster(startup_nodes=nodes, username=target.username, password=target.password,
                                  decode_responses=False, max_connections=size, **timeouts)
        else:
            client = RedisCluster.from_url(url, decode_responses=False, max_connections=size, **timeouts)
    else:
        # No retries: redis-py's default (10 with backoff) would make one dead Sentinel stall every
        # primary lookup for seconds before the next Sentinel is asked.
        sentinel_kwargs: dict[str, Any] = {"socket_timeout": sentinel_socket_timeout,
                                           "socket_connect_timeout": sentinel_socket_timeout,
                                           "retry": Retry(NoBackoff(), 0)}
        if target.sentinel_password:
            sentinel_kwargs["password"] = target.sentinel_password
        if target.sentinel_username:
            sentinel_kwargs["username"] = target.sentinel_username
        sentinel = Sentinel(list(target.hosts), sentinel_kwargs=sentinel_kwargs)
        client = sentinel.master_for(
            target.service_name or "", redis_class=SentinelRedis,
            connection_pool_class=BlockingSentinelConnectionPool, primary_check_interval=primary_check_interval,
            max_connections=max_connections or MAX_CONNECTIONS, timeout=POOL_TIMEOUT,
            health_check_interval=HEALTH_CHECK_INTERVAL, db=target.db, username=target.username,
            password=target.password, decode_responses=False, **timeouts)
    return client, target.describe()


async def current_primary(client: Any) -> str:
    """Where writes go now, as ``host:port`` (for /readyz and logs). For a Sentinel client this asks the
    Sentinels (MasterNotFoundError, a ConnectionError, when none knows a healthy primary); for a
    cluster it lists every primary, comma-separated."""
    if isinstance(client, RedisCluster):
        await client.initialize()  # no-op once the client knows the cluster's layout
        return ",".join(sorted(f"{n.host}:{n.port}" for n in client.get_primaries()))
    pool = client.connection_pool
    if isinstance(pool, SentinelConnectionPool):
        host, port = await pool.get_master_address()
        return f"{host}:{port}"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', DEFAULT_PORT)}"
