"""NodeAgent against a tiny fake scheduler on a real local socket.

The fake records every frame and lets a test wait for a frame matching a predicate (with a timeout),
so nothing here sleeps to synchronise. Slow jobs use ``GatedEngine``, which holds chosen jobs until
the test opens their gate, so "a job is running" is a fact, not a timing guess.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import structlog
import typer
from websockets.asyncio.server import ServerConnection, serve

from dragoman.agent.engines import EngineJob, EngineResult, SimulatedEngine
from dragoman.agent.runner import NodeAgent
from dragoman.cli.node import build_engine, parse_pairs

TIMEOUT = 5.0
PCM_100MS = base64.b64encode(b"\x00\x01" * 1600).decode()

Frame = dict[str, Any]


class FakeScheduler:
    """Accepts node connections, acks registrations and records what nodes send."""

    def __init__(self, *, node_id: str = "node-abc", heartbeat_interval_ms: int | None = 60_000) -> None:
        self.node_id = node_id
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.frames: list[Frame] = []  # every frame from every connection, in order
        self.connections: list[ServerConnection] = []
        self.headers: list[dict[str, str]] = []
        self.closed_by_peer = asyncio.Event()
        self._changed = asyncio.Condition()
        self.port = 0
        self._server: Any = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/node"

    @property
    def ws(self) -> ServerConnection:
        return self.connections[-1]

    async def start(self) -> None:
        self._server = await serve(self._handler, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()

    async def _record(self, frame: Frame) -> None:
        async with self._changed:
            self.frames.append(frame)
            self._changed.notify_all()

    async def _handler(self, ws: ServerConnection) -> None:
        self.headers.append(dict(ws.request.headers))
        self.connections.append(ws)
        async with self._changed:
            self._changed.notify_all()
        async for raw in ws:
            frame = json.loads(raw)
            frame["_conn"] = len(self.connections)
            await self._record(frame)
            if frame["type"] == "node_register":
                ack: Frame = {
                    "type": "node_register_ack",
                    "node_id": frame.get("node_id") or self.node_id,
                    "message": "ok",
                    "status": "ready",
                }
                if self.heartbeat_interval_ms is not None:
                    ack["heartbeat_interval_ms"] = self.heartbeat_interval_ms
                await ws.send(json.dumps(ack))
        self.closed_by_peer.set()

    async def send(self, frame: Frame) -> None:
        await self.ws.send(json.dumps(frame))

    async def wait_for(
        self, predicate: Callable[[Frame], bool], *, after: int = 0, within: float = TIMEOUT
    ) -> Frame:
        """The first recorded frame (from index ``after``) matching ``predicate``."""

        def found() -> Frame | None:
            return next((f for f in self.frames[after:] if predicate(f)), None)

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: found() is not None), within)
        result = found()
        assert result is not None
        return result

    async def wait_type(self, kind: str, *, after: int = 0, within: float = TIMEOUT, **match: Any) -> Frame:
        return await self.wait_for(
            lambda f: f["type"] == kind and all(f.get(k) == v for k, v in match.items()),
            after=after,
            within=within,
        )

    def of_type(self, kind: str, **match: Any) -> list[Frame]:
        return [f for f in self.frames if f["type"] == kind and all(f.get(k) == v for k, v in match.items())]


class GatedEngine:
    """Runs every job on a very fast SimulatedEngine, but holds jobs listed in ``hold`` until
    ``release(job_id)``. Records starts and cancellations as events."""

    name = "gated"

    def __init__(self, hold: set[str] | None = None) -> None:
        self.hold = set(hold or ())
        self.started: dict[str, asyncio.Event] = {}
        self.cancelled: dict[str, asyncio.Event] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self._inner = SimulatedEngine(speed=1e6)

    def _event(self, table: dict[str, asyncio.Event], job_id: str) -> asyncio.Event:
        return table.setdefault(job_id, asyncio.Event())

    async def wait_started(self, job_id: str) -> None:
        await asyncio.wait_for(self._event(self.started, job_id).wait(), TIMEOUT)

    async def wait_cancelled(self, job_id: str) -> None:
        await asyncio.wait_for(self._event(self.cancelled, job_id).wait(), TIMEOUT)

    def release(self, job_id: str) -> None:
        self._event(self.gates, job_id).set()

    async def run(self, job: EngineJob) -> EngineResult:
        self._event(self.started, job.job_id).set()
        try:
            if job.job_id in self.hold:
                await self._event(self.gates, job.job_id).wait()
        except asyncio.CancelledError:
            self._event(self.cancelled, job.job_id).set()
            raise
        return await self._inner.run(job)

    async def aclose(self) -> None:
        pass


class LogWatch:
    """A structlog processor that records events (and drops them) and lets a test wait for one."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def __call__(self, _logger: Any, method: str, event: dict[str, Any]) -> Any:
        self.entries.append({**event, "log_level": method})
        self._changed.set()
        raise structlog.DropEvent

    def count(self, name: str) -> int:
        return sum(e["event"] == name for e in self.entries)

    async def wait(self, predicate: Callable[[], bool], within: float = TIMEOUT) -> None:
        async def until() -> None:
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(until(), within)


