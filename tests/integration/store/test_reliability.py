"""The loss paths of "Nothing lost under faults", at the store level, against the real server: each
test names the path it closes."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from dragoman.config import Settings
from dragoman.errors import ScriptError
from dragoman.store.api import JobSpec, Store
from dragoman.store.replies import DispatchReply, EffectKind, JobState, Status
from tests.helpers import dispatch_argv, raw_dispatch, snapshot

ZH_EN = "zh>en"


def job(session: str = "s1", utt: int = 0, **kw) -> JobSpec:
    return JobSpec(pool=ZH_EN, session_id=session, utterance_index=utt, tgt_lang="en",
                   body=json.dumps({"utt": utt}), **kw)


async def register(store: Store, nid: str, max_c: int = 1, conn: str | None = None):
    r = await store.register_node(nid, conn=conn or f"conn-{nid}", max_concurrency=max_c, pools=[ZH_EN])
    assert r.status == Status.REGISTERED, r
    return r


async def reap_all(store: Store) -> list:
    effects = []
    while True:
        replies = await store.reap()
        effects += [e for r in replies for e in r.effects]
        if not any(r.more for r in replies):
            return effects


def kinds(effects) -> list[tuple[str, str, str]]:
    return sorted((e.kind, e.job, e.node) for e in effects)


@pytest.fixture
async def p2(redis_url: str, settings: Settings):
    other = Store.from_url(redis_url, settings, proc="p2", test_clock=True)
    yield other
    await other.aclose()


# --- 1. a session's end races a freed slot ---------------------------------------------------------------


async def test_session_end_cancels_in_one_transition_and_its_effects_are_delivered(store: Store) -> None:
    """Loss path 1: the job the session still owed was assigned (a slot freed) just before the
    session went away. One transition cancels it whatever its state, tells its node, and hands the
    slot to the next waiting job; nothing is read first and cancelled in a second call."""
    await register(store, "n1", max_c=1)
    a = await store.dispatch(job("s1", 0))
    b = await store.dispatch(job("s1", 1))
    c = await store.dispatch(job("s2", 0))
    assert (a.status, b.status, c.status) == ("assigned", "queued", "queued")
    done = await store.complete(a.job_id, "n1", 1, "completed", payload="{}")
    assert ("assign", b.job_id, "n1") in kinds(done.effects)  # b took the freed slot
    [closed] = await store.close_session("s1", 1, detach=True, grace_ms=0)
    assert closed.jobs == 1
    assert kinds(closed.effects) == [("assign", c.job_id, "n1"), ("cancel", b.job_id, "n1")]
    assert (await store.job(c.job_id))["state"] == "assigned"
    assert await store.job(b.job_id) is None  # forgotten with its session
    report = await store.slot_report()
    assert (report["used"], report["violations"]) == (1, [])


# --- 2. inbox streams are bounded and acknowledged -----------------------------------------------------


async def test_inbox_is_bounded_and_what_was_read_is_removed(redis_url: str, settings: Settings) -> None:
    """Loss path 2: an inbox holds at most inbox_max_len unread effects; past it nothing is trimmed
    away in silence: an outcome waits with its job (the session asks for it), an assignment for a
    node whose process cannot take it moves to another node; what was read is removed."""
    small = settings.replace(inbox_max_len=2)
    p1 = Store.from_url(redis_url, small, proc="p1", test_clock=True)
    p2 = Store.from_url(redis_url, small, proc="p2", test_clock=True)
    try:
        await p1.touch_proc()
        await p2.touch_proc()
        await register(p1, "n1", max_c=8)
        jobs = []
        for i in range(3):  # sessions on p2, node on p1 (which reads its own inbox as it goes)
            jobs.append(await p2.dispatch(job("s2", i)))
            await p1.trim_inbox("c0", [entry_id for entry_id, _ in await p1.read_inbox("c0", "0-0", block_ms=10)])
        for d in jobs:
            assert (await p1.complete(d.job_id, "n1", 1, "completed", payload=f'"r{d.job_id}"')).status == "completed"
        entries = await p2.read_inbox("c0", "0-0", block_ms=10)
        assert len(entries) == 2  # the bound: the third outcome was not appended ...
        statuses = await p2.get_jobs([d.job_id for d in jobs])
        third = statuses[jobs[2].job_id]
        assert (third.state, third.result) == (JobState.COMPLETED, f'"r{jobs[2].job_id}"')  # ... it waits here
        await p2.trim_inbox("c0", [entry_id for entry_id, _ in entries])
        assert await p2.read_inbox("c0", "0-0", block_ms=10) == []
        assert (await p1.stats())["inbox_full"] == 1
        # an assignment for a node whose process's inbox is full goes to a node that can hear it
        await register(p2, "n2", max_c=1)
        await register(p1, "n3", max_c=1)
        await p1.drain("n1")
        for _ in range(2):
            await p1.client.xadd(p1.cells["c0"].inbox("p2"), {"e": "{}"})
        d = await p1.dispatch(job("s1", 0))
        assert d.node == "n3" and d.status == "assigned"
    finally:
        await p1.aclose()
        await p2.aclose()


# --- 3. a dead scheduler process's nodes ------------------------------------------------------------------


async def test_a_dead_process_nodes_go_offline_and_their_jobs_move_on(store: Store, p2: Store, settings) -> None:
    """Loss path 3 (first half): the reaper takes the nodes of a process whose registration lapsed
    offline in the same step, so their jobs move on at once instead of waiting for leases."""
    await store.touch_proc(ttl_ms=600_000)
    await p2.touch_proc(ttl_ms=1_000)
    await register(p2, "n2")  # its socket is on p2
    await register(store, "n1")
    await store.drain("n1")
    d = await store.dispatch(job())
    assert d.node == "n2"
    await store.drain("n1", on=False)
    # p2's registration lapsed over proc_ttl_ms ago (dead to the reaper); n2's heartbeat deadline has not passed
    await store.set_clock_offset(1_000 + settings.proc_ttl_ms + 1_000)
    effects = await reap_all(store)
    assert (await store.node("n2"))["state"] == "offline"
    assert [(e.kind, e.job, e.node, e.attempt) for e in effects] == [("assign", d.job_id, "n1", 2)]
    assert await store.client.exists(store.cells["c0"].inbox("p2")) == 0


async def test_after_an_outage_the_first_reaper_does_not_bury_a_process_a_moment_behind(
        store: Store, p2: Store, settings) -> None:
    """A Redis outage (a Cluster failover) lets every registration lapse at once. The first reaper
    to run afterwards must not take the nodes of a process whose renewal is a moment behind its
    own: a process is dead to the reaper once lapsed for a further proc_ttl_ms."""
    ttl = settings.proc_ttl_ms
    await store.touch_proc(ttl_ms=ttl)
    await p2.touch_proc(ttl_ms=ttl)
    await register(p2, "n2")
    await store.set_clock_offset(ttl + 500)  # the outage: both lapsed
    assert [r.dead_procs for r in await store.reap()] == [0]
    assert (await store.node("n2"))["state"] == "ready"
    await p2.touch_proc(ttl_ms=ttl)  # p2's renewal, a moment later
    await store.set_clock_offset(2 * ttl + 1_000)  # p2 renewed within its grace: alive
    assert [r.dead_procs for r in await store.reap()] == [0]
    await store.set_clock_offset(4 * ttl + 2_000)  # p2 silent ever since: dead
    await store.touch_proc(ttl_ms=600_000)
    assert [r.dead_procs for r in await store.reap()] == [1]
    assert (await store.node("n2"))["state"] == "offline"


async def test_a_node_registering_again_gets_back_the_jobs_it_holds(store: Store) -> None:
    """Loss path 3 (second half): jobs assigned to a node through a process that then died were never
    received; when the node registers again they are sent to it again, same attempt (a node that has
    them ignores the repeat), and `used` is rebuilt from the jobs Redis still knows."""
    await register(store, "n1", max_c=2)
    a = await store.dispatch(job(utt=0))
    b = await store.dispatch(job(utt=1))
    await store.complete(a.job_id, "n1", 1, "completed", payload="{}")
    # a job the node's record names but Redis no longer has (lost writes) leaves it
    held = await store.client.hget(store.cells["c0"].node("n1"), "jobs")
    await store.client.hset(store.cells["c0"].node("n1"), "jobs", held.decode() + " c0.gone")
    again = await register(store, "n1", max_c=2, conn="conn-new")
    assert (again.used, again.held) == (1, 1)
    assert [(e.kind, e.job, e.attempt, e.payload) for e in again.effects] == [
        ("assign", b.job_id, 1, json.dumps({"utt": 1}))]
    assert (await store.slot_report())["violations"] == []


# --- 4. a dead scheduler process's sessions --------------------------------------------------------------


async def test_a_dead_process_sessions_wait_for_a_resume_then_are_abandoned(store: Store, p2: Store, settings) -> None:
    """Loss path 4: the sessions of a dead process become orphans: their jobs go on and their
    outcomes wait in Redis for a client that resumes within the grace period; past it the reaper
    cancels what they were still owed (queued jobs leave their queue, running ones get job_cancel)."""
    await store.touch_proc(ttl_ms=600_000)
    await p2.touch_proc(ttl_ms=1_000)
    await register(store, "n1", max_c=1)
    await p2.open_session("s2", "{}")
    running = await p2.dispatch(job("s2", 0))
    waiting = await p2.dispatch(job("s2", 1))
    assert (running.status, waiting.status) == ("assigned", "queued")
    dead = 1_000 + settings.proc_ttl_ms + 1_000
    await store.set_clock_offset(dead)  # p2 is dead (lapsed over proc_ttl_ms ago)
    await reap_all(store)
    assert (await store.session("s2"))["state"] == "orphan"
    assert (await store.job(waiting.job_id))["state"] == "queued"  # still owed: kept for a resume
    await store.set_clock_offset(dead + settings.session_grace_ms + 1)
    await store.heartbeat("n1", conn="conn-n1")
    effects = await reap_all(store)
    assert kinds(effects) == [("cancel", running.job_id, "n1")]
    assert await store.session("s2") is None
    assert await store.unfinished_jobs() == []
    assert (await store.slot_report())["used"] == 0


async def test_a_resume_point_is_one_field_written_with_the_dispatch_and_read_back_by_a_resume(store: Store) -> None:
    await register(store, "n1")
    await store.open_session("s1", "{}")
    key = store.cells["c0"].sess("s1")
    assert await store.client.hget(key, "resume") == b"0 0 0 -1"
    await store.dispatch(job("s1", 0, commit=(1, 10, 3, -1)))
    assert await store.client.hget(key, "resume") == b"1 10 3 -1"
    assert not await store.client.hexists(key, "next_utt")
    [home] = await store.resume_session("s1")
    assert (home.next_utt, home.seq, home.skip, home.cutt) == (1, 10, 3, -1)


async def test_a_session_recorded_before_its_resume_point_was_one_field_resumes_where_it_was(store: Store) -> None:
    """A rolling upgrade: the record was written by the earlier version, one field each."""
    await store.open_session("s1", "{}")
    key = store.cells["c0"].sess("s1")
    await store.client.hdel(key, "resume")
    await store.client.hset(key, mapping={"next_utt": 4, "seq": 9, "skip": 2, "cutt": -1})
    [home] = await store.resume_session("s1")
    assert (home.status, home.next_utt, home.seq, home.skip, home.cutt) == (Status.RESUMED, 4, 9, 2, -1)


async def test_resume_takes_the_session_over_with_everything_it_is_owed(store: Store, p2: Store) -> None:
    """Loss path 4: a client that resumes (on any process) gets each outcome still owed, its kept
    result included, and the outcomes still to come now go to the new process."""
    await store.touch_proc(ttl_ms=600_000)
    await p2.touch_proc(ttl_ms=600_000)
    await register(store, "n1", max_c=2)
    await p2.open_session("s2", json.dumps({"spec": 1}))
    done = await p2.dispatch(job("s2", 0, commit=(1, 10, 0, -1)))
    running = await p2.dispatch(job("s2", 1, commit=(2, 12, 40, -1), session_proc="p2"))
    await store.complete(done.job_id, "n1", 1, "completed", payload='{"text":"kept"}')
    [home] = await store.resume_session("s2")  # p1 takes it over
    assert (home.status, home.epoch, home.spec, home.next_utt, home.seq, home.skip) == (
        Status.RESUMED, 2, json.dumps({"spec": 1}), 2, 12, 40)
    owed = {j.job: (j.state, j.result) for j in home.jobs}
    assert owed == {done.job_id: (JobState.COMPLETED, '{"text":"kept"}'), running.job_id: (JobState.ASSIGNED, None)}
    finished = await store.complete(running.job_id, "n1", 1, "completed", payload='{"text":"new"}')
    assert [(e.kind, e.session) for e in finished.effects] == [("outcome", "s2")]  # now for p1
    # the old holder is superseded: it may no longer dispatch for the session
    stale = await p2.dispatch(job("s2", 2, epoch=1))
    assert stale.status == Status.SUPERSEDED
    assert [(e.kind, e.session) for _, e in await p2.read_inbox("c0", "0-0", 10)] == [
        ("outcome", "s2"), ("superseded", "s2")]  # the outcome from before the resume, then the news


# --- 5. Redis loses its data --------------------------------------------------------------------------------


async def test_the_data_generation_marker_changes_when_redis_loses_its_data(store: Store) -> None:
    """Loss path 5: a process sees Redis lost its data (the cell's boot marker changed) within a
    reaper call, and re-registers what it holds."""
    first = (await store.touch_proc())["c0"]
    assert first.revived and (await store.reap())[0].boot == first.boot
    await store.client.flushall()
    assert (await store.reap())[0].boot == ""
    second = (await store.touch_proc())["c0"]
    assert second.boot and second.boot != first.boot
    assert second.revived  # it had to register anew: what Redis knew of it is gone


async def test_a_process_declared_dead_while_alive_learns_it_and_the_reaper_never_buries_itself(
        store: Store, p2: Store) -> None:
    """Redis stalled longer than a process's registration: its own reaper renews it instead of
    reaping it; another's reaper may reap it, and its next renewal says so (it registers again)."""
    await store.touch_proc(ttl_ms=1_000)
    await p2.touch_proc(ttl_ms=600_000)
    await store.open_session("s1", "{}")
    await store.set_clock_offset(5_000)
    own = await store.reap()  # its own reaper: still registered (renewed, and not counted as dead)
    assert [r.dead_procs for r in own] == [0]
    assert await store.session("s1") and (await store.session("s1"))["state"] == "live"
    await store.set_clock_offset(20_000)
    other = await p2.reap()  # another's, once it has been lapsed over proc_ttl_ms: dead, its session an orphan
    assert [r.dead_procs for r in other] == [1]
    assert (await store.session("s1"))["state"] == "orphan"
    assert (await store.touch_proc())["c0"].revived
    await store.reclaim_session("s1", "{}", 1)
    record = await store.session("s1")
    assert (record["state"], record["proc"]) == ("live", store.proc)
    assert await store.client.zcard(store.cells["c0"].orphans) == 0


async def test_right_after_a_data_loss_a_pool_without_nodes_queues_instead_of_failing(redis_url, settings) -> None:
    """Loss path 5: while the nodes are still registering again (the warm-up), a job for a pool with
    no node waits in the queue instead of failing NO_AVAILABLE_NODE; the first node takes it."""
    warm = Store.from_url(redis_url, settings.replace(warmup_ms=60_000), proc="p1", test_clock=True)
    try:
        await warm.touch_proc()
        d = await warm.dispatch(job())
        assert d.status == Status.QUEUED
        r = await register(warm, "n1")
        assert [(e.kind, e.job) for e in r.effects] == [("assign", d.job_id)]
        await warm.set_clock_offset(61_000)
        late = await warm.dispatch(job("s9"))
        assert (late.status, late.code) == (Status.QUEUED, "")  # n1 is busy: an ordinary wait
        await warm.drain("n1")
        gone = await warm.dispatch(job("s10"))
        assert (gone.status, gone.code) == (Status.FAILED, "NO_AVAILABLE_NODE")  # warm-up over
    finally:
        await warm.aclose()


# --- 6/7. a stalled Redis, a lost reply ---------------------------------------------------------------------


async def test_a_result_during_a_redis_stall_is_recorded_once_and_its_outcome_delivered(redis_url, settings) -> None:
    """Loss paths 6 and 7: the completion times out while Redis is stalled; the script still runs
    when Redis wakes, the retry finds it done and answers "duplicate" with the outcome again, so the
    outcome reaches the session exactly once whichever reply arrives."""
    quick = Store.from_url(redis_url, settings.replace(redis_retry_ms=10_000), proc="p1", test_clock=True)
    quick.client.connection_pool.connection_kwargs["socket_timeout"] = 0.3
    admin = aioredis.Redis.from_url(redis_url)
    try:
        await register(quick, "n1")
        d = await quick.dispatch(job())
        await admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
        done = await quick.complete(d.job_id, "n1", 1, "completed", payload='{"t":1}')
        assert done.status in (Status.COMPLETED, Status.DUPLICATE)
        assert [(e.kind, e.job, e.payload) for e in done.effects] == [("outcome", d.job_id, '{"t":1}')]
        assert (await quick.job(d.job_id))["state"] == "completed"
        assert (await quick.slot_report())["used"] == 0
    finally:
        await admin.aclose()
        await quick.aclose()


async def test_a_retried_call_gets_the_reply_it_lost(store: Store) -> None:
    """Loss path 7: transitions whose repeat could not recompute their effects keep their reply
    under the call's id; the retry (same id) gets the same effects."""
    await register(store, "n1")
    await register(store, "n2")
    d = await store.dispatch(job())
    ck = store.cells["c0"]
    args = [store.proc, d.node, f"conn-{d.node}", "socket_closed", "call-1"]
    first = await store.scripts.call("node_offline", [ck.nodes, ck.node(d.node)], args)
    again = await store.scripts.call("node_offline", [ck.nodes, ck.node(d.node)], args)
    assert first == again and b"assign" in first[1]


# --- 8. poison numbers -----------------------------------------------------------------------------------


async def test_one_undecodable_effect_never_takes_the_others_with_it(store: Store) -> None:
    good = json.dumps({"kind": "cancel", "job": "c0.a", "node": "n1"})
    bad = json.dumps({"kind": "outcome", "job": "c0.b", "utt": "1.5e"})  # not an integer, even read leniently
    effects = store._effects("test", f"[{good},{bad},{good}]".encode(), [], "c0", None, None)
    assert [(e.kind, e.job) for e in effects] == [("cancel", "c0.a"), ("cancel", "c0.a")]
    assert store.undecodable_effects == 1


# --- 10. heartbeat re-pooling is validated like registration ------------------------------------------------


async def test_heartbeat_pools_are_checked_like_registration(store: Store, settings) -> None:
    await register(store, "n1")
    before = await snapshot(store.client)
    with pytest.raises(ValueError, match="pool id"):
        await store.heartbeat("n1", conn="conn-n1", pools=["zh en>de"])
    with pytest.raises(ValueError, match="allowed per node"):
        await store.heartbeat("n1", conn="conn-n1", pools=[f"l{i}>en" for i in range(settings.max_pools_per_node + 1)])
    assert await snapshot(store.client) == before


# --- 12. no script errors after its first write -----------------------------------------------------------


async def test_a_refused_dispatch_changes_nothing(store: Store, settings) -> None:
    await register(store, "n1")
    ck = store.cells["c0"]
    before = await snapshot(store.client)
    for bad in ({"i": 7, "v": 0}, {"i": 10, "v": 0}, {"i": 5, "v": -1}, {"i": 16, "v": "1 2"},
                {"i": 16, "v": "1 2 3 -2"}, {"i": 16, "v": "1 2 3 x"}, {"i": 16, "v": "1  2 3 4"}):
        with pytest.raises(Exception, match="dragoman"):
            await raw_dispatch(store, {bad["i"]: bad["v"]})
    assert await snapshot(store.client) == before
    with pytest.raises(ScriptError, match="job_timeout_ms"):
        await store._call("dispatch_task", ck, [ck.nodes, ck.job("c0.x"), ck.pool(ZH_EN), ck.sess("s1")],
                          dispatch_argv(store.proc, {7: 0}), DispatchReply)


# --- security: only the holder speaks for a job or a node ----------------------------------------------------


async def test_a_partial_is_relayed_only_from_the_jobs_holder(store: Store) -> None:
    await register(store, "n1")
    await register(store, "n2")
    d = await store.dispatch(job())
    other = "n2" if d.node == "n1" else "n1"
    ok = await store.relay_partial(d.job_id, d.node, "s1", 0, '{"type":"asr_partial"}')
    assert ok.status == Status.RELAYED and [e.kind for e in ok.effects] == [EffectKind.PARTIAL]
    for args in ((other, "s1", 0), (d.node, "s-victim", 0), (d.node, "s1", 7)):
        refused = await store.relay_partial(d.job_id, *args, '{"type":"asr_partial","text":"FORGED"}')
        assert refused.status == Status.REJECTED and refused.effects == []


async def test_a_live_node_id_cannot_be_taken_over(store: Store, p2: Store) -> None:
    await store.touch_proc()
    await register(store, "n1", conn="real")
    taken = await p2.register_node("n1", conn="forger", max_concurrency=1, pools=[ZH_EN])
    assert taken.status == Status.IN_USE and taken.proc == store.proc
    assert (await store.node("n1"))["conn"] == "real"
    # once the holder says that connection is gone, the new one may register
    forced = await store.register_node("n1", conn="next", max_concurrency=1, pools=[ZH_EN], force=True)
    assert forced.status == Status.REGISTERED


async def test_with_node_tokens_an_id_stays_bound_to_its_token(store: Store) -> None:
    await store.register_node("n1", conn="a", max_concurrency=1, pools=[ZH_EN], owner="token-a")
    await store.node_offline("n1", conn="a")
    other = await store.register_node("n1", conn="b", max_concurrency=1, pools=[ZH_EN], owner="token-b")
    assert other.status == Status.FORBIDDEN
    same = await store.register_node("n1", conn="c", max_concurrency=1, pools=[ZH_EN], owner="token-a")
    assert same.status == Status.REGISTERED


async def test_sessions_and_jobs_leave_nothing_behind(store: Store) -> None:
    """Every job ends and is forgotten once its outcome is acknowledged or its session ends."""
    await register(store, "n1", max_c=4)
    await store.open_session("s1", "{}")
    ds = [await store.dispatch(job("s1", i)) for i in range(3)]
    await store.complete(ds[0].job_id, "n1", 1, "completed", payload="{}")
    await store.ack("s1", [ds[0].job_id])
    assert await store.job(ds[0].job_id) is None
    await store.close_session("s1", 1, detach=False)
    keys = {k.decode() for k in await store.client.keys("*")}
    assert not [k for k in keys if ":job:" in k or ":sess:" in k]
    assert (await store.slot_report())["used"] == 0
    await asyncio.sleep(0)
