"""Every room transition against the real server (store/lua/room-3.lua), and room jobs' fan-out."""

from __future__ import annotations

import asyncio
import json

from redis.exceptions import ConnectionError as RedisConnectionError

from dragoman.config import Settings
from dragoman.store.api import JobSpec, Store
from dragoman.store.replies import EffectKind, JobState, Status

CODE = "123456"


def member(lang: str, name: str | None = None) -> str:
    return json.dumps({"display_name": name, "preferred_lang": lang, "lang": lang})


def room_effects(reply, event: str = "members") -> dict[str, list]:  # type: ignore[no-untyped-def]
    """session -> what its "room" effect carried."""
    return {e.session: json.loads(e.payload) if e.payload else None
            for e in reply.effects if e.kind == EffectKind.ROOM and e.event == event}


async def test_create_join_leave_and_every_change_reaches_every_member(store: Store) -> None:
    made = await store.room("create", CODE, "s1", member("zh", "Ann"), "room-1")
    assert (made.status, made.room_id) == (Status.CREATED, "room-1")
    assert [m["session_id"] for m in room_effects(made)["s1"]] == ["s1"]
    joined = await store.room("join", CODE, "s2", member("en", "Bo"), "16")
    assert joined.status == Status.JOINED and joined.room_id == "room-1"
    seen = room_effects(joined)
    assert set(seen) == {"s1", "s2"} and [m["display_name"] for m in seen["s2"]] == ["Ann", "Bo"]
    prefer = await store.room("prefer", CODE, "s2", "s1", "0")
    [bo] = [m for m in room_effects(prefer)["s1"] if m["session_id"] == "s2"]
    assert bo["prefs"] == {"s1": False}
    left = await store.room("leave", CODE, "s1")
    assert left.status == Status.LEFT and set(room_effects(left)) == {"s2"}
    last = await store.room("leave", CODE, "s2")
    assert last.status == Status.LEFT and room_effects(last) == {}
    assert await store.rooms() == []  # the last one out deletes it
    assert (await store.room("join", CODE, "s3", member("de"), "16")).code == "ROOM_NOT_FOUND"


async def test_members_are_listed_in_the_order_they_joined(store: Store) -> None:
    """Joins in one pipelined burst land in the same millisecond: the list still follows the order of
    joining (session ids chosen so that sorting by them would reverse it), for every member and in
    the operators' view."""
    sids = [f"s{9 - i}" for i in range(8)]
    await store.room("create", CODE, sids[0], member("zh"), "room-1")
    joins = await asyncio.gather(*(store.room("join", CODE, sid, member("en"), "16") for sid in sids[1:]))
    assert all(j.status == Status.JOINED for j in joins)
    last = max(joins, key=lambda j: len(room_effects(j)[sids[0]]))
    assert [m["session_id"] for m in room_effects(last)[sids[0]]] == sids
    [room] = await store.rooms()
    assert [m["session_id"] for m in room["members"]] == sids


async def test_a_code_in_use_is_a_collision_and_changes_nothing(store: Store) -> None:
    await store.room("create", CODE, "s1", member("zh"), "room-1")
    again = await store.room("create", CODE, "s9", member("en"), "room-2")
    assert again.status == Status.COLLISION and again.effects == []
    [room] = await store.rooms()
    assert (room["room_id"], [m["session_id"] for m in room["members"]]) == ("room-1", ["s1"])


async def test_refusals_name_their_reason(store: Store) -> None:
    await store.room("create", CODE, "s1", member("zh"), "r")
    assert (await store.room("join", CODE, "s1", member("zh"), "16")).code == "ALREADY_IN_ROOM"
    assert (await store.room("leave", CODE, "s5")).code == "NOT_IN_ROOM"
    assert (await store.room("speak", "654321", "s1")).code == "ROOM_NOT_FOUND"
    assert (await store.room("join", CODE, "s2", member("en"), "1")).code == "ROOM_FULL"


async def test_the_member_limit_holds_under_concurrent_joins(store: Store, redis_url: str, settings: Settings) -> None:
    """Thirty sessions on three processes join a room of at most 16 at once: exactly 15 get in."""
    stores = [Store.from_url(redis_url, settings, proc=f"p{i}") for i in range(3)]
    try:
        await store.room("create", CODE, "s-first", member("zh"), "r")
        replies = await asyncio.gather(*(stores[i % 3].room("join", CODE, f"s{i:02d}", member("en"), "16")
                                         for i in range(30)))
        assert sum(r.status == Status.JOINED for r in replies) == 15
        assert {r.code for r in replies if r.status != Status.JOINED} == {"ROOM_FULL"}
        [room] = await store.rooms()
        assert len(room["members"]) == 16
    finally:
        for s in stores:
            await s.aclose()


