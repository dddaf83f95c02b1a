"""Shared type aliases and the small Protocols the layers talk through. Imports nothing at runtime
beyond ``typing``, so any module may import it without pulling in the others."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dragoman.store.api import JobSpec
    from dragoman.store.replies import (
        CancelReply,
        CloseReply,
        DispatchReply,
        JobStatus,
        RoomReply,
        SessionReply,
    )


class SessionStore(Protocol):
    """What a session needs of the store (``dragoman.store.api.Store`` is one)."""

    proc: str

    async def open_session(self, session_id: str, spec: str) -> SessionReply: ...
    async def reclaim_session(self, session_id: str, spec: str, epoch: int,
                              cells: Iterable[str] | None = ...) -> None: ...
    async def dispatch(self, spec: JobSpec) -> DispatchReply: ...
    async def get_jobs(self, job_ids: Iterable[str]) -> dict[str, JobStatus]: ...
    async def ack(self, session_id: str, job_ids: Iterable[str], *, batched: bool = ...) -> int: ...
    async def cancel(self, job_id: str, code: str = ...) -> CancelReply: ...
    async def close_session(self, session_id: str, epoch: int, *, detach: bool, grace_ms: int = ...,
                            cells: Iterable[str] | None = ...) -> list[CloseReply]: ...
    async def room(self, op: str, code: str, session_id: str, arg5: str = ..., arg6: str = ...) -> RoomReply: ...


class Transport(Protocol):
    """A socket's outbound side: ``send`` never blocks (False when the peer is gone)."""

    def send(self, text: str) -> bool: ...

    def send_soon(self, text: str) -> bool:
        """A frame nobody waits on: it may wait (briefly) to leave with the next one, in order."""
        ...


class Observer(Protocol):
    """Where a session reports measurements (the app's metrics)."""

    def observe(self, name: str, seconds: float) -> None: ...
    def count(self, name: str) -> None: ...
    def settled(self, state: str, code: str) -> None: ...