@contextlib.contextmanager
def watch_logs() -> Iterator[LogWatch]:
    """Like ``structlog.testing.capture_logs`` (edits the processor list in place, so loggers bound
    earlier are covered too), but awaitable."""
    watch = LogWatch()
    processors = structlog.get_config()["processors"]
    saved = list(processors)
    processors.clear()
    processors.append(watch)
    try:
        yield watch
    finally:
        processors.clear()
        processors.extend(saved)


def assign(job_id: str, attempt_id: int = 1, **overrides: Any) -> Frame:
    frame: Frame = {
        "type": "job_assign",
        "job_id": job_id,
        "attempt_id": attempt_id,
        "session_id": "s1",
        "utterance_index": 3,
        "src_lang": "zh",
        "tgt_lang": "en",
        "pipeline": {
            "use_asr": True,
            "use_nmt": True,
            "use_tts": True,
            "use_semantic": False,
            "use_tone": False,
        },
        "audio": PCM_100MS,
        "audio_format": "pcm16",
        "sample_rate": 16000,
        "trace_id": f"t-{job_id}",
    }
    frame.update(overrides)
    return frame


@pytest.fixture
async def scheduler() -> AsyncIterator[FakeScheduler]:
    fake = FakeScheduler()
    await fake.start()
    yield fake
    await fake.close()


class Harness:
    def __init__(self, scheduler: FakeScheduler) -> None:
        self.scheduler = scheduler
        self.agents: list[tuple[NodeAgent, asyncio.Task[None]]] = []

    def start(self, **options: Any) -> tuple[NodeAgent, asyncio.Task[None]]:
        options.setdefault("pairs", [("zh", "en"), ("en", "zh")])
        options.setdefault("slots", 4)
        options.setdefault("engine", GatedEngine())
        options.setdefault("backoff_min_s", 0.01)
        options.setdefault("backoff_max_s", 0.05)
        url = options.pop("url", self.scheduler.url)
        agent = NodeAgent(url, **options)
        task = asyncio.create_task(agent.run())
        self.agents.append((agent, task))
        return agent, task


@pytest.fixture
async def harness(scheduler: FakeScheduler) -> AsyncIterator[Harness]:
    h = Harness(scheduler)
    yield h
    for agent, task in h.agents:
        await asyncio.wait_for(agent.stop(), TIMEOUT)
        await asyncio.wait_for(task, TIMEOUT)


# --- registration and heartbeats ----------------------------------------------------------------


async def test_registers_with_documented_fields_and_adopts_node_id(
    scheduler: FakeScheduler, harness: Harness
) -> None:
    agent, _ = harness.start(slots=3, token="secret", version="test/1", platform="testos")
    reg = await scheduler.wait_type("node_register")
    assert reg["node_id"] is None
    assert reg["version"] == "test/1" and reg["platform"] == "testos"
    assert set(reg["hardware"]) >= {"cpu_cores", "memory_gb"}
    assert reg["installed_models"] == [] and reg["features_supported"] == {}
    assert reg["capability_by_type"] == [
        {"type": kind, "ready": True, "reason": None} for kind in ("asr", "nmt", "tts")
    ]
    assert reg["accept_public_jobs"] is True
    assert reg["max_concurrency"] == 3
    assert reg["language_pairs"] == [["zh", "en"], ["en", "zh"]]
    caps = reg["language_capabilities"]
    assert caps["asr_languages"] == ["zh", "en"]
    assert caps["semantic_languages"] == ["en", "zh"] and caps["tts_languages"] == ["en", "zh"]
    assert scheduler.headers[0].get("authorization") == "Bearer secret"

    await scheduler.send({"type": "error", "code": "X", "message": "unsolicited"})  # logged, not fatal
    await scheduler.send({"type": "node_heartbeat_ack"})  # unknown type: logged, not fatal
    await scheduler.send(assign("j1"))
    result = await scheduler.wait_type("job_result", job_id="j1")
    assert result["node_id"] == "node-abc" == agent.node_id


