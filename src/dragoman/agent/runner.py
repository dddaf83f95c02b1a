"""The node agent: one worker process's connection to the scheduler (PROTOCOL.md section 1).

Shape (borrowed from SAQ's ``Worker``): :meth:`NodeAgent.run` is a reconnect loop; each connection
registers (``node_register`` -> ``node_register_ack``), then runs two upkeep tasks side by side, a
heartbeat poller and a receiver, until the socket drops, the agent has drained, or :meth:`stop` is
called. Every ``job_assign`` becomes one task that awaits ``engine.run`` and sends ``job_result``.
Signal handlers are the caller's business (``dragoman node`` installs them): the agent only offers
:meth:`request_drain` (graceful) and :meth:`stop` (hard).

Rules the agent keeps:

* **Capacity.** At most ``slots`` jobs run at once. An assignment beyond that, or any assignment
  while draining, is refused at once with a failed ``job_result`` (``NODE_OVERLOADED``), so the
  scheduler can place the job elsewhere instead of waiting for its lease.
* **Duplicates.** An assignment whose ``(job_id, attempt_id)`` was already seen is ignored. A newer
  attempt of a known ``job_id`` is accepted (the scheduler reassigns with ``attempt_id + 1``); if the
  older attempt is still running here it is cancelled first, since only the newest attempt's result
  can be accepted.
* **Cancellation.** ``job_cancel`` cancels the job's task; nothing is ever sent for that attempt.
* **Reconnects** keep the ``node_id`` (the one the last ack gave), back off exponentially from
  ``backoff_min_s`` to ``backoff_max_s`` with jitter, and log every failure. The backoff resets only
  after a connection that stayed up for ``backoff_max_s``, so a scheduler that accepts and at once
  drops connections cannot put the agent in a tight loop.
* **Results across a dropped socket: kept, not dropped.** Jobs keep running while the agent
  reconnects; a result that cannot be sent waits in a small bounded outbox (oldest dropped, with a
  warning, past ``outbox_size``) and is sent right after the next ``node_register_ack``. Why: when
  the agent re-registers before the scheduler has processed the old socket's close (another
  scheduler process, a quick reconnect), the scheduler keeps the jobs with this node and accepts
  their results, which saves a whole lease timeout. When it had already reassigned them, the late
  result is for an old attempt and the scheduler drops it (its fence, PROTOCOL.md): harmless.
  ``job_started`` frames are never queued: a late one says nothing useful.
* **Drain.** :meth:`request_drain` sends a heartbeat with ``draining: true`` at once, refuses new
  jobs, lets running jobs finish and their results go out (reconnecting if needed to deliver them),
  then closes the socket and makes :meth:`run` return. ``drain_timeout_s`` bounds the wait; past it
  the agent stops hard, as :meth:`stop` does.

The engine belongs to the caller: the agent never calls ``engine.aclose()``.
"""

from __future__ import annotations

import asyncio
import os
import platform as _platform
import random
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.uri import parse_uri

from dragoman import __version__
from dragoman.agent.engines.base import Engine, EngineErrorCode, EngineJob, EngineResult
from dragoman.clock import wall_ms
from dragoman.errors import ConfigError, ProtocolError
from dragoman.wire import (
    CapabilityByType,
    ErrorCode,
    ErrorInfo,
    ErrorMessage,
    Hardware,
    JobAssign,
    JobCancel,
    JobResult,
    JobStarted,
    LanguageCapabilities,
    NodeHeartbeat,
    NodeRegister,
    NodeRegisterAck,
    ResourceUsage,
    decode_node_outbound,
    encode,
)

__all__ = ["NODE_OVERLOADED", "NodeAgent", "RegistrationError", "parse_language_pairs"]

MAX_FRAME_BYTES: Final = 8 * 1024 * 1024
"""Largest frame the agent accepts (a ``job_assign`` carries up to ~10 s of base64 audio)."""

DEFAULT_HEARTBEAT_INTERVAL_S: Final = 15.0
"""Used when neither the caller nor the ack gives an interval: the existing worker's period."""

NODE_OVERLOADED: Final = ErrorCode.NODE_OVERLOADED
SEEN_JOBS_LIMIT: Final = 4096
"""How many ``(job_id, attempt_id)`` keys the duplicate filter remembers."""