async def test_signalling_goes_to_its_member_unless_it_refuses_the_senders_voice(store: Store) -> None:
    await store.room("create", CODE, "s1", member("zh"), "r")
    await store.room("join", CODE, "s2", member("en"), "16")
    sent = await store.room("signal", CODE, "s1", "s2", '{"type":"webrtc_offer","sdp":{"x":1}}')
    [e] = [e for e in sent.effects if e.kind == EffectKind.ROOM and e.event == "signal"]
    assert (e.session, e.sender, json.loads(e.payload)["sdp"]) == ("s2", "s1", {"x": 1})
    await store.room("prefer", CODE, "s2", "s1", "0")  # s2 does not want s1's raw voice
    refused = await store.room("signal", CODE, "s1", "s2", '{"type":"webrtc_offer"}')
    assert refused.status == Status.REFUSED and refused.effects == []
    assert (await store.room("signal", CODE, "s1", "s9", "{}")).code == "NOT_IN_ROOM"


async def test_a_room_without_speech_expires(store: Store, settings: Settings) -> None:
    await store.room("create", CODE, "s1", member("zh"), "r")
    await store.room("join", CODE, "s2", member("en"), "16")
    spoke = await store.room("speak", CODE, "s1")
    assert [m.session_id for m in spoke.members] == ["s1", "s2"] and spoke.members[1].lang == "en"
    await store.set_clock_offset(settings.room_expiry_ms - 1_000)
    assert (await store.reap())[0].rooms_expired == 0
    await store.set_clock_offset(settings.room_expiry_ms + 1)
    [reaped] = await store.reap()
    assert reaped.rooms_expired == 1
    assert {e.session for e in reaped.effects if e.kind == EffectKind.ROOM and e.event == "expired"} == {"s1", "s2"}
    assert await store.rooms() == []


async def test_a_dead_process_members_leave_its_rooms(store: Store, redis_url: str, settings: Settings) -> None:
    p2 = Store.from_url(redis_url, settings, proc="p2", test_clock=True)
    try:
        await store.touch_proc(ttl_ms=600_000)
        await p2.touch_proc(ttl_ms=1_000)
        await store.room("create", CODE, "s1", member("zh"), "r")
        await p2.room("join", CODE, "s2", member("en"), "16")
        await store.set_clock_offset(1_000 + settings.proc_ttl_ms + 1_000)  # p2 lapsed over proc_ttl_ms ago
        [reaped] = await store.reap()
        assert [m["session_id"] for m in room_effects(reaped)["s1"]] == ["s1"]
    finally:
        await p2.aclose()


async def test_a_room_job_is_for_its_listeners_and_outlives_its_speaker(store: Store) -> None:
    """The outcome of a job made for a room goes to each listener (told to expect it first), never to
    the speaker; the speaker's session ending does not cancel it; it is forgotten once every
    listener has it."""
    await store.register_node("n1", conn="c", max_concurrency=2, pools=["zh>en"])
    await store.open_session("speaker", "{}")
    d = await store.dispatch(JobSpec(pool="zh>en", session_id="speaker", utterance_index=0, tgt_lang="en",
                                     body="{}", listeners=("l1@p1", "l2@p1")))
    expects = sorted((e.session, e.speaker, e.utt, e.pool) for e in d.effects if e.kind == EffectKind.EXPECT)
    assert expects == [("l1", "speaker", 0, "zh>en"), ("l2", "speaker", 0, "zh>en")]  # the speaker's pool
    await store.close_session("speaker", 1, detach=False)  # the speaker leaves at once
    assert (await store.job(d.job_id))["state"] == "assigned"
    done = await store.complete(d.job_id, "n1", 1, "completed", payload='{"t":1}')
    assert sorted((e.kind, e.session, e.speaker) for e in done.effects) == [
        ("outcome", "l1", "speaker"), ("outcome", "l2", "speaker")]
    assert (await store.get_jobs([d.job_id]))[d.job_id].state == JobState.COMPLETED
    await store.ack("l1", [d.job_id])
    assert await store.job(d.job_id) is not None
    await store.ack("l2", [d.job_id])
    assert await store.job(d.job_id) is None
    assert (await store.slot_report())["used"] == 0