async def test_heartbeat_interval_from_ack_and_running_jobs(
    scheduler: FakeScheduler, harness: Harness
) -> None:
    scheduler.heartbeat_interval_ms = 20
    engine = GatedEngine(hold={"slow"})
    agent, _ = harness.start(engine=engine)
    hb = await scheduler.wait_type("node_heartbeat")
    assert hb["node_id"] == "node-abc"
    assert isinstance(hb["timestamp"], int) and hb["timestamp"] > 1_600_000_000_000
    assert hb["resource_usage"]["running_jobs"] == 0
    assert hb["installed_services"] == [] and len(hb["capability_by_type"]) == 3
    assert "draining" not in hb

    await scheduler.send(assign("slow"))
    await engine.wait_started("slow")
    assert agent.running_jobs == 1
    mark = len(scheduler.frames)
    busy = await scheduler.wait_for(lambda f: f["type"] == "node_heartbeat", after=mark)
    assert busy["resource_usage"]["running_jobs"] == 1
    engine.release("slow")
    await scheduler.wait_type("job_result", job_id="slow")


# --- jobs ---------------------------------------------------------------------------------------


async def test_job_assign_runs_and_sends_started_then_result(
    scheduler: FakeScheduler, harness: Harness
) -> None:
    agent, _ = harness.start(engine=SimulatedEngine(speed=1e6))
    await scheduler.wait_type("node_register")
    await scheduler.send(assign("j1", attempt_id=2))
    result = await scheduler.wait_type("job_result", job_id="j1")
    started = scheduler.of_type("job_started", job_id="j1")
    assert started and scheduler.frames.index(started[0]) < scheduler.frames.index(result)
    assert started[0] | {"_conn": 0} == {
        "type": "job_started",
        "job_id": "j1",
        "attempt_id": 2,
        "node_id": "node-abc",
        "session_id": "s1",
        "trace_id": "t-j1",
        "_conn": 0,
    }
    assert result["attempt_id"] == 2 and result["node_id"] == "node-abc"
    assert result["session_id"] == "s1" and result["utterance_index"] == 3 and result["trace_id"] == "t-j1"
    assert result["success"] is True and "error" not in result
    assert result["text_asr"] == "[sim zh] utterance 3 (100 ms)"
    assert result["text_translated"] == "[sim zh->en] utterance 3 (100 ms)"
    assert result["tts_format"] == "wav" and base64.b64decode(result["tts_audio"])[:4] == b"RIFF"
    assert isinstance(result["processing_time_ms"], int) and result["extra"]["simulated"] is True
    assert agent.completed == 1 and agent.running_jobs == 0


async def test_bad_audio_is_a_failed_result_not_a_crash(scheduler: FakeScheduler, harness: Harness) -> None:
    harness.start()
    await scheduler.wait_type("node_register")
    await scheduler.send(assign("bad", audio="!!not base64!!"))
    result = await scheduler.wait_type("job_result", job_id="bad")
    assert result["success"] is False and result["error"]["code"] == "PROCESSING_ERROR"
    # an assign the wire decoder rejects (sample_rate out of range) is failed at once too
    await scheduler.send(assign("rate", sample_rate=96_000))
    result = await scheduler.wait_type("job_result", job_id="rate")
    assert result["success"] is False and "sample_rate" in result["error"]["message"]
    await scheduler.send(assign("ok"))
    assert (await scheduler.wait_type("job_result", job_id="ok"))["success"] is True


async def test_job_cancel_cancels_running_job_and_sends_nothing(
    scheduler: FakeScheduler, harness: Harness
) -> None:
    engine = GatedEngine(hold={"slow"})
    agent, _ = harness.start(engine=engine)
    await scheduler.wait_type("node_register")
    await scheduler.send(assign("slow"))
    await engine.wait_started("slow")
    await scheduler.send({"type": "job_cancel", "job_id": "slow", "reason": "lease_expired"})
    await engine.wait_cancelled("slow")
    # frames on one socket are ordered: once the next job's result is in, a result for "slow"
    # would have been too
    await scheduler.send(assign("next"))
    await scheduler.wait_type("job_result", job_id="next")
    assert scheduler.of_type("job_result", job_id="slow") == []
    assert agent.running_jobs == 0 and agent.cancelled == 1


