"""The exception tree.

    DragomanError
    ├── ConfigError            bad settings (file, env, flags)
    ├── ProtocolError          a frame that does not parse or breaks a rule (-> INVALID_MESSAGE)
    ├── StoreError             Redis-side failures
    │   ├── DependencyDown     Redis unreachable (-> SCHEDULER_DEPENDENCY_DOWN)
    │   └── ScriptError        a script answered with an error code it should not have
    └── EmbeddedServerError    the embedded Valkey/Redis could not be started
"""

from __future__ import annotations


class DragomanError(Exception):
    """Base of every error Dragoman raises on purpose."""


class ConfigError(DragomanError):
    pass


class ProtocolError(DragomanError):
    """A peer sent something we cannot accept. ``code`` is the wire error code."""

    def __init__(self, message: str, code: str = "INVALID_MESSAGE") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StoreError(DragomanError):
    pass


class DependencyDown(StoreError):
    code = "SCHEDULER_DEPENDENCY_DOWN"


class ScriptError(StoreError):
    pass


class EmbeddedServerError(DragomanError):
    pass