def lose_first_replies(store: Store, script: str) -> list[str]:
    """Every call of ``script`` runs on the real server, then its first reply is lost (as if the
    connection dropped after the script ran); the Store's retry, with the same arguments, gets
    through. Returns "script:op" of each call whose reply was lost."""
    real = store.scripts.call
    lost: list[str] = []
    last: list = []  # type: ignore[type-arg]

    async def call(name: str, keys: list[str], args: list, **kw: object) -> object:  # type: ignore[type-arg]
        reply = await real(name, keys, args, **kw)  # type: ignore[arg-type]
        if name == script and args != last:  # a new call, not the retry of the one just lost
            last[:] = args
            lost.append(f"{name}:{args[1]}")
            raise RedisConnectionError("reply lost (test)")
        return reply

    store.scripts.call = call  # type: ignore[method-assign]
    return lost


async def test_a_room_call_retried_after_a_lost_reply_gets_the_answer_it_lost(store: Store, redis_url: str,
                                                                            settings: Settings) -> None:
    """I8: a retried create does not answer "collision" (the protocol would make a second room), a
    retried join does not answer ALREADY_IN_ROOM (the session would think it is not in the room
    while Redis lists it), a retried leave answers "left", and a retried signal is sent once."""
    p2 = Store.from_url(redis_url, settings, proc="p2", test_clock=True)
    try:
        await p2.touch_proc(ttl_ms=600_000)
        lost = lose_first_replies(store, "room")
        made = await store.room("create", CODE, "s1", member("zh", "Ann"), "room-1")
        assert (made.status, made.room_id) == (Status.CREATED, "room-1")
        assert [m["session_id"] for m in room_effects(made)["s1"]] == ["s1"]  # the effects it lost
        joined = await store.room("join", CODE, "s2", member("en", "Bo"), "16")
        assert (joined.status, joined.room_id) == (Status.JOINED, "room-1")
        assert set(room_effects(joined)) == {"s1", "s2"}
        await p2.room("join", CODE, "s3", member("de"), "16")  # a member on another process
        inbox = p2.cells["c0"].inbox(p2.proc)
        before = await store.client.xlen(inbox)
        sent = await store.room("signal", CODE, "s1", "s3", '{"type":"webrtc_offer"}')
        assert sent.status == Status.OK
        assert await store.client.xlen(inbox) == before + 1  # relayed once, not once per try
        left = await store.room("leave", CODE, "s2")
        assert left.status == Status.LEFT
        pref = await store.room("prefer", CODE, "s1", "s3", "0")
        assert pref.status == Status.OK
        assert lost == ["room:create", "room:join", "room:signal", "room:leave", "room:prefer"]
        [room] = await store.rooms()
        assert (room["room_id"], [m["session_id"] for m in room["members"]]) == ("room-1", ["s1", "s3"])
    finally:
        await p2.aclose()


async def test_a_listeners_retried_ack_counts_once(store: Store) -> None:
    """I8: a listener's ack retried after a lost reply (or sent twice) counts once, so the room job
    is not forgotten before its other listeners have it; an ack from a session that is not one of
    its listeners does not count."""
    await store.register_node("n1", conn="c", max_concurrency=2, pools=["zh>en"])
    d = await store.dispatch(JobSpec(pool="zh>en", session_id="speaker", utterance_index=0, tgt_lang="en",
                                     body="{}", listeners=("l1@p1", "l2@p1", "l3@p1")))
    await store.complete(d.job_id, "n1", 1, "completed", payload='{"t":1}')
    lost = lose_first_replies(store, "ack_outcomes")
    assert await store.ack("l1", [d.job_id]) == 1
    assert lost == ["ack_outcomes:l1"]
    await store.ack("l1", [d.job_id])  # sent again
    await store.ack("speaker", [d.job_id])  # not a listener of its own job
    await store.ack("l2", [d.job_id])
    assert (await store.get_jobs([d.job_id]))[d.job_id].state == JobState.COMPLETED  # l3 still can have it
    await store.ack("l3", [d.job_id])
    assert await store.job(d.job_id) is None