async def test_concurrency_cap_refuses_with_node_overloaded(
    scheduler: FakeScheduler, harness: Harness
) -> None:
    engine = GatedEngine(hold={"a"})
    agent, _ = harness.start(engine=engine, slots=1)
    await scheduler.wait_type("node_register")
    await scheduler.send(assign("a"))
    await engine.wait_started("a")
    await scheduler.send(assign("b"))
    refused = await scheduler.wait_type("job_result", job_id="b")
    assert refused["success"] is False and refused["error"]["code"] == "NODE_OVERLOADED"
    assert refused["attempt_id"] == 1 and refused["session_id"] == "s1"
    assert "b" not in engine.started
    engine.release("a")
    done = await scheduler.wait_type("job_result", job_id="a")
    assert done["success"] is True and agent.refused == 1


async def test_duplicate_assign_ignored_new_attempt_accepted(
    scheduler: FakeScheduler, harness: Harness
) -> None:
    engine = GatedEngine(hold={"j"})
    harness.start(engine=engine)
    await scheduler.wait_type("node_register")
    await scheduler.send(assign("j", attempt_id=1))
    await engine.wait_started("j")
    await scheduler.send(assign("j", attempt_id=1))  # duplicate: ignored
    await scheduler.send(assign("j", attempt_id=2))  # reassignment: replaces attempt 1
    await engine.wait_cancelled("j")
    engine.release("j")
    await scheduler.wait_type("job_result", job_id="j", attempt_id=2)
    await scheduler.send(assign("j", attempt_id=2))  # duplicate of the finished attempt
    await scheduler.send(assign("other"))
    await scheduler.wait_type("job_result", job_id="other")
    assert [f["attempt_id"] for f in scheduler.of_type("job_result", job_id="j")] == [2]


# --- reconnect ----------------------------------------------------------------------------------


async def test_reconnect_reuses_node_id_and_delivers_results_from_outbox(
    scheduler: FakeScheduler, harness: Harness
) -> None:
    engine = GatedEngine(hold={"slow"})
    agent, _ = harness.start(engine=engine)
    await scheduler.wait_type("node_register")
    await scheduler.send(assign("slow"))
    await engine.wait_started("slow")
    with watch_logs() as logs:
        await scheduler.ws.close(1011, "test restart")
        second = await scheduler.wait_for(lambda f: f["type"] == "node_register" and f["_conn"] == 2)
    assert second["node_id"] == "node-abc" == agent.node_id
    assert logs.count("agent.connection_failed") == 1 and logs.count("agent.reconnect_scheduled") == 1
    engine.release("slow")
    result = await scheduler.wait_type("job_result", job_id="slow")
    assert result["_conn"] == 2 and result["success"] is True and result["node_id"] == "node-abc"


async def test_connect_failures_are_logged_and_stop_interrupts_backoff(scheduler: FakeScheduler) -> None:
    dead_port = scheduler.port
    await scheduler.close()  # nothing listens there any more
    agent = NodeAgent(
        f"ws://127.0.0.1:{dead_port}/ws/node",
        pairs=[("zh", "en")],
        slots=1,
        engine=GatedEngine(),
        backoff_min_s=20.0,
        backoff_max_s=30.0,
    )
    with watch_logs() as logs:
        task = asyncio.create_task(agent.run())
        await logs.wait(lambda: logs.count("agent.reconnect_scheduled") >= 1)
        await asyncio.wait_for(agent.stop(), 1.0)  # cuts the 20 s backoff short
        await asyncio.wait_for(task, 1.0)
    (failure,) = [e for e in logs.entries if e["event"] == "agent.connection_failed"]
    assert failure["log_level"] == "warning" and failure["error"] and failure["attempt"] == 1
    (scheduled,) = [e for e in logs.entries if e["event"] == "agent.reconnect_scheduled"]
    assert scheduled["delay_s"] == 20.0


def test_backoff_is_exponential_jittered_and_capped() -> None:
    agent = NodeAgent(
        "ws://127.0.0.1:1/ws/node", pairs=[("zh", "en")], slots=1, engine=GatedEngine(), rng=random.Random(7)
    )
    for failures in range(12):
        step = min(10.0, 0.2 * 2**failures)
        delays = [agent._backoff_delay(failures) for _ in range(50)]
        assert all(max(0.2, step / 2) <= d <= step for d in delays)
        if failures >= 2:
            assert len(set(delays)) > 1  # jittered
    assert agent._backoff_delay(10_000) <= 10.0


