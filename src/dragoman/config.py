"""Settings: the only module that reads the environment or configuration files.

Precedence, lowest first: built-in defaults < TOML file < ``DRAGOMAN_*`` environment < explicit
overrides (CLI flags). Defaults are those named in PROTOCOL.md. The result is a frozen ``Settings``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dragoman.errors import ConfigError


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    # Redis: empty url means "start an embedded server".
    redis_url: str = ""
    key_prefix: str = "dragoman"
    cells: tuple[str, ...] = ("c0",)
    redis_retry_ms: int = 15_000  # a transition is retried this long while Redis is unreachable
    redis_min_replicas_ack: int = 0  # >0: a transition returns only once this many replicas have it (WAIT)
    redis_replica_wait_ms: int = 1_000  # how long one WAIT waits (then the transition is retried)
    redis_auto_pipeline: bool = True  # a loop turn's script calls share one write (not for a Cluster)
    inbox_max_len: int = 10_000  # unread effects a process's inbox holds before effects for it move on
    warmup_ms: int = 5_000  # after Redis lost its data or a pool its last node, jobs for it wait this long

    # HTTP / WebSocket server
    host: str = "127.0.0.1"
    port: int = 8700
    workers: int = 1  # scheduler processes behind the one port (SO_REUSEPORT); see `dragoman serve --workers`
    event_loop: str = "uvloop"  # or "asyncio" (the standard library's selector loop)
    ws_deflate: bool = False  # permessage-deflate on the WebSockets (base64 audio does not compress)

    # Node plane
    heartbeat_interval_ms: int = 15_000
    node_ttl_ms: int = 45_000  # 3 x heartbeat interval
    job_timeout_ms: int = 60_000  # a job's lease, from assignment
    max_attempts: int = 3
    default_max_concurrency: int = 4
    reaper_interval_ms: int = 1_000
    ws_ping_interval_ms: int = 2_000  # WebSocket pings: a peer that stops answering is gone within
    ws_ping_timeout_ms: int = 2_500  # interval + timeout, and its jobs move on (hung node detection)
    ws_idle_ping_interval_ms: int = 20_000  # pings to a socket owed nothing: a session, a node holding no
    # job (a job assigned to it brings its next ping within ws_ping_interval_ms; nothing is waited on)
    node_tokens: tuple[str, ...] = ()
    operator_tokens: tuple[str, ...] = ()  # guard the operator actions (drain, cancel) when set
    max_pools_per_node: int = 256
    max_frame_bytes: int = 4 * 1024 * 1024
    node_msgs_per_s: float = 200.0

    # Session plane
    pause_ms: int = 3_000
    max_duration_ms: int = 10_000
    max_buffer_bytes: int = 500 * 1024
    pending_timeout_ms: int = 10_000
    outcome_check_ms: int = 5_000  # a session asks Redis about a job it has waited on this long
    session_grace_ms: int = 15_000  # a session whose socket or process is lost can be resumed this long
    queue_max: int = 1_000  # per pool; holds about pending_timeout_ms of a busy pool's traffic
    api_keys: tuple[str, ...] = ()
    chunks_per_s: float = 50.0
    max_sessions_per_key: int = 100
    padding_ms: int = 0
    room_max_members: int = 16
    room_expiry_ms: int = 1_800_000  # a room with no speech for this long is closed (room_expired)

    # Bookkeeping
    proc_ttl_ms: int = 3_000  # a scheduler process's registration lifetime (renewed every third of it)
    stats_flush_ms: int = 2_000  # per-process counters are added to the cluster-wide ones this often
    gc_sweep_ms: int = 600_000  # survivors of a full cycle collection are frozen; everything is thawed and
    # collected once this often (0: CPython's collector as it is; see dragoman/gcpolicy.py)

    log_level: str = "info"

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_CELL = re.compile(r"^[A-Za-z0-9_\-]{1,32}\Z")


def _coerce(name: str, value: Any) -> Any:
    """Turn a file/env/CLI value into the field's type, or raise ConfigError naming the field."""
    default = _FIELDS[name].default
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, tuple):
            if isinstance(value, str):
                return tuple(v.strip() for v in value.split(",") if v.strip())
            return tuple(str(v) for v in value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"setting {name!r}: cannot use {value!r}: {exc}") from None


