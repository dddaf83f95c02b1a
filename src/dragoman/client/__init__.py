"""Async client library for the session plane (and a scripted node peer for tests and tools)."""

from dragoman.client.session import SessionClient, SessionError

__all__ = ["SessionClient", "SessionError"]
