"""Session plane end to end: real scheduler and node processes, a client streaming audio."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import httpx
import pytest

from dragoman.app.sockets import MAX_STRIKES
from dragoman.client import SessionClient
from dragoman.core.audio import join_opus, pcm16_silence
from dragoman.wire import (
    ClientHeartbeat,
    ErrorMessage,
    MissingResult,
    ServerHeartbeat,
    TranslationResult,
    UiEvent,
    Utterance,
)
from tests.e2e.peers import ScriptedNode
from tests.e2e.test_node_plane import one_utterance, slots_used, ws
from tests.helpers import wait_for

pytestmark = pytest.mark.e2e
SPEECH_EN = Path(__file__).resolve().parents[2] / "src/dragoman/demo/audio/speech-en.wav"


def opus_chunk(packets: int = 13, size: int = 40) -> bytes:
    """A web-client Plan A chunk: 20 ms packets, each with a 2-byte little-endian length prefix."""
    return join_opus([bytes([i % 251]) * size for i in range(packets)])


async def test_web_client_shaped_session(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="gpu", pairs=(("zh", "en"), ("en", "zh")))
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="auto", tgt_langs=["en"],
                                     audio_format="opus", mode="two_way_auto", lang_a="zh", lang_b="en") as client:
        for _ in range(4):  # four 256 ms chunks, then the finalize frame
            await client.send_audio(opus_chunk())
        await client.finish()
        assign = await node.expect("job_assign")
        assert (assign["src_lang"], assign["tgt_lang"], assign["lang_a"], assign["lang_b"]) == ("auto", "en", "zh", "en")
        assert assign["mode"] == "two_way_auto" and assign["auto_langs"] == ["zh", "en"]
        assert assign["audio_format"] == "opus" and assign["sample_rate"] == 16000
        assert base64.b64decode(assign["audio"]) == opus_chunk() * 4  # nothing lost or duplicated
        assert assign["is_manual_cut"] is True and assign["is_timeout_triggered"] is False
        assert assign["pipeline"] == {"use_asr": True, "use_nmt": True, "use_tts": True, "use_semantic": False,
                                      "use_tone": False}
        assert assign["trace_id"] == client.trace_id and assign["utterance_index"] == 0
        await node.result(assign, "hi", tts_audio=base64.b64encode(b"RIFF").decode())
        (res,) = await client.results(1)
        assert isinstance(res, TranslationResult)
        assert (res.utterance_index, res.tgt_lang, res.job_id) == (0, "en", assign["job_id"])
        assert res.tts_audio == base64.b64encode(b"RIFF").decode()
        assert any(isinstance(m, UiEvent) and m.event == "DISPATCHED" for m in client.all)
        await client.close()
    assert await slots_used(base) == 0


async def test_two_targets_and_out_of_order_completions_arrive_in_order(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="multi", pairs=(("en", "zh"), ("en", "de")), slots=8)
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="en", tgt_langs=["zh", "de"]) as client:
        for _ in range(3):
            await one_utterance(client)
        assigns = [await node.expect("job_assign") for _ in range(6)]
        assert sorted((a["utterance_index"], a["tgt_lang"]) for a in assigns) == [
            (u, t) for u in range(3) for t in ("de", "zh")]
        for a in sorted(assigns, key=lambda a: -a["utterance_index"]):  # complete newest first
            await node.result(a, f"u{a['utterance_index']}")
        results = await client.results(6)
        for tgt in ("zh", "de"):
            got = [r.utterance_index for r in results if r.tgt_lang == tgt]
            assert got == [0, 1, 2], (tgt, got)
        await client.close()
    assert await slots_used(base) == 0


async def test_no_node_for_the_pair(scheduler) -> None:
    base = scheduler()
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="ja", tgt_langs=["ko"]) as client:
        await one_utterance(client)
        (err,) = await client.results(1)
        assert isinstance(err, ErrorMessage) and err.code == "NO_AVAILABLE_NODE"
        assert err.details == {"session_id": client.session_id, "utterance_index": 0, "tgt_lang": "ko",
                               "job_id": err.details["job_id"], "trace_id": client.trace_id}
        ui = await client.wait_for((UiEvent,))
        assert ui.event == "ERROR" and ui.error_code == "NO_AVAILABLE_NODE"


async def test_full_pool_queues_then_serves(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="single", slots=1)
    beat = asyncio.create_task(node.keep_alive())
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        await one_utterance(client)
        first = await node.expect("job_assign")

        async def queued() -> bool:
            async with httpx.AsyncClient() as c:
                pools = (await c.get(base + "/api/v1/pools")).json()["pools"]
            return any(p["queue_depth"] == 1 for p in pools)

        await wait_for(queued)
        await node.result(first, "one")
        second = await node.expect("job_assign")  # handed the freed slot by the completion
        assert second["utterance_index"] == 1
        await node.result(second, "two")
        results = await client.results(2)
        assert [r.text_translated for r in results] == ["en:one", "en:two"]
        await client.close()
    beat.cancel()
    assert await slots_used(base) == 0


async def test_empty_ack_becomes_missing_result(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="quiet")
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        await one_utterance(client)
        a = await node.expect("job_assign")
        await node.result(a, "", text_asr="", text_translated="", extra={"reason": "ASR_EMPTY"})
        (res,) = await client.results(1)
        assert isinstance(res, MissingResult) and res.reason == "asr_empty" and res.tgt_lang == "en"


async def test_killed_node_process_still_gives_one_outcome_per_utterance_and_target(scheduler, spawn) -> None:
    base = scheduler()
    slow = spawn("node", "--scheduler", ws(base) + "/ws/node", "--pairs", "zh:en,zh:de", "--slots", "4",
                 "--node-id", "doomed", "--sim-speed", "0.02", name="doomed")  # ~several seconds per job

    async def registered() -> bool:
        async with httpx.AsyncClient() as c:
            return any(n["id"] == "doomed" and n["state"] == "ready"
                       for n in (await c.get(base + "/api/v1/nodes")).json()["nodes"])

    await wait_for(registered, timeout=20)
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en", "de"]) as client:
        await one_utterance(client, 2000)
        dispatched = [await client.wait_for((UiEvent,)) for _ in range(2)]
        assert {d.event for d in dispatched} == {"DISPATCHED"}
        rescuer = await ScriptedNode.connect(ws(base), node_id="rescuer", pairs=(("zh", "en"), ("zh", "de")), slots=4)
        slow.kill()  # SIGKILL mid-job: the socket drops, the scheduler moves both jobs at once
        again = [await rescuer.expect("job_assign", 10) for _ in range(2)]
        assert {a["attempt_id"] for a in again} == {2}
        for a in again:
            await rescuer.result(a, "saved")
        outcomes = await client.close()
        assert sorted((o.utterance_index, o.tgt_lang) for o in outcomes) == [(0, "de"), (0, "en")]
        assert all(isinstance(o, TranslationResult) for o in outcomes)
    assert await slots_used(base) == 0


async def test_real_agent_round_trip(scheduler, spawn) -> None:
    base = scheduler()
    spawn("node", "--scheduler", ws(base) + "/ws/node", "--pairs", "en:zh", "--slots", "2", "--sim-speed", "50",
          name="agent")
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="en", tgt_langs=["zh"]) as client:
        async def ready() -> bool:
            async with httpx.AsyncClient() as c:
                return bool((await c.get(base + "/api/v1/pools")).json()["pools"])

        await wait_for(ready, timeout=20)
        await one_utterance(client, 1000)
        (res,) = await client.results(1)
        assert isinstance(res, TranslationResult) and "[sim" in res.text_translated
        await client.close()
    assert await slots_used(base) == 0


async def test_one_shot_http_translate(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="http-node", pairs=(("en", "zh"),))
    async with httpx.AsyncClient(timeout=20) as c:
        call = asyncio.create_task(c.post(base + "/api/v1/translate", json={
            "audio": base64.b64encode(pcm16_silence(300)).decode(), "audio_format": "pcm16",
            "src_lang": "en", "tgt_lang": "zh"}))
        a = await node.expect("job_assign")
        await node.result(a, "yi")
        body = (await call).json()
        assert [r["type"] for r in body["results"]] == ["translation_result"]
        assert body["results"][0]["text_translated"] == "zh:yi"
        bad = await c.post(base + "/api/v1/translate", json={"audio": "@@", "src_lang": "en", "tgt_lang": "zh"})
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_MESSAGE"


async def test_bad_session_input(scheduler) -> None:
    base = scheduler()
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"],
                                     audio_format="opus") as client:
        await client.send_audio(b"\x05\x00ab")  # length prefix says 5 bytes, 2 follow
        err = await client.wait_for((ErrorMessage,))
        assert err.code == "INVALID_MESSAGE" and "opus" in err.message.lower() or "payload" in err.message
        await client.transport.send('{"type":"audio_chunk","seq":-1,"is_final":false}')
        err = await client.wait_for((ErrorMessage,))
        assert err.code == "INVALID_MESSAGE"
        await client.transport.send(b"\x00binary")
        err = await client.wait_for((ErrorMessage,))
        assert err.code == "INVALID_MESSAGE" and "binary" in err.message
        await client.send(Utterance(utterance_index=0, src_lang="zh", tgt_lang="en", audio="AAAA"))
        err = await client.wait_for((ErrorMessage,))
        assert "do not mix" in err.message
        # the connection survived all of it
        await client.send(ClientHeartbeat(session_id=client.session_id, timestamp=1))
        await client.wait_for((ServerHeartbeat,))


async def test_invalid_frames_close_the_socket_only_when_they_come_in_a_row(scheduler) -> None:
    """Each good frame forgives the invalid ones before it, including a good frame handed to the
    session in the socket's own callback (``session_ws.hand_over_in_place``)."""
    base = scheduler()
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"],
                                     resume=False) as client:
        for i in range(MAX_STRIKES + 5):  # interleaved: never two strikes in a row
            await client.transport.send('{"type":"no_such_message"}')
            err = await client.wait_for((ErrorMessage,))
            assert err.code == "INVALID_MESSAGE"
            await client.send(ClientHeartbeat(session_id=client.session_id, timestamp=i))
            await client.wait_for((ServerHeartbeat,))
        for _ in range(MAX_STRIKES + 1):  # in a row: the socket is closed after MAX_STRIKES + 1
            await client.transport.send('{"type":"no_such_message"}')
        await asyncio.wait_for(client.closed.wait(), 10)


