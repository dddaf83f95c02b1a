"""Rooms end to end: members on two scheduler processes sharing one Redis, real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from dragoman.client import SessionClient
from dragoman.embedded import EmbeddedServer
from dragoman.wire import (
    ErrorMessage,
    MissingResult,
    RoomCreate,
    RoomCreateAck,
    RoomError,
    RoomExpired,
    RoomJoin,
    RoomLeave,
    RoomMembers,
    RoomRawVoicePreference,
    TranslationResult,
    WebrtcOffer,
)
from tests.e2e.peers import ScriptedNode
from tests.e2e.test_node_plane import one_utterance, slots_used, ws

pytestmark = pytest.mark.e2e


@contextlib.asynccontextmanager
async def member(base: str, lang: str) -> AsyncIterator[SessionClient]:
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang=lang, tgt_langs=[lang]) as client:
        yield client


async def members_seen(client: SessionClient, count: int) -> list[str]:
    """The next room_members with ``count`` members: their session ids."""
    while True:
        msg = await client.wait_for((RoomMembers,), timeout=10)
        if len(msg.members) == count:
            return [m.session_id for m in msg.members]


async def test_three_members_on_two_processes_each_hear_the_others_in_their_language(scheduler) -> None:
    a, b = scheduler(), scheduler()
    node = await ScriptedNode.connect(ws(b), node_id="polyglot", slots=8,
                                      pairs=(("zh", "en"), ("zh", "de"), ("en", "zh"), ("en", "de")))
    beat = asyncio.create_task(node.keep_alive())
    async with member(a, "zh") as zh, member(b, "en") as en, member(a, "de") as de:
        await zh.send(RoomCreate(client_ts=1, display_name="Zhang", preferred_lang="zh"))
        code = (await zh.wait_for((RoomCreateAck,))).room_code
        assert [m.display_name for m in (await zh.wait_for((RoomMembers,))).members] == ["Zhang"]
        await en.send(RoomJoin(room_code=code, display_name="Emma", preferred_lang="en"))
        await members_seen(zh, 2)
        await de.send(RoomJoin(room_code=code, display_name="Dieter"))  # no preferred_lang: its target, de
        for client in (zh, en, de):
            assert await members_seen(client, 3) == [zh.session_id, en.session_id, de.session_id]

        for _ in range(3):
            await one_utterance(zh)
        jobs = [await node.expect("job_assign") for _ in range(6)]  # one per listener language
        assert sorted((j["utterance_index"], j["tgt_lang"]) for j in jobs) == [
            (i, lang) for i in range(3) for lang in ("de", "en")]
        for job in reversed(jobs):  # answered last first: each listener still hears them in order
            await node.result(job, f"u{job['utterance_index']}")
        for client, lang in ((en, "en"), (de, "de")):
            got = await client.results(3)
            assert [(r.session_id, r.utterance_index, r.tgt_lang, r.text_translated) for r in got] == [
                (zh.session_id, i, lang, f"{lang}:u{i}") for i in range(3)]
        assert not [m for m in zh.all if isinstance(m, TranslationResult | MissingResult)]  # the speaker: none

        # WebRTC signalling crosses processes with `to` set to the sender, unless refused
        await en.send(WebrtcOffer(room_code=code, to=zh.session_id, sdp={"type": "offer", "sdp": "v=0"}))
        offer = await zh.wait_for((WebrtcOffer,))
        assert (offer.to, offer.sdp) == (en.session_id, {"type": "offer", "sdp": "v=0"})
        await zh.send(RoomRawVoicePreference(room_code=code, target_session_id=en.session_id,
                                             receive_raw_voice=False))
        for client in (zh, en, de):
            prefs = (await client.wait_for((RoomMembers,))).members[0].raw_voice_preferences
            assert prefs == {en.session_id: False}
        await en.send(WebrtcOffer(room_code=code, to=zh.session_id, sdp={"type": "offer", "sdp": "refused"}))
        await de.send(WebrtcOffer(room_code=code, to=zh.session_id, sdp={"type": "offer", "sdp": "from de"}))
        assert (await zh.wait_for((WebrtcOffer,))).sdp["sdp"] == "from de"  # en's never came

        # leaving: the others hear of it, and the one who left is owed nothing more
        await de.send(RoomLeave(room_code=code))
        assert await members_seen(zh, 2) == [zh.session_id, en.session_id]
        await one_utterance(zh)
        [job] = [await node.expect("job_assign")]
        assert job["tgt_lang"] == "en"
        await node.result(job, "after")
        [late] = await en.results(1)
        assert late.utterance_index == 3
        for client in (zh, en, de):
            await client.close()
    beat.cancel()
    assert await slots_used(a) == 0


async def test_a_closed_socket_leaves_and_a_speaker_who_leaves_is_still_heard(scheduler) -> None:
    a, b = scheduler(), scheduler()
    node = await ScriptedNode.connect(ws(a), node_id="n", slots=2, pairs=(("zh", "en"),))
    beat = asyncio.create_task(node.keep_alive())
    async with member(b, "en") as en:
        async with member(a, "zh") as zh:
            await zh.send(RoomCreate(client_ts=1))
            code = (await zh.wait_for((RoomCreateAck,))).room_code
            await en.send(RoomJoin(room_code=code))
            await members_seen(zh, 2)
            await one_utterance(zh)
            job = await node.expect("job_assign")
        # the speaker's socket is gone: it left the room, and the job made for the others is still theirs
        assert await members_seen(en, 1) == [en.session_id]
        await node.result(job, "still")
        [result] = await en.results(1)
        assert (result.session_id, result.text_translated) == (zh.session_id, "en:still")
        await en.close()
    beat.cancel()
    assert await slots_used(a) == 0


async def test_room_errors_and_expiry_across_processes(scheduler) -> None:
    a, b = scheduler(DRAGOMAN_ROOM_EXPIRY_MS="1500", DRAGOMAN_ROOM_MAX_MEMBERS="2"), scheduler(
        DRAGOMAN_ROOM_EXPIRY_MS="1500", DRAGOMAN_ROOM_MAX_MEMBERS="2")
    async with member(a, "zh") as one, member(b, "en") as two, member(b, "de") as three:
        await three.send(RoomJoin(room_code="000000"))
        assert (await three.wait_for((RoomError,))).code == "ROOM_NOT_FOUND"
        await three.send(RoomJoin(room_code="abc"))
        assert (await three.wait_for((RoomError,))).code == "INVALID_ROOM_CODE"
        await one.send(RoomCreate(client_ts=1))
        code = (await one.wait_for((RoomCreateAck,))).room_code
        await two.send(RoomJoin(room_code=code))
        await members_seen(one, 2)
        await three.send(RoomJoin(room_code=code))
        assert (await three.wait_for((RoomError,))).code == "ROOM_FULL"
        await one.send(RoomCreate(client_ts=2))
        assert (await one.wait_for((RoomError,))).code == "ALREADY_IN_ROOM"
        async with httpx.AsyncClient() as c:
            rooms = (await c.get(a + "/api/v1/rooms")).json()["rooms"]
        assert [(r["room_code"], len(r["members"])) for r in rooms] == [(code, 2)]
        for client in (one, two):  # nobody speaks: the room expires for both, on both processes
            assert (await client.wait_for((RoomExpired,), timeout=10)).room_code == code
        await one.send(RoomLeave(room_code=code))
        assert (await one.wait_for((RoomError,))).code == "NOT_IN_ROOM"
        assert not [m for m in one.all if isinstance(m, ErrorMessage)]


async def test_a_member_whose_process_was_declared_dead_joins_its_room_again(scheduler) -> None:
    """Process b stalls past its registration: a's reaper declares it dead and removes b's member
    from the room. When b wakes it learns it was declared dead, and its session joins the room
    again, so it hears the others again (before, it thought it was in the room while Redis did not
    list it, and the room's speech no longer reached it)."""
    a, b = scheduler(), scheduler()
    node = await ScriptedNode.connect(ws(a), node_id="n", slots=2, pairs=(("zh", "en"),))
    beat = asyncio.create_task(node.keep_alive())
    async with member(a, "zh") as zh, member(b, "en") as en:
        await zh.send(RoomCreate(client_ts=1, display_name="Zhang"))
        code = (await zh.wait_for((RoomCreateAck,))).room_code
        await en.send(RoomJoin(room_code=code, display_name="Emma"))
        await members_seen(zh, 2)
        b.proc.kill(signal.SIGSTOP)
        try:
            assert await members_seen(zh, 1) == [zh.session_id]  # b declared dead: its member left
        finally:
            b.proc.kill(signal.SIGCONT)
        assert await members_seen(zh, 2) == [zh.session_id, en.session_id]  # and joined again
        names = [m.display_name for m in (await en.wait_for((RoomMembers,))).members]
        assert names == ["Zhang", "Emma"]  # as it was
        await one_utterance(zh)
        job = await node.expect("job_assign")
        assert job["tgt_lang"] == "en"
        await node.result(job, "again")
        [heard] = await en.results(1)
        assert (heard.session_id, heard.text_translated) == (zh.session_id, "en:again")
        assert not [m for m in en.all if isinstance(m, RoomExpired | RoomError)]
        for client in (zh, en):
            await client.close()
    beat.cancel()
    assert await slots_used(a) == 0


@pytest.fixture
def own_redis() -> Iterator[EmbeddedServer]:
    with EmbeddedServer() as server:
        yield server


async def test_a_room_redis_lost_is_over_for_its_members(scheduler, own_redis: EmbeddedServer) -> None:
    """Redis restarts empty: the room is gone. Each member's session tries to join it again, finds
    it gone and tells its client (room_expired, which the web client leaves room mode on); the
    session is out of room mode and may create a room again."""
    a, b = scheduler(DRAGOMAN_REDIS_URL=own_redis.url), scheduler(DRAGOMAN_REDIS_URL=own_redis.url)
    async with member(a, "zh") as zh, member(b, "en") as en:
        await zh.send(RoomCreate(client_ts=1))
        code = (await zh.wait_for((RoomCreateAck,))).room_code
        await en.send(RoomJoin(room_code=code))
        await members_seen(zh, 2)
        port = own_redis.port
        own_redis.stop()
        own_redis.port = port
        own_redis.start()  # same address, no data
        for client in (zh, en):
            expired = await client.wait_for((RoomExpired,), timeout=15)
            assert expired.room_code == code and "lost" in expired.message
        await zh.send(RoomCreate(client_ts=2))  # no ALREADY_IN_ROOM: out of room mode
        assert (await zh.wait_for((RoomCreateAck,))).room_code
        for client in (zh, en):
            await client.close()