SERVICE_TYPES: Final = ("asr", "nmt", "tts")

_log = structlog.get_logger("dragoman.agent")

Pair = tuple[str, str]


class RegistrationError(Exception):
    """The scheduler answered ``node_register`` with an ``error`` frame instead of an ack."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionLost(Exception):
    """The scheduler closed the socket (cleanly) while the agent still had work to do."""


@dataclass(slots=True)
class _Running:
    assign: JobAssign
    task: asyncio.Task[None]


@dataclass(slots=True)
class _Pending:
    """A finished job's ``job_result`` frame waiting for a connection."""

    job_id: str
    attempt_id: int
    frame: str


def parse_language_pairs(text: str) -> list[Pair]:
    """Parse ``"zh:en,en:zh"`` into directed pairs, in order, without duplicates.

    Raises ``ValueError`` naming the bad item: a missing ``:``, an empty or over-long code, spaces
    inside a code, or ``auto`` (two-way detection is a pool, not a pair; see ``two_way``).
    """
    pairs: dict[Pair, None] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        src, sep, tgt = item.partition(":")
        src, tgt = src.strip(), tgt.strip()
        if not sep or not src or not tgt or ":" in tgt:
            raise ValueError(f"{item!r} is not a language pair; write src:tgt, e.g. zh:en")
        for code in (src, tgt):
            if len(code) > 16 or any(ch.isspace() for ch in code):
                raise ValueError(f"{code!r} in {item!r} is not a language code (1-16 characters, no spaces)")
            if code.lower() == "auto":
                raise ValueError(f"{item!r}: 'auto' is not a language; list both directions instead")
        pairs[(src, tgt)] = None
    if not pairs:
        raise ValueError(f"no language pairs in {text!r}; write e.g. zh:en,en:zh")
    return list(pairs)


def _memory_gb() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (AttributeError, ValueError, OSError):
        return None