async def test_two_scheduler_processes_share_one_redis(scheduler) -> None:
    """A node on one process, a session on another: jobs and results cross through Redis."""
    node_side, session_side = scheduler(), scheduler()
    node = await ScriptedNode.connect(ws(node_side), node_id="far-node", pairs=(("en", "de"),))
    beat = asyncio.create_task(node.keep_alive())
    async with SessionClient.connect(ws(session_side) + "/ws/session", src_lang="en", tgt_langs=["de"]) as client:
        for i in range(3):
            await one_utterance(client)
            a = await node.expect("job_assign")
            assert a["utterance_index"] == i
            await node.result(a, f"fern{i}")
        results = await client.results(3)
        assert [r.text_translated for r in results] == ["de:fern0", "de:fern1", "de:fern2"]
        await client.close()
    beat.cancel()
    assert await slots_used(node_side) == 0


async def test_operator_actions_need_the_operator_token(scheduler) -> None:
    base = scheduler(DRAGOMAN_OPERATOR_TOKENS="op-secret")
    node = await ScriptedNode.connect(ws(base), node_id="guarded")
    async with httpx.AsyncClient() as c:
        refused = await c.post(base + "/api/v1/nodes/guarded/drain")
        assert refused.status_code == 401
        ok = await c.post(base + "/api/v1/nodes/guarded/drain", headers={"Authorization": "Bearer op-secret"})
        assert ok.status_code == 200 and ok.json()["state"] == "draining"
    await node.close()


async def test_api_keys_are_checked_at_the_upgrade(scheduler) -> None:
    from websockets.exceptions import InvalidStatus

    base = scheduler(DRAGOMAN_API_KEYS="k1")
    with pytest.raises(InvalidStatus) as info:
        async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]):
            pass
    assert info.value.response.status_code == 403
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"],
                                     api_key="k1") as client:
        assert client.session_id


async def test_speak_streams_a_wav_and_prints_each_result(scheduler, spawn) -> None:
    import subprocess
    import sys

    base = scheduler()
    spawn("node", "--scheduler", ws(base) + "/ws/node", "--pairs", "en:zh,en:de", "--slots", "4",
          "--sim-speed", "50", name="speak-node")

    async def ready() -> bool:
        async with httpx.AsyncClient() as c:
            return len((await c.get(base + "/api/v1/pools")).json()["pools"]) == 2

    await wait_for(ready, timeout=20)
    wav = SPEECH_EN
    run = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "dragoman.cli.main", "speak", str(wav), "--src", "en", "--tgt", "zh,de",
        "--url", ws(base) + "/ws/session", "--speed", "20", "--format", "opus"],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "[sim en->zh]" in out and "[sim en->de]" in out and "latency" in out and "done" in out
