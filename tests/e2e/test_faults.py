"""The loss paths and security holes of "Nothing lost under faults", each against real processes:
each test does the fault and checks the promise (every utterance and target gets exactly one outcome,
every slot comes back, only the holder speaks for a job or a node)."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections.abc import Iterator

import httpx
import pytest
import redis.asyncio as aioredis

from dragoman.client import SessionClient
from dragoman.config import Settings
from dragoman.core.audio import pcm16_silence
from dragoman.embedded import EmbeddedServer
from dragoman.wire import AsrPartial, ErrorMessage, TranslationResult
from tests.e2e.peers import ScriptedNode
from tests.e2e.test_node_plane import one_utterance, slots_used, ws
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e
LONG_LEASE = {"DRAGOMAN_JOB_TIMEOUT_MS": "60000"}  # only the fix under test can recover the job in time


def translations(client: SessionClient) -> list[TranslationResult]:
    return [m for m in client.all if isinstance(m, TranslationResult)]


async def nodes_view(base: str) -> list[dict]:
    async with httpx.AsyncClient() as c:
        return (await c.get(base + "/api/v1/nodes")).json()["nodes"]


# --- loss path 3: a dead scheduler process's nodes -----------------------------------------------------------


async def test_jobs_sent_through_a_dead_process_reach_the_node_when_it_registers_again(scheduler) -> None:
    """The process holding a node dies; a job assigned meanwhile (through the dead process's inbox)
    is sent to the node again when it registers on a surviving process: served long before its lease."""
    a, b = scheduler(**LONG_LEASE), scheduler(**LONG_LEASE)
    node = await ScriptedNode.connect(ws(a), node_id="wanderer", slots=1)
    beat = asyncio.create_task(node.keep_alive())
    async with SessionClient.connect(ws(b) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        a.proc.kill(signal.SIGKILL)
        beat.cancel()
        await node.close()
        await one_utterance(client)  # B assigns it to "wanderer" through A's inbox: nobody reads it

        async def registered() -> ScriptedNode | None:
            try:  # the node comes back on B once A's registration has lapsed (refused as in use before)
                return await ScriptedNode.connect(ws(b), node_id="wanderer", slots=1)
            except (AssertionError, OSError):
                return None

        back = await wait_for(registered, timeout=15, interval=0.2)
        assign = await back.expect("job_assign", timeout=5)
        await back.result(assign, "again")
        [result] = await client.results(1, timeout=10)
        assert isinstance(result, TranslationResult) and result.text_translated == "en:again"
        await client.close()
    assert await slots_used(b) == 0


# --- loss path 4: a dead scheduler process's sessions ------------------------------------------------------


async def test_a_client_resumes_its_session_on_another_process_and_gets_everything_owed(scheduler) -> None:
    """The process holding the session dies with jobs in flight and audio not yet cut; the client
    reconnects to the other process with resume_session_id, re-sends what was not yet made into jobs,
    and gets one outcome per utterance, none twice."""
    a, b = scheduler(), scheduler()
    node = await ScriptedNode.connect(ws(a), node_id="steady", slots=4)
    beat = asyncio.create_task(node.keep_alive())
    async with SessionClient.connect([ws(b) + "/ws/session", ws(a) + "/ws/session"], src_lang="zh",
                                     tgt_langs=["en"]) as client:
        for _ in range(2):
            await one_utterance(client)
        first = [await node.expect("job_assign") for _ in range(2)]
        await node.result(first[0], "zero")
        await client.results(1)
        b.proc.kill(signal.SIGKILL)  # utterance 1's job runs on; its outcome has nobody to go to
        await node.result(first[1], "one")
        await client.send_audio(pcm16_silence(300))  # sent into the dead socket, or queued meanwhile
        await client.send_audio(pcm16_silence(200), is_final=True)
        later = await node.expect("job_assign", timeout=20)  # utterance 2, cut on A from the re-sent audio
        assert later["utterance_index"] == 2
        assert len(base64.b64decode(later["audio"])) == 2 * 16 * 500  # all of the re-sent audio, once
        await node.result(later, "two")
        results = await client.results(2, timeout=20)
        assert [(r.utterance_index, r.text_translated) for r in results] == [(1, "en:one"), (2, "en:two")]
        assert client.resumes == 1
        await client.close()
    beat.cancel()
    assert [r.utterance_index for r in translations(client)] == [0, 1, 2]
    assert await slots_used(a) == 0


async def test_a_session_nobody_resumes_is_abandoned_after_its_grace(scheduler, redis_url: str) -> None:
    """A client that goes away for good: its queued jobs are cancelled when the grace period ends
    and the slots they would have taken stay free."""
    base = scheduler(DRAGOMAN_SESSION_GRACE_MS="1000", DRAGOMAN_PENDING_TIMEOUT_MS="60000")
    node = await ScriptedNode.connect(ws(base), node_id="busy", slots=1)
    beat = asyncio.create_task(node.keep_alive())
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"],
                                     resume=False) as client:
        for _ in range(3):
            await one_utterance(client)
        running = await node.expect("job_assign")
    r = aioredis.Redis.from_url(redis_url)
    try:
        async def abandoned() -> bool:
            return not await r.keys("*:sess:*")

        await wait_for(abandoned, timeout=10)
        cancel = await node.expect("job_cancel", timeout=5)
        assert cancel["job_id"] == running["job_id"]
        assert await slots_used(base) == 0
        assert not node.frames("job_assign")[1:], "a queued job of the gone session was run for nobody"
    finally:
        beat.cancel()
        await r.aclose()


# --- loss path 5: Redis restarts without persistence --------------------------------------------------------


@pytest.fixture
def own_redis() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as server:
        yield server


async def test_after_redis_lost_its_data_every_owed_job_is_recovered(scheduler, own_redis: EmbeddedServer) -> None:
    """Redis restarts empty while a job runs and no later utterance comes: the scheduler sees the data
    loss, registers its node again within a second, and the session dispatches the lost job again."""
    base = scheduler(DRAGOMAN_REDIS_URL=own_redis.url, DRAGOMAN_WARMUP_MS="5000", **LONG_LEASE)
    node = await ScriptedNode.connect(ws(base), node_id="survivor", slots=2)  # no heartbeats at all
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        lost = await node.expect("job_assign")
        port = own_redis.port
        own_redis.stop()
        own_redis.port = port
        own_redis.start()  # same address, no data
        again = await node.expect("job_assign", timeout=15)
        assert again["job_id"] != lost["job_id"] and again["utterance_index"] == 0
        await node.result(lost, "stale")  # the lost job's late result is never delivered
        await node.result(again, "recovered")
        [result] = await client.results(1, timeout=10)
        assert result.text_translated == "en:recovered"
        await client.close()
    assert [n["id"] for n in await nodes_view(base)] == ["survivor"]
    assert len(translations(client)) == 1


# --- loss path 6: Redis stalled ------------------------------------------------------------------------------


async def test_a_result_during_a_redis_stall_is_recorded_when_redis_comes_back(scheduler, own_redis) -> None:
    base = scheduler(DRAGOMAN_REDIS_URL=own_redis.url, **LONG_LEASE)
    node = await ScriptedNode.connect(ws(base), node_id="patient", slots=1)
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        assign = await node.expect("job_assign")
        own_redis.proc.send_signal(signal.SIGSTOP)  # longer than the scheduler's socket timeout
        try:
            await node.result(assign, "late")
            await asyncio.sleep(6)  # the stall itself (the fault's duration, not a wait for an event)
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        [result] = await client.results(1, timeout=20)
        assert result.text_translated == "en:late"
        assert not node.frames("error"), node.frames("error")
        await client.close()
    assert await slots_used(base) == 0


# --- loss path 8: poison numbers ----------------------------------------------------------------------------


async def test_an_utterance_index_lua_cannot_keep_exact_is_refused_and_nothing_breaks(scheduler) -> None:
    from dragoman.wire import Utterance

    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="exact", slots=1)
    beat = asyncio.create_task(node.keep_alive())
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await client.transport.send(json.dumps({"type": "utterance", "utterance_index": 100000000000000,
                                                "src_lang": "zh", "tgt_lang": "en", "audio": "AAAA",
                                                "audio_format": "pcm16"}))
        err = await client.wait_for((ErrorMessage,))
        assert err.code == "INVALID_MESSAGE" and "utterance_index" in err.message
        await client.send(Utterance(utterance_index=7, src_lang="zh", tgt_lang="en", audio="AAAA",
                                    audio_format="pcm16"))
        await node.result(await node.expect("job_assign"), "fine")
        [result] = await client.results(1)
        assert result.utterance_index == 7
        await client.close()
    beat.cancel()
    assert await slots_used(base) == 0


# --- loss path 9: a hung node at the shipped defaults ---------------------------------------------------------


async def test_a_hung_node_loses_its_job_within_five_seconds(scheduler, spawn) -> None:
    """SIGSTOP of a real node agent holding a job: its socket stops answering pings, and the job goes to
    another node within 5 s, long before its 60 s lease; the client gets its translation."""
    shipped = {name: str(getattr(Settings(), name.removeprefix("DRAGOMAN_").lower())) for name in (
        "DRAGOMAN_WS_PING_INTERVAL_MS", "DRAGOMAN_WS_PING_TIMEOUT_MS", "DRAGOMAN_HEARTBEAT_INTERVAL_MS",
        "DRAGOMAN_NODE_TTL_MS", "DRAGOMAN_JOB_TIMEOUT_MS")}
    base = scheduler(**shipped)  # only the pings can notice it in time: heartbeats allow 45 s, the lease 60 s
    agent = spawn("node", "--scheduler", ws(base) + "/ws/node", "--pairs", "zh:en", "--slots", "1",
                  "--node-id", "frozen", "--engine", "simulated", "--sim-speed", "0.01", name="frozen")
    await wait_for(lambda: _has_node(base, "frozen"), timeout=20)
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client, ms=1000)  # 100 s of simulated work at speed 0.01

        async def holds_a_job() -> bool:
            return any(n["id"] == "frozen" and n.get("used") == "1" for n in await nodes_view(base))

        await wait_for(holds_a_job, timeout=10)
        agent.kill(signal.SIGSTOP)
        try:
            helper = await ScriptedNode.connect(ws(base), node_id="helper", slots=1)
            moved = await helper.expect("job_assign", timeout=8)  # ping interval + timeout, not the lease
            assert moved["attempt_id"] == 2
            await helper.result(moved, "rescued")
            [result] = await client.results(1, timeout=5)
            assert result.text_translated == "en:rescued"
        finally:
            agent.kill(signal.SIGKILL)  # (a stopped agent would drain its 100 s job on SIGTERM)
        await client.close()


async def _has_node(base: str, node_id: str) -> bool:
    try:
        return any(n["id"] == node_id and n["state"] == "ready" for n in await nodes_view(base))
    except httpx.HTTPError:
        return False


# --- loss path 10: heartbeat re-pooling is validated ------------------------------------------------------------


async def test_a_heartbeat_with_thousands_of_languages_is_refused_and_changes_nothing(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="babel", register={
        "type": "node_register", "node_id": "babel", "version": "x", "platform": "linux",
        "language_capabilities": {"asr_languages": ["zh"], "semantic_languages": ["en"]}})
    langs = [f"l{i}" for i in range(3000)]
    await node.heartbeat(language_capabilities={"asr_languages": langs, "semantic_languages": langs[:2]})
    err = await node.expect("error")
    assert err["code"] == "INVALID_MESSAGE" and "allowed per node" in err["message"]
    async with httpx.AsyncClient() as c:
        pools = (await c.get(base + "/api/v1/pools")).json()["pools"]
    assert [(p["pool"], p["nodes"]) for p in pools] == [("zh>en", ["babel"])]


# --- security ---------------------------------------------------------------------------------------------------


async def test_only_the_jobs_holder_may_send_partials_for_it(scheduler) -> None:
    base = scheduler()
    holder = await ScriptedNode.connect(ws(base), node_id="holder", slots=1)
    intruder = await ScriptedNode.connect(ws(base), node_id="intruder", pairs=(("aa", "bb"),))
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        assign = await holder.expect("job_assign")
        partial = {"type": "asr_partial", "job_id": assign["job_id"], "session_id": client.session_id,
                   "utterance_index": 0, "is_final": False}
        await intruder.send(partial | {"node_id": "intruder", "text": "FORGED"})
        assert (await intruder.expect("error"))["code"] == "INVALID_MESSAGE"
        await holder.send(partial | {"node_id": "holder", "text": "real"})
        got = await client.wait_for((AsrPartial,))
        assert got.text == "real"
        await holder.result(assign, "done")
        await client.results(1)
        assert [m.text for m in client.all if isinstance(m, AsrPartial)] == ["real"]
        await client.close()


async def answered_by(base: str, node: ScriptedNode, text: str) -> None:
    """One utterance of a new session, answered by ``node`` with ``text``, reaches the client."""
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        await node.result(await node.expect("job_assign"), text)
        [result] = await client.results(1)
        assert result.text_translated == f"en:{text}"
        await client.close()


async def test_a_live_node_id_cannot_be_taken_over(scheduler) -> None:
    base = scheduler()
    real = await ScriptedNode.connect(ws(base), node_id="victim", slots=1)
    beat = asyncio.create_task(real.keep_alive())
    with pytest.raises(AssertionError, match="in use"):
        await ScriptedNode.connect(ws(base), node_id="victim", slots=1)
    await answered_by(base, real, "genuine")
    beat.cancel()


async def test_a_node_whose_idle_connection_hung_gets_its_id_back_within_seconds(scheduler) -> None:
    """An idle socket is pinged only every ws_idle_ping_interval_ms (20 s); a node that registers again
    while its old connection hangs is refused, and that refusal pings the old connection at once: it
    is gone within the ping timeout, and the node's next try succeeds."""
    base = scheduler(DRAGOMAN_WS_PING_INTERVAL_MS="2000", DRAGOMAN_WS_PING_TIMEOUT_MS="2500",
                     DRAGOMAN_WS_IDLE_PING_INTERVAL_MS="60000",  # only the pings can notice it in time:
                     DRAGOMAN_HEARTBEAT_INTERVAL_MS="20000", DRAGOMAN_NODE_TTL_MS="60000")  # (not its deadline)
    old = await ScriptedNode.connect(ws(base), node_id="phoenix", slots=1)
    old.ws.transport.pause_reading()  # hung: it never reads the pings, so never answers them
    with pytest.raises(AssertionError, match="in use"):
        await ScriptedNode.connect(ws(base), node_id="phoenix", slots=1)
    started = asyncio.get_running_loop().time()

    async def registered_again() -> ScriptedNode | None:
        try:
            return await ScriptedNode.connect(ws(base), node_id="phoenix", slots=1)
        except AssertionError:  # still in use
            return None

    node = await wait_for(registered_again, timeout=15, interval=0.5)
    assert asyncio.get_running_loop().time() - started < 10  # the ping timeout, not the 60 s idle interval
    beat = asyncio.create_task(node.keep_alive())
    await answered_by(base, node, "reborn")
    beat.cancel()


async def test_with_credentials_configured_the_operator_surface_needs_one_too(scheduler) -> None:
    base = scheduler(DRAGOMAN_API_KEYS="client-key", DRAGOMAN_NODE_TOKENS="node-token")
    async with httpx.AsyncClient() as c:
        for path in ("/api/v1/nodes", "/api/v1/pools", "/api/v1/stats", "/metrics", "/api/v1/sessions"):
            assert (await c.get(base + path)).status_code == 401, path
        assert (await c.post(base + "/api/v1/nodes/x/drain")).status_code == 401
        assert (await c.get(base + "/healthz")).status_code == 200  # probes stay open
    guarded = scheduler(DRAGOMAN_API_KEYS="client-key", DRAGOMAN_OPERATOR_TOKENS="op")
    async with httpx.AsyncClient() as c:
        assert (await c.get(guarded + "/api/v1/nodes")).status_code == 401
        ok = await c.get(guarded + "/api/v1/nodes", headers={"Authorization": "Bearer op"})
        assert ok.status_code == 200