def _apply(base: dict[str, Any], source: Mapping[str, Any], origin: str) -> None:
    for key, value in source.items():
        if value is None:
            continue
        name = key.replace("-", "_").lower()
        if name not in _FIELDS:
            raise ConfigError(f"unknown setting {key!r} in {origin}")
        base[name] = _coerce(name, value)


def load_settings(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    values: dict[str, Any] = {}
    env = os.environ if env is None else env
    path = file or env.get("DRAGOMAN_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        _apply(values, data.get("dragoman", data), str(path))
    env_values = {
        k[len("DRAGOMAN_") :]: v
        for k, v in env.items()
        if k.startswith("DRAGOMAN_") and k != "DRAGOMAN_CONFIG" and k[len("DRAGOMAN_") :].lower() in _FIELDS
    }
    _apply(values, env_values, "environment")
    if overrides:
        _apply(values, overrides, "command line")
    settings = Settings(**values)
    _validate(settings)
    return settings


# DRAGOMAN_* variables that are not settings but are read elsewhere (the CLI, tests, benchmarks).
KNOWN_OTHER_ENV = frozenset({"DRAGOMAN_CONFIG", "DRAGOMAN_API_KEY", "DRAGOMAN_TOKEN", "DRAGOMAN_BENCH_HOME",
                             "DRAGOMAN_SPECS", "DRAGOMAN_STATEFUL_EXAMPLES"})


def unknown_env(env: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``DRAGOMAN_*`` variable that names no setting (a misspelt one is otherwise
    ignored), with the closest setting's variable when one is close."""
    env = os.environ if env is None else env
    out = []
    for var in sorted(env):
        if not var.startswith("DRAGOMAN_") or var in KNOWN_OTHER_ENV or var[len("DRAGOMAN_"):].lower() in _FIELDS:
            continue
        close = difflib.get_close_matches(var[len("DRAGOMAN_"):].lower(), list(_FIELDS), n=1, cutoff=0.75)
        out.append(f"environment variable {var} names no setting and is ignored"
                   + (f" (did you mean DRAGOMAN_{close[0].upper()}?)" if close else ""))
    return out


def _validate(s: Settings) -> None:
    for name in ("heartbeat_interval_ms", "node_ttl_ms", "job_timeout_ms", "max_attempts",
                 "default_max_concurrency", "reaper_interval_ms", "queue_max", "pending_timeout_ms",
                 "outcome_check_ms", "proc_ttl_ms", "inbox_max_len", "redis_retry_ms", "ws_ping_interval_ms",
                 "ws_ping_timeout_ms", "ws_idle_ping_interval_ms", "stats_flush_ms", "room_max_members", "room_expiry_ms"):
        if getattr(s, name) <= 0:
            raise ConfigError(f"setting {name!r} must be positive, got {getattr(s, name)}")
    for name in ("session_grace_ms", "warmup_ms", "redis_min_replicas_ack", "gc_sweep_ms"):
        if getattr(s, name) < 0:
            raise ConfigError(f"setting {name!r} must not be negative, got {getattr(s, name)}")
    if s.ws_idle_ping_interval_ms < s.ws_ping_interval_ms:
        raise ConfigError("setting 'ws_idle_ping_interval_ms' must not be below 'ws_ping_interval_ms' "
                          f"({s.ws_idle_ping_interval_ms} < {s.ws_ping_interval_ms})")
    if s.event_loop not in ("uvloop", "asyncio"):
        raise ConfigError(f"setting 'event_loop' must be 'uvloop' or 'asyncio', got {s.event_loop!r}")
    if s.workers < 1:
        raise ConfigError(f"setting 'workers' must be at least 1, got {s.workers}")
    if not s.cells:
        raise ConfigError("setting 'cells' needs at least one cell name")
    for cell in s.cells:
        if not _CELL.match(cell):
            raise ConfigError(f"cell name {cell!r} must be 1-32 letters, digits, '_' or '-' "
                              "(it is a key's hash tag and a job id's prefix)")
