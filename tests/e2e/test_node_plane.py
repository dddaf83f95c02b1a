"""Node plane end to end: a real scheduler process, real sockets, the embedded Valkey."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from dragoman.client import SessionClient
from dragoman.core.audio import pcm16_silence
from dragoman.wire import ErrorMessage, TranslationResult
from tests.e2e.peers import ScriptedNode
from tests.helpers import snapshot, wait_for

pytestmark = pytest.mark.e2e


def ws(base: str) -> str:
    return base.replace("http://", "ws://")


async def slots_used(base: str) -> int:
    async with httpx.AsyncClient() as c:
        return (await c.get(base + "/api/v1/stats")).json()["slots"]["used"]


async def one_utterance(client: SessionClient, ms: int = 500) -> None:
    await client.send_audio(pcm16_silence(ms), is_final=True)


async def test_register_dispatch_result_completion(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="gpu-1")
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        assign = await node.expect("job_assign")
        for field in ("job_id", "attempt_id", "session_id", "utterance_index", "src_lang", "tgt_lang", "pipeline",
                      "audio", "audio_format", "sample_rate", "trace_id"):
            assert field in assign, field
        assert (assign["attempt_id"], assign["src_lang"], assign["tgt_lang"]) == (1, "zh", "en")
        await node.result(assign, "ni hao")
        (res,) = await client.results(1)
        assert isinstance(res, TranslationResult) and res.text_translated == "en:ni hao"
        await client.close()
    assert await slots_used(base) == 0
    await node.close()


async def test_silent_node_loses_job_to_another_and_its_late_result_is_rejected(scheduler) -> None:
    base = scheduler()
    a = await ScriptedNode.connect(ws(base), node_id="node-a", slots=1)
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        first = await a.expect("job_assign")
        b = await ScriptedNode.connect(ws(base), node_id="node-b", slots=1)
        beat = asyncio.create_task(b.keep_alive())
        # node-a stays connected but stops heartbeating: after node_ttl the reaper takes its job
        second = await b.expect("job_assign", timeout=10)
        assert (second["job_id"], second["attempt_id"]) == (first["job_id"], 2)
        await a.result(first, "late")
        err = await a.expect("error")
        assert "rejected" in err["message"]
        await b.result(second, "fresh")
        (res,) = await client.results(1)
        assert res.text_translated == "en:fresh"
        outcomes = await client.close()
        assert outcomes == []  # exactly one outcome: the late attempt never reached the client
        beat.cancel()
    assert await slots_used(base) == 0


async def test_connected_node_that_never_answers_gets_cancel_then_job_times_out(scheduler) -> None:
    base = scheduler(DRAGOMAN_MAX_ATTEMPTS="2")
    nodes = [await ScriptedNode.connect(ws(base), node_id=f"mute-{i}", slots=1) for i in range(2)]
    beats = [asyncio.create_task(n.keep_alive()) for n in nodes]
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        holders = []
        for _ in range(2):
            got = await asyncio.wait([asyncio.ensure_future(n.expect("job_assign", 15)) for n in nodes],
                                     return_when=asyncio.FIRST_COMPLETED)
            done, pending = got
            for p in pending:
                p.cancel()
            holders.append(next(iter(done)).result())
        assert [h["attempt_id"] for h in holders] == [1, 2]
        cancels = [await n.expect("job_cancel", 15) for n in nodes]
        assert {c["job_id"] for c in cancels} == {holders[0]["job_id"]}
        (res,) = await client.results(1, timeout=15)
        assert isinstance(res, ErrorMessage) and res.code == "JOB_TIMEOUT"
        assert res.details["utterance_index"] == 0 and res.details["tgt_lang"] == "en"
    for b in beats:
        b.cancel()
    assert await slots_used(base) == 0


async def test_draining_node_gets_no_new_job_and_finishes_running_ones(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="drainer", slots=4)
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        running = await node.expect("job_assign")
        beat = asyncio.create_task(node.keep_alive(draining=True))

        async def drained() -> bool:
            async with httpx.AsyncClient() as c:
                nodes = (await c.get(base + "/api/v1/nodes")).json()["nodes"]
            return nodes[0]["state"] == "draining"

        await wait_for(drained)
        await one_utterance(client)  # utterance 1: its only node is draining
        await node.result(running, "done")
        first, second = await client.results(2)
        assert isinstance(first, TranslationResult) and first.utterance_index == 0
        assert isinstance(second, ErrorMessage) and second.code == "NO_AVAILABLE_NODE"
        assert second.details["utterance_index"] == 1
        await client.close()
        beat.cancel()
    assert len(node.frames("job_assign")) == 1
    assert await slots_used(base) == 0


EXISTING_WORKER_REGISTER = {
    "type": "node_register", "node_id": None, "version": "2.3.1", "capability_schema_version": "1.0",
    "platform": "windows", "hardware": {"cpu_cores": 16, "memory_gb": 32, "gpus": [{"name": "RTX 4090", "memory_gb": 24}]},
    "installed_models": [{"model_id": "whisper-large-v3", "kind": "asr"}],
    "installed_services": [{"service_id": "faster-whisper", "type": "asr", "device": "gpu", "status": "running"},
                           {"service_id": "lexicon-zh", "type": "lexicon", "device": "cpu", "status": "running"}],
    "capability_by_type": [{"type": "asr", "ready": True}, {"type": "lexicon", "ready": True, "reason": None}],
    "features_supported": {"emotion": False}, "accept_public_jobs": True,
    "language_capabilities": {"asr_languages": ["zh", "en"], "semantic_languages": ["zh", "en"],
                              "tts_languages": ["zh", "en"], "semantic_core_ready": True},
    "some_future_field": {"x": 1},
}


async def test_existing_worker_register_is_accepted_and_pooled(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), register=EXISTING_WORKER_REGISTER)
    assert node.node_id.startswith("node-")
    async with httpx.AsyncClient() as c:
        pools = {p["pool"]: p for p in (await c.get(base + "/api/v1/pools")).json()["pools"]}
        nodes = (await c.get(base + "/api/v1/nodes")).json()["nodes"]
    assert {"zh>en", "en>zh", "zh>zh", "en>en", "en<>zh"} <= set(pools)
    assert pools["en<>zh"]["nodes"] == [node.node_id]
    assert nodes[0]["max"] == "4"  # the configured default: the existing worker reports no max_concurrency
    await node.close()


async def test_bad_frames_get_errors_and_change_nothing(scheduler, store) -> None:
    base = scheduler(DRAGOMAN_MAX_FRAME_BYTES="65536")
    owner = await ScriptedNode.connect(ws(base), node_id="owner")
    intruder = await ScriptedNode.connect(ws(base), node_id="intruder")
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        assign = await owner.expect("job_assign")
        before = await snapshot(store.client)
        await intruder.ws.send("{not json")
        assert (await intruder.expect("error"))["code"] == "INVALID_MESSAGE"
        await intruder.send({"type": "job_result", "job_id": assign["job_id"]})  # missing required fields
        err = await intruder.expect("error")
        assert err["code"] == "INVALID_MESSAGE" and "attempt_id" in err["message"]
        forged = dict(assign, node_id="intruder")
        await intruder.send({"type": "job_result", "job_id": forged["job_id"], "attempt_id": 1,
                             "node_id": "intruder", "success": True, "text_translated": "forged"})
        assert "rejected" in (await intruder.expect("error"))["message"]
        await intruder.send({"type": "job_result", "job_id": assign["job_id"], "attempt_id": 1,
                             "node_id": "owner", "success": True})  # claims to be another node
        assert "not the node registered" in (await intruder.expect("error"))["message"]
        after = await snapshot(store.client)
        strip = lambda snap: {k: v for k, v in snap.items() if b":node:" not in k and b":nodes" not in k}  # noqa: E731
        assert strip(after) == strip(before)  # heartbeats move node deadlines only
        # an oversized frame closes the connection (1009) and changes nothing
        await intruder.ws.send(json.dumps({"type": "node_heartbeat", "node_id": "intruder", "pad": "x" * 70000}))
        await asyncio.wait_for(intruder.ws.wait_closed(), 10)
        assert intruder.ws.close_code == 1009
        await owner.result(assign, "real")
        (res,) = await client.results(1)
        assert res.text_translated == "en:real"


async def test_node_tokens_are_checked_at_the_upgrade(scheduler) -> None:
    base = scheduler(DRAGOMAN_NODE_TOKENS="s3cret")
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws(base) + "/ws/node"):
            pass
    assert info.value.response.status_code == 403
    node = await ScriptedNode.connect(ws(base), node_id="ok", headers={"Authorization": "Bearer s3cret"})
    assert node.node_id == "ok"
    await node.close()
