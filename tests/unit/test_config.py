"""Settings: defaults < file < environment < flags, and clear errors naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from dragoman.config import Settings, load_settings
from dragoman.errors import ConfigError


def test_precedence(tmp_path: Path) -> None:
    f = tmp_path / "d.toml"
    f.write_text('[dragoman]\nport = 9000\npause_ms = 1000\nqueue_max = 5\ncells = ["a", "b"]\n')
    s = load_settings(f, env={"DRAGOMAN_PAUSE_MS": "2000", "DRAGOMAN_QUEUE_MAX": "6"},
                      overrides={"queue_max": 7})
    assert (s.port, s.pause_ms, s.queue_max, s.cells) == (9000, 2000, 7, ("a", "b"))
    assert s.node_ttl_ms == Settings().node_ttl_ms == 45_000  # PROTOCOL.md default


def test_protocol_defaults() -> None:
    s = load_settings(env={})
    assert (s.heartbeat_interval_ms, s.node_ttl_ms, s.job_timeout_ms, s.pause_ms, s.max_duration_ms,
            s.max_buffer_bytes, s.pending_timeout_ms, s.default_max_concurrency) == (
        15_000, 45_000, 60_000, 3_000, 10_000, 500 * 1024, 10_000, 4)


def test_defaults_are_coherent_for_real_time_speech() -> None:
    """A node that stops answering is gone (and its jobs move on) within 5 s of WebSocket pings, long
    before the job's own lease; a session checks a job it waits on well within its bound."""
    s = Settings()
    assert s.ws_ping_interval_ms + s.ws_ping_timeout_ms <= 5_000 < s.job_timeout_ms
    assert s.outcome_check_ms <= 5_000 and s.proc_ttl_ms <= 5_000
    assert s.session_grace_ms > 0 and s.redis_retry_ms > 5_000  # outlasts a 5 s Redis stall


def test_lists_from_the_environment() -> None:
    s = load_settings(env={"DRAGOMAN_NODE_TOKENS": "a, b", "DRAGOMAN_CELLS": "c0,c1"})
    assert s.node_tokens == ("a", "b") and s.cells == ("c0", "c1")


@pytest.mark.parametrize(("env", "message"), [
    ({"DRAGOMAN_PORT": "eighty"}, "'port'"),
    ({"DRAGOMAN_QUEUE_MAX": "0"}, "'queue_max' must be positive"),
    ({"DRAGOMAN_CELLS": "a{b}"}, "cell name"),
    ({"DRAGOMAN_CELLS": "c.0"}, "cell name"),  # a job id is "<cell>.<unique>"
    ({"DRAGOMAN_INBOX_MAX_LEN": "0"}, "'inbox_max_len' must be positive"),
    ({"DRAGOMAN_SESSION_GRACE_MS": "-1"}, "'session_grace_ms' must not be negative"),
    ({"DRAGOMAN_WS_IDLE_PING_INTERVAL_MS": "1000"}, "'ws_idle_ping_interval_ms' must not be below"),
])
def test_bad_values_are_refused_with_the_setting_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env=env)


def test_unknown_setting_in_a_file(tmp_path: Path) -> None:
    f = tmp_path / "d.toml"
    f.write_text("colour = 'blue'\n")
    with pytest.raises(ConfigError, match="unknown setting 'colour'"):
        load_settings(f, env={})


def test_an_unknown_dragoman_variable_is_named_with_the_closest_setting() -> None:
    from dragoman.config import unknown_env

    warnings = unknown_env({"DRAGOMAN_REDIS_ULR": "redis://x", "DRAGOMAN_PORT": "1", "DRAGOMAN_CONFIG": "f",
                            "DRAGOMAN_TOKEN": "t", "DRAGOMAN_XYZZY": "1", "PATH": "/bin"})
    assert len(warnings) == 2
    assert "DRAGOMAN_REDIS_ULR" in warnings[0] and "DRAGOMAN_REDIS_URL" in warnings[0]
    assert "DRAGOMAN_XYZZY" in warnings[1] and "did you mean" not in warnings[1]