# --- drain --------------------------------------------------------------------------------------


async def test_drain_announces_refuses_new_jobs_finishes_running_then_returns(
    scheduler: FakeScheduler, harness: Harness
) -> None:
    engine = GatedEngine(hold={"slow"})
    agent, task = harness.start(engine=engine)  # heartbeat interval 60 s: only the drain sends one now
    await scheduler.wait_type("node_register")
    await scheduler.send(assign("slow"))
    await engine.wait_started("slow")
    agent.request_drain()
    hb = await scheduler.wait_type("node_heartbeat", draining=True)
    assert hb["resource_usage"]["running_jobs"] == 1
    await scheduler.send(assign("late"))
    refused = await scheduler.wait_type("job_result", job_id="late")
    assert refused["success"] is False and refused["error"] == {
        "code": "NODE_OVERLOADED",
        "message": "draining",
        "details": None,
    }
    assert not task.done()
    engine.release("slow")
    result = await scheduler.wait_type("job_result", job_id="slow")
    assert result["success"] is True
    await asyncio.wait_for(task, TIMEOUT)
    await asyncio.wait_for(scheduler.closed_by_peer.wait(), TIMEOUT)
    assert scheduler.ws.close_code == 1000 and agent.completed == 1


async def test_drain_when_idle_returns_at_once(scheduler: FakeScheduler, harness: Harness) -> None:
    agent, task = harness.start()
    await scheduler.wait_type("node_register")
    await scheduler.send(assign("j"))
    await scheduler.wait_type("job_result", job_id="j")
    agent.request_drain()
    await asyncio.wait_for(task, TIMEOUT)
    assert scheduler.of_type("node_heartbeat", draining=True)


async def test_drain_timeout_stops_hard(scheduler: FakeScheduler, harness: Harness) -> None:
    engine = GatedEngine(hold={"stuck"})
    agent, task = harness.start(engine=engine, drain_timeout_s=0.05)
    await scheduler.wait_type("node_register")
    await scheduler.send(assign("stuck"))
    await engine.wait_started("stuck")
    agent.request_drain()
    await asyncio.wait_for(task, TIMEOUT)
    await engine.wait_cancelled("stuck")
    assert scheduler.of_type("job_result", job_id="stuck") == []


# --- CLI ----------------------------------------------------------------------------------------


def test_parse_pairs() -> None:
    assert parse_pairs("zh:en,en:zh") == [("zh", "en"), ("en", "zh")]
    assert parse_pairs(" zh:en , zh:en,ja:en ") == [("zh", "en"), ("ja", "en")]
    for bad in ("", "zh", "zh-en", ":en", "zh:", "zh:en:fr", "z h:en", "auto:en", "x" * 17 + ":en"):
        with pytest.raises(typer.BadParameter):
            parse_pairs(bad)


def test_build_engine_rejects_bad_options() -> None:
    with pytest.raises(typer.BadParameter):
        build_engine("gpu")
    with pytest.raises(typer.BadParameter):
        build_engine("simulated", sim_speed=0)
    assert build_engine("Simulated", sim_speed=5).name == "simulated"


def test_two_way_adds_reverse_pairs() -> None:
    agent = NodeAgent(
        "ws://127.0.0.1:1/ws/node", pairs=[("zh", "en")], slots=1, engine=GatedEngine(), two_way=True
    )
    assert agent.pairs == [("zh", "en"), ("en", "zh")]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_cli_drains_on_sigterm_and_exits_zero(scheduler: FakeScheduler) -> None:
    code = (
        "import typer; from dragoman.cli.node import node_command; "
        "app = typer.Typer(); app.command()(node_command); app()"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        "--scheduler",
        scheduler.url,
        "--pairs",
        "zh:en",
        "--slots",
        "2",
        "--sim-speed",
        "1000000",
        "--node-id",
        "cli-node",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        reg = await scheduler.wait_type("node_register", within=30)
        assert reg["node_id"] == "cli-node" and reg["max_concurrency"] == 2
        await scheduler.send(assign("j"))
        await scheduler.wait_type("job_result", job_id="j")
        proc.send_signal(signal.SIGTERM)
        await scheduler.wait_type("node_heartbeat", draining=True, within=30)
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert "cli-node" in stdout.decode() and "ready" in stdout.decode()