class NodeAgent:
    """A node: registers its language pairs and slots, heartbeats, and runs jobs on ``engine``.

    ``pairs`` are directed ``(src, tgt)`` pairs; with ``two_way`` the reverse of each is added too,
    so the node also joins the two-way ``a<>b`` pools (the web client's default mode). ``slots`` is
    ``max_concurrency``. ``heartbeat_interval_s`` overrides the ack's ``heartbeat_interval_ms``
    (default 15 s when the ack has none). ``on_registered`` is called with the node id after every
    successful registration (the CLI prints its start line from it).
    """

    def __init__(
        self,
        scheduler_url: str,
        *,
        pairs: Sequence[Pair],
        slots: int,
        engine: Engine,
        node_id: str | None = None,
        token: str | None = None,
        heartbeat_interval_s: float | None = None,
        platform: str | None = None,
        version: str | None = None,
        two_way: bool = False,
        send_job_started: bool = True,
        backoff_min_s: float = 0.2,
        backoff_max_s: float = 10.0,
        open_timeout_s: float = 10.0,
        register_timeout_s: float = 10.0,
        drain_timeout_s: float | None = None,
        outbox_size: int = 256,
        on_registered: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        try:
            parse_uri(scheduler_url)
        except InvalidURI as exc:
            raise ConfigError(f"scheduler URL {scheduler_url!r} is not a ws:// or wss:// URL") from exc
        if not 1 <= slots <= 1024:
            raise ConfigError(f"slots must be from 1 to 1024, got {slots}")
        if heartbeat_interval_s is not None and heartbeat_interval_s <= 0:
            raise ConfigError(f"heartbeat_interval_s must be positive, got {heartbeat_interval_s}")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ConfigError("backoff needs 0 < backoff_min_s <= backoff_max_s")
        directed: dict[Pair, None] = {(s, t): None for s, t in pairs}
        if two_way:
            directed.update({(t, s): None for s, t in list(directed)})
        if not directed:
            raise ConfigError("a node needs at least one language pair")

        self._url = scheduler_url
        self._pairs: list[Pair] = list(directed)
        self._slots = slots
        self._engine = engine
        self._node_id = node_id
        self._token = token
        self._interval_override = heartbeat_interval_s
        self._interval_s = heartbeat_interval_s or DEFAULT_HEARTBEAT_INTERVAL_S
        self._platform = platform or f"{_platform.system().lower() or 'unknown'}-{_platform.machine()}"
        self._version = version or f"dragoman-agent/{__version__}"
        self._send_job_started = send_job_started
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._open_timeout_s = open_timeout_s
        self._register_timeout_s = register_timeout_s
        self._drain_timeout_s = drain_timeout_s
        self._outbox_size = max(1, outbox_size)
        self._on_registered = on_registered
        self._rng = rng or random.Random()

        self._jobs: dict[str, _Running] = {}
        self._seen: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._outbox: deque[_Pending] = deque()
        self._ws: ClientConnection | None = None
        self._draining = False
        self._drain_announced = False  # a draining heartbeat went out on the current connection
        self._heartbeat_wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._attempt: asyncio.Task[bool] | None = None
        self._active = False
        self._completed = 0
        self._cancelled = 0
        self._refused = 0
        self._log = _log.bind(scheduler=scheduler_url)

    # --- public state ---------------------------------------------------------------------------

    @property
    def node_id(self) -> str | None:
        """The id the scheduler gave this node (``None`` until the first ack, unless preset)."""
        return self._node_id

    @property
    def running_jobs(self) -> int:
        return len(self._jobs)

    @property
    def completed(self) -> int:
        """Jobs the engine finished (successfully or not) whose result was sent or queued."""
        return self._completed

    @property
    def cancelled(self) -> int:
        """Jobs stopped by ``job_cancel``, a newer attempt, or a hard stop."""
        return self._cancelled

    @property
    def refused(self) -> int:
        """Assignments answered at once with a failure (full, draining, or unreadable)."""
        return self._refused

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def pairs(self) -> list[Pair]:
        return list(self._pairs)

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect and serve until drained or stopped, reconnecting with capped, jittered backoff.

        Raises only for programming errors or when the task running it is cancelled; every
        connection-level failure is logged and retried.
        """
        if self._active:
            raise RuntimeError("NodeAgent.run() is already running")
        self._active = True
        self._finished.clear()
        loop = asyncio.get_running_loop()
        failures = 0
        try:
            while not self._done():
                started = loop.time()
                self._attempt = asyncio.create_task(self._connect_and_serve(), name="dragoman-agent-conn")
                try:
                    await asyncio.wait({self._attempt})
                finally:
                    if not self._attempt.done():  # run() itself was cancelled
                        self._attempt.cancel()
                        await asyncio.gather(self._attempt, return_exceptions=True)
                attempt, self._attempt = self._attempt, None
                if attempt.cancelled():  # stop() cut it short
                    break
                exc = attempt.exception()
                if exc is None and attempt.result():
                    break  # drained and closed cleanly
                if self._done():
                    break
                if exc is not None:
                    self._log_failure(exc, failures)
                if loop.time() - started >= self._backoff_max_s:
                    failures = 0
                delay = self._backoff_delay(failures)
                failures += 1
                self._log.info("agent.reconnect_scheduled", delay_s=round(delay, 3), attempt=failures)
                await self._wait_done(delay)
        finally:
            await self._cancel_jobs("agent stopped")
            if self._outbox:
                self._log.warning("agent.outbox_dropped", results=len(self._outbox))
                self._outbox.clear()
            self._ws = None
            self._active = False
            self._finished.set()
            self._log.info("agent.stopped", node_id=self._node_id, completed=self._completed)

    def request_drain(self) -> None:
        """Stop taking jobs, finish the running ones, then close and let :meth:`run` return.

        Safe to call from a signal handler installed with ``loop.add_signal_handler`` and more than
        once (later calls do nothing).
        """
        if self._draining:
            return
        self._draining = True
        self._log.info("agent.drain_requested", node_id=self._node_id, running_jobs=len(self._jobs))
        self._heartbeat_wake.set()  # announce it at once, not at the next tick
        if self._drain_timeout_s is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
            else:
                loop.call_later(self._drain_timeout_s, self._drain_expired)
        self._check_drained()

    async def stop(self) -> None:
        """Stop now: cancel running jobs (no results are sent; the scheduler's leases recover
        them), close the socket and wait for :meth:`run` to return."""
        self._stopping.set()
        if self._attempt is not None and not self._attempt.done():
            self._attempt.cancel()
        if self._active:
            await self._finished.wait()

    # --- one connection -------------------------------------------------------------------------

    async def _connect_and_serve(self) -> bool:
        """One connection, from handshake to close. True when the agent drained and closed."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else None
        async with connect(
            self._url,
            additional_headers=headers,
            max_size=MAX_FRAME_BYTES,
            compression=None,  # base64 audio does not compress; deflate would only cost CPU
            open_timeout=self._open_timeout_s,
        ) as ws:
            ack = await asyncio.wait_for(self._register(ws), self._register_timeout_s)
            return await self._serve(ws, ack)

    async def _register(self, ws: ClientConnection) -> NodeRegisterAck:
        await ws.send(self._register_frame())
        async for raw in ws:
            try:
                msg = decode_node_outbound(raw)
            except ProtocolError as exc:
                self._log.warning("agent.invalid_frame", phase="register", error=exc.message)
                continue
            if isinstance(msg, NodeRegisterAck):
                return msg
            if isinstance(msg, ErrorMessage):
                raise RegistrationError(msg.code, msg.message)
            self._log.warning("agent.frame_before_ack_ignored", frame_type=type(msg).__name__)
        raise ConnectionLost(f"closed before node_register_ack ({self._close_text(ws)})")

    async def _serve(self, ws: ClientConnection, ack: NodeRegisterAck) -> bool:
        previous = self._node_id
        self._node_id = ack.node_id
        if self._interval_override is None and ack.heartbeat_interval_ms:
            self._interval_s = ack.heartbeat_interval_ms / 1000.0
        self._log.info(
            "agent.registered",
            node_id=self._node_id,
            reconnected=previous is not None,
            heartbeat_interval_s=self._interval_s,
            pairs=[f"{s}>{t}" for s, t in self._pairs],
            slots=self._slots,
        )
        if previous is not None and previous != ack.node_id:
            self._log.warning("agent.node_id_changed", old=previous, new=ack.node_id)
        if self._on_registered is not None:
            try:
                self._on_registered(ack.node_id)
            except Exception:
                self._log.exception("agent.on_registered_failed")

        self._ws = ws
        self._drain_announced = False
        heartbeat: asyncio.Task[None] | None = None
        receiver: asyncio.Task[None] | None = None
        drained: asyncio.Task[bool] | None = None
        try:
            await self._flush_outbox(ws)
            if self._draining:
                await self._send_heartbeat(ws)
            heartbeat = asyncio.create_task(self._heartbeat_loop(ws), name="dragoman-agent-heartbeat")
            receiver = asyncio.create_task(self._receive_loop(ws), name="dragoman-agent-receiver")
            drained = asyncio.create_task(self._drained.wait(), name="dragoman-agent-drained")
            done, _ = await asyncio.wait({heartbeat, receiver, drained}, return_when=asyncio.FIRST_COMPLETED)
            if drained in done:
                if not self._drain_announced:
                    await self._send_heartbeat(ws)
                await ws.close(1000, "drained")
                self._log.info("agent.drained", node_id=self._node_id, completed=self._completed)
                return True
            for task in (receiver, heartbeat):  # the first failure explains the disconnect
                if task in done:
                    task.result()
            raise ConnectionLost(f"scheduler closed the connection ({self._close_text(ws)})")
        finally:
            self._ws = None
            pending = [t for t in (heartbeat, receiver, drained) if t is not None and not t.done()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    async def _heartbeat_loop(self, ws: ClientConnection) -> None:
        while True:
            try:
                await asyncio.wait_for(self._heartbeat_wake.wait(), self._interval_s)
            except TimeoutError:
                pass
            self._heartbeat_wake.clear()
            await self._send_heartbeat(ws)

    async def _send_heartbeat(self, ws: ClientConnection) -> None:
        draining = self._draining
        await ws.send(self._heartbeat_frame())
        if draining:
            self._drain_announced = True

    async def _receive_loop(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                msg = decode_node_outbound(raw)
            except ProtocolError as exc:
                self._log.warning("agent.invalid_frame", error=exc.message)
                await self._refuse_unreadable_assign(ws, raw, exc)
                continue
            if isinstance(msg, JobAssign):
                await self._on_assign(ws, msg)
            elif isinstance(msg, JobCancel):
                self._on_cancel(msg)
            elif isinstance(msg, ErrorMessage):
                self._log.warning(
                    "agent.scheduler_error", code=msg.code, message=msg.message, details=msg.details
                )
            elif isinstance(msg, NodeRegisterAck):
                self._log.info("agent.extra_ack_ignored", node_id=msg.node_id)

    # --- jobs -----------------------------------------------------------------------------------

    async def _on_assign(self, ws: ClientConnection, msg: JobAssign) -> None:
        key = (msg.job_id, msg.attempt_id)
        if key in self._seen:
            self._log.info("agent.duplicate_assign_ignored", job_id=msg.job_id, attempt_id=msg.attempt_id)
            return
        self._remember(key)
        current = self._jobs.get(msg.job_id)
        if current is not None:
            if current.assign.attempt_id > msg.attempt_id:
                self._log.warning(
                    "agent.stale_attempt_ignored",
                    job_id=msg.job_id,
                    attempt_id=msg.attempt_id,
                    running_attempt=current.assign.attempt_id,
                )
                return
            self._log.info(
                "agent.attempt_superseded",
                job_id=msg.job_id,
                old_attempt=current.assign.attempt_id,
                new_attempt=msg.attempt_id,
            )
            del self._jobs[msg.job_id]
            current.task.cancel()
        self._drop_from_outbox(msg.job_id)

        if self._draining:
            await self._refuse(ws, msg, NODE_OVERLOADED, "draining")
            return
        if len(self._jobs) >= self._slots:
            await self._refuse(ws, msg, NODE_OVERLOADED, f"all {self._slots} slots are busy")
            return
        try:
            job = EngineJob.from_assign(msgspec.to_builtins(msg))
        except (ValueError, KeyError, TypeError) as exc:
            await self._refuse(ws, msg, EngineErrorCode.PROCESSING_ERROR, f"unreadable job_assign: {exc}")
            return
        task = asyncio.create_task(
            self._run_job(msg, job), name=f"dragoman-job-{msg.job_id}#{msg.attempt_id}"
        )
        self._jobs[msg.job_id] = _Running(msg, task)

    def _on_cancel(self, msg: JobCancel) -> None:
        running = self._jobs.pop(msg.job_id, None)
        dropped = self._drop_from_outbox(msg.job_id)
        if running is None:
            self._log.info("agent.cancel_unknown_job", job_id=msg.job_id, dropped_queued_result=dropped)
            self._check_drained()
            return
        self._log.info(
            "agent.job_cancelled", job_id=msg.job_id, attempt_id=running.assign.attempt_id, reason=msg.reason
        )
        running.task.cancel()
        self._check_drained()

    async def _run_job(self, assign: JobAssign, job: EngineJob) -> None:
        me = asyncio.current_task()
        try:
            if self._send_job_started and self._ws is not None:
                started = JobStarted(
                    job_id=assign.job_id,
                    attempt_id=assign.attempt_id,
                    node_id=self._node_id or "",
                    session_id=assign.session_id,
                    trace_id=assign.trace_id,
                )
                try:
                    await self._ws.send(encode(started))
                except ConnectionClosed:
                    pass  # the receiver sees the close and reconnects; a late job_started is useless
            t0 = time.perf_counter()
            try:
                result = await self._engine.run(job)
            except Exception as exc:  # the Engine contract says it never raises; log loudly if it does
                self._log.exception("agent.engine_raised", job_id=assign.job_id, engine=self._engine.name)
                result = EngineResult.failure(
                    EngineErrorCode.PROCESSING_ERROR, f"engine {self._engine.name!r} raised {exc!r}"
                )
                result.processing_time_ms = round((time.perf_counter() - t0) * 1000)
            if not result.success:
                self._log.warning(
                    "agent.job_failed",
                    job_id=assign.job_id,
                    attempt_id=assign.attempt_id,
                    code=result.error_code,
                    message=result.error_message,
                )
            self._completed += 1
            await self._deliver(assign, self._result_frame(assign, result))
        except asyncio.CancelledError:
            self._cancelled += 1
            raise
        finally:
            running = self._jobs.get(assign.job_id)
            if running is not None and running.task is me:
                del self._jobs[assign.job_id]
            self._check_drained()

    async def _refuse(self, ws: ClientConnection, msg: JobAssign, code: str, message: str) -> None:
        self._refused += 1
        self._log.warning(
            "agent.job_refused", job_id=msg.job_id, attempt_id=msg.attempt_id, code=code, message=message
        )
        await ws.send(self._result_frame(msg, EngineResult.failure(code, message)))

    async def _refuse_unreadable_assign(
        self, ws: ClientConnection, raw: str | bytes, exc: ProtocolError
    ) -> None:
        """A ``job_assign`` we cannot decode still names its job: fail it at once rather than let
        the scheduler wait for the lease."""
        try:
            frame = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            return
        if not isinstance(frame, dict) or frame.get("type") != "job_assign":
            return
        job_id, attempt_id = frame.get("job_id"), frame.get("attempt_id")
        if not isinstance(job_id, str) or not isinstance(attempt_id, int) or attempt_id < 1:
            return
        if (job_id, attempt_id) in self._seen:
            return
        self._remember((job_id, attempt_id))
        self._refused += 1
        fields = EngineResult.failure(EngineErrorCode.PROCESSING_ERROR, exc.message).to_job_result_fields()
        error = fields.pop("error")
        result = JobResult(
            job_id=job_id,
            attempt_id=attempt_id,
            node_id=self._node_id or "",
            session_id=frame.get("session_id") if isinstance(frame.get("session_id"), str) else None,
            trace_id=frame.get("trace_id") if isinstance(frame.get("trace_id"), str) else None,
            error=ErrorInfo(**error),
            **fields,
        )
        await ws.send(encode(result))

    async def _deliver(self, assign: JobAssign, frame: str) -> None:
        ws = self._ws
        if ws is not None:
            try:
                await ws.send(frame)
                return
            except ConnectionClosed as exc:
                self._log.warning("agent.result_send_failed", job_id=assign.job_id, error=str(exc))
        if len(self._outbox) >= self._outbox_size:
            lost = self._outbox.popleft()
            self._log.warning(
                "agent.outbox_full_result_dropped", job_id=lost.job_id, attempt_id=lost.attempt_id
            )
        self._outbox.append(_Pending(assign.job_id, assign.attempt_id, frame))
        self._log.info("agent.result_queued", job_id=assign.job_id, attempt_id=assign.attempt_id)

    async def _flush_outbox(self, ws: ClientConnection) -> None:
        sent = 0
        while self._outbox:
            item = self._outbox.popleft()
            try:
                await ws.send(item.frame)
            except BaseException:
                self._outbox.appendleft(item)
                raise
            sent += 1
        if sent:
            self._log.info("agent.outbox_flushed", results=sent)
        self._check_drained()

    def _drop_from_outbox(self, job_id: str) -> int:
        before = len(self._outbox)
        if before:
            kept = [p for p in self._outbox if p.job_id != job_id]
            self._outbox.clear()
            self._outbox.extend(kept)
        return before - len(self._outbox)

    async def _cancel_jobs(self, why: str) -> None:
        running = list(self._jobs.values())
        self._jobs.clear()
        if not running:
            return
        self._log.warning("agent.jobs_abandoned", jobs=[r.assign.job_id for r in running], reason=why)
        for r in running:
            r.task.cancel()
        await asyncio.gather(*(r.task for r in running), return_exceptions=True)

    def _remember(self, key: tuple[str, int]) -> None:
        self._seen[key] = None
        while len(self._seen) > SEEN_JOBS_LIMIT:
            self._seen.popitem(last=False)

    # --- drain / stop helpers -------------------------------------------------------------------

    def _check_drained(self) -> None:
        if self._draining and not self._jobs and not self._outbox:
            self._drained.set()

    def _drain_expired(self) -> None:
        if self._active and not self._drained.is_set() and not self._stopping.is_set():
            self._log.warning(
                "agent.drain_timeout", running_jobs=len(self._jobs), timeout_s=self._drain_timeout_s
            )
            self._stopping.set()
            if self._attempt is not None and not self._attempt.done():
                self._attempt.cancel()

    def _done(self) -> bool:
        return self._stopping.is_set() or self._drained.is_set()

    async def _wait_done(self, delay: float) -> None:
        """Sleep for the backoff delay, waking early on stop or when a drain completes."""
        waiters = [asyncio.create_task(self._stopping.wait()), asyncio.create_task(self._drained.wait())]
        try:
            await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

    def _backoff_delay(self, failures: int) -> float:
        """Exponential from ``backoff_min_s``, capped at ``backoff_max_s``, with "equal jitter":
        uniformly in [cap/2, cap] of the step, never under ``backoff_min_s``."""
        step = min(self._backoff_max_s, self._backoff_min_s * (2 ** min(failures, 30)))
        return max(self._backoff_min_s, self._rng.uniform(step / 2, step))

    def _log_failure(self, exc: BaseException, failures: int) -> None:
        fields: dict[str, Any] = {"node_id": self._node_id, "attempt": failures + 1}
        if isinstance(exc, InvalidStatus):
            status = exc.response.status_code
            self._log.error("agent.connect_rejected", status=status, auth=status in (401, 403), **fields)
        elif isinstance(exc, RegistrationError):
            self._log.error("agent.register_refused", code=exc.code, message=exc.message, **fields)
        elif isinstance(exc, OSError | InvalidHandshake | TimeoutError | ConnectionClosed | ConnectionLost):
            self._log.warning(
                "agent.connection_failed", error_type=type(exc).__name__, error=str(exc), **fields
            )
        else:
            self._log.error("agent.connection_error", error_type=type(exc).__name__, exc_info=exc, **fields)

    @staticmethod
    def _close_text(ws: ClientConnection) -> str:
        return f"code {ws.close_code}, reason {ws.close_reason!r}"

    # --- frames ---------------------------------------------------------------------------------

    def _languages(self) -> LanguageCapabilities:
        srcs = list(dict.fromkeys(s for s, _ in self._pairs))
        tgts = list(dict.fromkeys(t for _, t in self._pairs))
        return LanguageCapabilities(asr_languages=srcs, semantic_languages=tgts, tts_languages=list(tgts))

    @staticmethod
    def _capabilities() -> list[CapabilityByType]:
        return [CapabilityByType(type=kind, ready=True) for kind in SERVICE_TYPES]

    def _register_frame(self) -> str:
        msg = NodeRegister(
            node_id=self._node_id,
            version=self._version,
            platform=self._platform,
            hardware=Hardware(cpu_cores=os.cpu_count(), memory_gb=_memory_gb()),
            capability_by_type=self._capabilities(),
            accept_public_jobs=True,
            language_capabilities=self._languages(),
            max_concurrency=self._slots,
            language_pairs=list(self._pairs),
        )
        frame = msgspec.to_builtins(msg)
        # NodeRegister omits defaults; the existing scheduler's peers read these keys, so send them.
        for key, empty in (
            ("node_id", None),
            ("installed_models", []),
            ("installed_services", []),
            ("features_supported", {}),
        ):
            frame.setdefault(key, empty)
        return msgspec.json.encode(frame).decode()

    def _heartbeat_frame(self) -> str:
        return encode(
            NodeHeartbeat(
                node_id=self._node_id or "",
                timestamp=wall_ms(),
                resource_usage=ResourceUsage(cpu_percent=0.0, mem_percent=0.0, running_jobs=len(self._jobs)),
                installed_services=[],
                capability_by_type=self._capabilities(),
                draining=self._draining,
            )
        )

    def _result_frame(self, assign: JobAssign, result: EngineResult) -> str:
        fields = result.to_job_result_fields()
        error = fields.pop("error", None)
        return encode(
            JobResult(
                job_id=assign.job_id,
                attempt_id=assign.attempt_id,
                node_id=self._node_id or "",
                session_id=assign.session_id,
                utterance_index=assign.utterance_index,
                trace_id=assign.trace_id,
                error=ErrorInfo(**error) if error is not None else None,
                **fields,
            )
        )
