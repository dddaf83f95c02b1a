"""Each transition script against the real embedded server."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from dragoman.errors import DependencyDown, ScriptError
from dragoman.store.api import JobSpec, Store
from dragoman.store.keys import CellKeys
from dragoman.store.replies import Reply
from dragoman.store.scripts import LUA_DIR, ScriptLoadError, Scripts, build_library, discover
from tests.helpers import raw_dispatch, snapshot

ZH_EN = "zh>en"


def job(session: str = "s1", utt: int = 0, pool: str = ZH_EN, tgt: str = "en", **kw) -> JobSpec:
    return JobSpec(pool=pool, session_id=session, utterance_index=utt, tgt_lang=tgt, body='{"a":1}', **kw)


async def register(store: Store, nid: str, max_c: int = 1, pools=(ZH_EN,)) -> None:
    r = await store.register_node(nid, conn=f"conn-{nid}", max_concurrency=max_c, pools=list(pools))
    assert r.status == "registered"


async def command_calls(store: Store, name: str) -> int:
    """How many times the server ran command ``name`` so far (scripts' own calls included)."""
    return int((await store.client.info("commandstats")).get(f"cmdstat_{name}", {}).get("calls", 0))


async def reap_all(store: Store):
    effects = []
    while True:
        replies = await store.reap()
        for r in replies:
            effects += r.effects
        if not any(r.more for r in replies):
            return effects


async def test_no_pool_gives_no_available_node(store: Store) -> None:
    d = await store.dispatch(job())
    assert (d.status, d.code) == ("failed", "NO_AVAILABLE_NODE")
    assert [(e.kind, e.state, e.code) for e in d.effects] == [("outcome", "failed", "NO_AVAILABLE_NODE")]
    assert (await store.job(d.job_id))["state"] == "failed"


async def test_full_pool_queues_then_completion_hands_over_the_slot(store: Store) -> None:
    await register(store, "n1", max_c=1)
    first = await store.dispatch(job(utt=0))
    second = await store.dispatch(job(utt=1))
    assert first.status == "assigned" and second.status == "queued"
    pools = {p["pool"]: p for p in await store.pools()}
    assert pools[ZH_EN]["queue_depth"] == 1
    done = await store.complete(first.job_id, "n1", 1, "completed", payload="{}")
    kinds = {(e.kind, e.job) for e in done.effects}
    assert ("outcome", first.job_id) in kinds and ("assign", second.job_id) in kinds
    j2 = await store.job(second.job_id)
    assert (j2["state"], j2["node"], j2["attempt"]) == ("assigned", "n1", "1")
    assert (await store.node("n1"))["used"] == "1"


async def test_queue_is_bounded(store: Store, settings) -> None:
    await register(store, "n1", max_c=1)
    await store.dispatch(job(utt=0))
    for i in range(settings.queue_max):
        assert (await store.dispatch(job(utt=1 + i))).status == "queued"
    over = await store.dispatch(job(utt=99))
    assert (over.status, over.code) == ("failed", "NODE_OVERLOADED")


async def test_wrong_node_or_stale_attempt_is_rejected_and_changes_nothing(store: Store) -> None:
    await register(store, "n1")
    await register(store, "n2")
    d = await store.dispatch(job())
    other = "n2" if d.node == "n1" else "n1"
    before = await snapshot(store.client)
    r1 = await store.complete(d.job_id, other, 1, "completed", payload="{}")
    r2 = await store.complete(d.job_id, d.node, 2, "completed", payload="{}")
    r3 = await store.complete("c0.nope", d.node, 1, "completed", payload="{}")
    assert (r1.status, r1.reason) == ("rejected", "stale")
    assert (r2.status, r2.reason) == ("rejected", "stale")
    assert (r3.status, r3.reason) == ("rejected", "unknown_job")
    assert r1.effects == r2.effects == r3.effects == []
    assert await snapshot(store.client) == before


async def test_repeated_completion_is_idempotent(store: Store) -> None:
    await register(store, "n1")
    d = await store.dispatch(job())
    first = await store.complete(d.job_id, "n1", 1, "completed", payload="{}")
    assert first.status == "completed"
    before = await snapshot(store.client)
    again = await store.complete(d.job_id, "n1", 1, "completed", payload="{}")
    assert again.status == "duplicate"
    assert await snapshot(store.client) == before
    # A repeat may be our own retry after a lost reply: the local outcome comes again (the session
    # ignores one it already has), never a second change.
    assert [(e.kind, e.job, e.payload) for e in again.effects] == [("outcome", d.job_id, "{}")]


async def test_repeated_dispatch_takes_no_second_slot(store: Store) -> None:
    await register(store, "n1", max_c=2)
    spec = job()
    d1 = await store.dispatch(spec)
    before = await snapshot(store.client)
    d2 = await store.dispatch(spec)
    assert d2.status == "exists" and (d2.state, d2.node, d2.attempt) == ("assigned", "n1", 1)
    assert d2.job_id == d1.job_id
    assert await snapshot(store.client) == before
    assert (await store.node("n1"))["used"] == "1"
    # the node is this process's: its assignment comes again, for a caller whose reply was lost
    assert [(e.kind, e.job, e.attempt, e.payload) for e in d2.effects] == [("assign", d1.job_id, 1, '{"a":1}')]


async def test_dead_node_jobs_are_reassigned_then_fail_after_attempt_cap(store: Store, settings) -> None:
    await register(store, "n1")
    d = await store.dispatch(job())
    assert d.node == "n1"
    await register(store, "n2")
    # n1 stops heartbeating; n2 keeps going.
    await store.set_clock_offset(settings.node_ttl_ms - 1000)
    await store.heartbeat("n2", conn="conn-n2")
    await store.set_clock_offset(settings.node_ttl_ms + 1)
    effects = await reap_all(store)
    assigns = [e for e in effects if e.kind == "assign"]
    assert [(e.job, e.node, e.attempt) for e in assigns] == [(d.job_id, "n2", 2)]
    assert (await store.node("n1"))["state"] == "offline"
    # A late result from attempt 1 is rejected.
    late = await store.complete(d.job_id, "n1", 1, "completed", payload="{}")
    assert late.reason == "stale"
    # n2 dies too, then a third node comes and dies: attempt cap (3) ends it with JOB_TIMEOUT.
    await register(store, "n3")
    await store.set_clock_offset(2 * settings.node_ttl_ms - 500)  # n2 is past its deadline, n3 is not
    effects = await reap_all(store)
    assert [(e.kind, e.node, e.attempt) for e in effects if e.kind == "assign"] == [("assign", "n3", 3)]
    await store.set_clock_offset(3 * settings.node_ttl_ms + 3)
    effects = await reap_all(store)
    outcomes = [e for e in effects if e.kind == "outcome"]
    assert [(e.job, e.state, e.code) for e in outcomes] == [(d.job_id, "failed", "JOB_TIMEOUT")]
    assert (await store.slot_report())["violations"] == []


async def test_socket_close_moves_jobs_at_once_and_is_fenced_by_connection(store: Store) -> None:
    await register(store, "n1")
    assert (await store.dispatch(job())).node == "n1"
    stale = await store.node_offline("n1", conn="an-old-connection")
    assert stale.status == "superseded"
    await register(store, "n2")
    gone = await store.node_offline("n1", conn="conn-n1")
    assert gone.status == "offline" and gone.jobs == 1
    # its job moves on at once; the node is told to stop it (in case it is alive after all)
    assert sorted((e.kind, e.node, e.attempt) for e in gone.effects) == [("assign", "n2", 2), ("cancel", "n1", 1)]
    assert (await store.heartbeat("n1", conn="conn-n1")).status == "unknown"
    assert (await store.node("n1"))["used"] == "0"


async def test_lease_expiry_cancels_and_reassigns(store: Store, settings) -> None:
    await register(store, "n1")
    await register(store, "n2")
    d = await store.dispatch(job())
    holder = d.node
    await store.set_clock_offset(settings.job_timeout_ms + 1)
    for n in ("n1", "n2"):  # both alive: only the lease ran out
        await store.heartbeat(n, conn=f"conn-{n}")
    effects = await reap_all(store)
    cancel = [e for e in effects if e.kind == "cancel"]
    assign = [e for e in effects if e.kind == "assign"]
    assert [(e.job, e.node) for e in cancel] == [(d.job_id, holder)]
    assert [(e.job, e.attempt) for e in assign] == [(d.job_id, 2)]
    assert assign[0].node != holder


async def test_the_lease_index_wakes_the_reaper_early_never_late(store: Store, settings, redis_url: str) -> None:
    """The lease index scores a node, not each job: no later than the earliest lease of the jobs it
    holds. A job taken with a later lease writes nothing to it, a slot given back neither; a node
    whose score comes due with nothing expired is scored again from its jobs, and a job taken with
    an earlier lease lowers the score at once."""
    ck = store.cells["c0"]

    async def index() -> tuple[int | None, str | None]:
        score = await store.client.zscore(ck.leases, "n1")
        at = await store.client.hget(ck.node("n1"), "lease_at")
        return (int(score) if score is not None else None), (at.decode() if at is not None else None)

    await register(store, "n1", max_c=3)
    a = await store.dispatch(job(utt=0))
    lease_a = int((await store.job(a.job_id))["lease"])
    assert await index() == (lease_a, str(lease_a))
    half = settings.job_timeout_ms // 2
    await store.set_clock_offset(half)
    await store.heartbeat("n1", conn="conn-n1")
    b = await store.dispatch(job(utt=1))
    lease_b = int((await store.job(b.job_id))["lease"])
    assert lease_b > lease_a and await index() == (lease_a, str(lease_a))  # (later: nothing written)
    await store.complete(a.job_id, "n1", 1, "completed", payload="{}")
    assert await index() == (lease_a, str(lease_a))  # (given back: nothing written)

    # a's lease time passes: nothing expired, n1 is scored from b
    await store.set_clock_offset(settings.job_timeout_ms + 1)
    await store.heartbeat("n1", conn="conn-n1")
    effects = await reap_all(store)
    assert [e for e in effects if e.kind == "cancel"] == []
    assert await index() == (lease_b, str(lease_b))
    assert (await store.job(b.job_id))["state"] == "assigned"

    # a job whose lease ends earlier (a shorter job_timeout) lowers the score
    hurried = Store.from_url(redis_url, dataclasses.replace(settings, job_timeout_ms=1_000), proc=store.proc,
                             test_clock=True)
    try:
        c = await hurried.dispatch(job(utt=2))
        lease_c = int((await store.job(c.job_id))["lease"])
        assert c.node == "n1" and lease_c < lease_b and await index() == (lease_c, str(lease_c))
    finally:
        await hurried.aclose()

    # b's lease passes: b is cancelled on n1 and placed again (n1 is the only node: attempt 2)
    await store.set_clock_offset(half + settings.job_timeout_ms + 1)
    await store.heartbeat("n1", conn="conn-n1")
    effects = await reap_all(store)
    assert sorted((e.kind, e.job, e.attempt) for e in effects if e.job == b.job_id) == [
        ("assign", b.job_id, 2), ("cancel", b.job_id, 1)]
    # (c's lease passed long before: it was placed again too, with its own 1 s lease)
    held = [await store.job(j.job_id) for j in (b, c)]
    assert [(h["state"], h["node"], h["attempt"]) for h in held] == [("assigned", "n1", "2")] * 2
    first = min(int(h["lease"]) for h in held)
    assert await index() == (first, str(first))


async def test_pending_timeout_fails_queued_job(store: Store, settings) -> None:
    await register(store, "n1")
    await store.dispatch(job(utt=0))
    q = await store.dispatch(job(utt=1))
    assert q.status == "queued"
    await store.set_clock_offset(settings.pending_timeout_ms + 1)
    await store.heartbeat("n1", conn="conn-n1")
    effects = await reap_all(store)
    assert [(e.job, e.code) for e in effects if e.kind == "outcome"] == [(q.job_id, "JOB_TIMEOUT")]


async def test_draining_node_gets_nothing_new_and_keeps_running_jobs(store: Store) -> None:
    await register(store, "n1", max_c=4)
    d = await store.dispatch(job(utt=0))
    r = await store.heartbeat("n1", conn="conn-n1", draining=True)
    assert r.state == "draining"
    # the only node of the pool is draining: nobody serves the pair
    assert (await store.dispatch(job(utt=1))).code == "NO_AVAILABLE_NODE"
    await register(store, "n2", max_c=1)
    busy = await store.dispatch(job(utt=2))
    assert busy.node == "n2"
    q = await store.dispatch(job(utt=3))
    assert q.status == "queued"  # n1 has 3 free slots but is draining
    assert (await store.complete(d.job_id, "n1", 1, "completed", payload="{}")).status == "completed"
    assert (await store.job(q.job_id))["state"] == "queued"
    # the node's own undrain puts it back to work
    back = await store.heartbeat("n1", conn="conn-n1", draining=False)
    assert back.state == "ready"
    assert (await store.job(q.job_id))["node"] == "n1"


async def test_operator_drain_sticks_until_undrained(store: Store) -> None:
    await register(store, "n1")
    assert (await store.drain("n1")).state == "draining"
    assert (await store.heartbeat("n1", conn="conn-n1", draining=False)).state == "draining"
    assert (await store.dispatch(job())).code == "NO_AVAILABLE_NODE"
    assert (await store.drain("n1", on=False)).state == "ready"
    assert (await store.dispatch(job(utt=1))).status == "assigned"


async def test_lowered_capacity_takes_effect_as_jobs_finish(store: Store) -> None:
    await register(store, "n1", max_c=2)
    a = await store.dispatch(job(utt=0))
    b = await store.dispatch(job(utt=1))
    again = await store.register_node("n1", conn="conn-2", max_concurrency=1, pools=[ZH_EN])
    assert (again.max, again.used) == (2, 2)  # never used > max (I1)
    await store.complete(a.job_id, "n1", 1, "completed", payload="{}")
    assert (await store.node("n1"))["max"] == "1"
    await store.complete(b.job_id, "n1", 1, "completed", payload="{}")
    node = await store.node("n1")
    assert (node["max"], node["used"], "max_target" in node) == ("1", "0", False)
    assert (await store.slot_report())["violations"] == []


async def test_more_calls_at_once_than_pool_connections(store: Store) -> None:
    await register(store, "n1", max_c=1)
    replies = await asyncio.gather(*(store.heartbeat("n1", conn="conn-n1") for _ in range(400)))
    assert {r.status for r in replies} == {"ok"}


async def test_a_drain_outlives_a_reconnect(store: Store) -> None:
    await register(store, "n1")
    await store.drain("n1")
    again = await store.register_node("n1", conn="conn-2", max_concurrency=1, pools=[ZH_EN])
    assert again.state == "draining"
    assert (await store.dispatch(job())).code == "NO_AVAILABLE_NODE"


async def test_an_old_connection_cannot_revive_a_node(store: Store) -> None:
    await register(store, "n1")
    await store.register_node("n1", conn="newer", max_concurrency=1, pools=[ZH_EN])
    await store.node_offline("n1", conn="newer")
    assert (await store.heartbeat("n1", conn="conn-n1")).status == "superseded"


async def test_session_affinity_and_load_spreading(store: Store) -> None:
    await register(store, "n1", max_c=4)
    await register(store, "n2", max_c=4)
    a = await store.dispatch(job(session="s1", utt=0))
    b = await store.dispatch(job(session="s2", utt=0))
    assert {a.node, b.node} == {"n1", "n2"}  # spread: the emptier node wins
    c = await store.dispatch(job(session="s1", utt=1))
    assert c.node == a.node  # affinity: s1 stays on its node while it has a free slot


async def test_avoid_is_soft(store: Store) -> None:
    await register(store, "n1", max_c=2)
    await register(store, "n2", max_c=1)
    d = await store.dispatch(job(avoid=("n1",)))
    assert d.node == "n2"
    d2 = await store.dispatch(job(utt=1, avoid=("n1", "n2")))
    assert d2.node == "n1"


async def test_cancel_running_and_queued(store: Store) -> None:
    await register(store, "n1")
    a = await store.dispatch(job(utt=0))
    b = await store.dispatch(job(utt=1))
    cq = await store.cancel(b.job_id)
    assert cq.status == "cancelled"
    ca = await store.cancel(a.job_id)
    kinds = sorted((e.kind, e.job) for e in ca.effects)
    assert kinds == [("cancel", a.job_id), ("outcome", a.job_id)]
    assert (await store.node("n1"))["used"] == "0"
    assert (await store.cancel(a.job_id)).status == "finished"


async def test_register_refuses_bad_capacity_and_changes_nothing(store: Store) -> None:
    before = await snapshot(store.client)
    with pytest.raises(ScriptError, match="max_concurrency"):
        await store.register_node("n1", conn="c", max_concurrency=0, pools=[ZH_EN])
    with pytest.raises(ValueError, match="pool id"):
        await store.register_node("n1", conn="c", max_concurrency=1, pools=["zh en"])
    assert await snapshot(store.client) == before


async def test_language_change_repools_node_and_pools_shrink(store: Store) -> None:
    await register(store, "n1", pools=(ZH_EN,))
    await register(store, "n2", pools=(ZH_EN,))
    await store.heartbeat("n1", conn="conn-n1", pools=["de>en"])
    pools = {p["pool"]: (p["nodes"], p["registered"]) for p in await store.pools()}
    assert pools == {"de>en": (["n1"], 1), ZH_EN: (["n2"], 1)}
    await store.heartbeat("n2", conn="conn-n2", pools=["de>en"])
    pools = {p["pool"]: (p["nodes"], p["registered"]) for p in await store.pools()}
    assert pools == {"de>en": (["n1", "n2"], 2)}  # nobody serves zh>en any more: it is gone


async def test_survives_function_flush(store: Store) -> None:
    """A server that lost the library answers "Function not found"; the call loads it and runs."""
    await register(store, "n1")
    await store.client.function_flush()
    assert await store.client.execute_command("FUNCTION", "LIST") == []
    d = await store.dispatch(job())
    assert d.status == "assigned"
    assert (await store.client.execute_command("FUNCTION", "LIST"))[0][b"library_name"] == \
        store.scripts.library.name.encode()


async def test_effects_for_sockets_on_other_processes_go_to_their_inbox(store: Store, redis_url, settings) -> None:
    other = Store.from_url(redis_url, settings, proc="p2")
    try:
        await store.touch_proc()  # both processes are registered: only live processes get inbox entries
        await other.touch_proc()
        await other.register_node("n9", conn="c9", max_concurrency=1, pools=[ZH_EN])  # socket held by p2
        d = await store.dispatch(job())  # dispatched by p1 for a session on p1
        assert d.node == "n9" and d.effects == []  # the assignment went to p2's inbox
        got = await other.read_inbox("c0", "0", block_ms=100)
        assert [(e.kind, e.job, json.loads(e.payload)) for _, e in got] == [("assign", d.job_id, {"a": 1})]
        done = await other.complete(d.job_id, "n9", 1, "completed", payload='{"text":"hi"}')
        assert done.effects == []  # the outcome went to p1's inbox, with the result
        mine = await store.read_inbox("c0", "0", block_ms=100)
        assert [(e.kind, e.payload) for _, e in mine] == [("outcome", '{"text":"hi"}')]
    finally:
        await other.aclose()


async def test_lua_key_names_match_keys_py(store: Store) -> None:
    src = (Path(__file__).parents[3] / "src/dragoman/store/lua/includes/keys.lua").read_text()
    names = ["node", "pool", "queue", "job", "sess", "inbox", "proc_nodes", "proc_sessions", "reply"]
    fixed = ["nodes", "pools", "pools_gone", "leases", "pending", "orphans", "stats", "events", "procs", "clock",
             "offline", "boot"]
    body = src + "\nreturn {" + ",".join(f"k_{n}(ARGV[1], 'X')" for n in names) + "," + ",".join(
        f"k_{n}(ARGV[1])" for n in fixed) + "}"
    ck = CellKeys("dragoman", "c0")
    got = [v.decode() for v in await store.client.eval(body, 0, ck.base)]
    want = [getattr(ck, n)("X") for n in names] + [getattr(ck, n) for n in fixed]
    assert got == want


async def test_the_library_holds_each_include_once_after_what_it_includes(tmp_path: Path, store: Store) -> None:
    inc = tmp_path / "includes"
    inc.mkdir()
    (inc / "a.lua").write_text('--- @include "includes/b"\nlocal A = 1\n')
    (inc / "b.lua").write_text("local B = 2\n")
    (inc / "c.lua").write_text("local function c(x) return x * 10 end\n")
    (tmp_path / "s-1.lua").write_text('--- @include "includes/a"\n--- @include "includes/b"\nreturn A + B\n')
    (tmp_path / "t-0.lua").write_text('--- @include "includes/c"\n--- @include "includes/a"\nreturn c(A) + #ARGV\n')
    lib = build_library(tmp_path)
    assert lib.source.startswith(f"#!lua name={lib.name}\n")
    assert lib.source.count("local B = 2") == 1 and lib.source.index("local B") < lib.source.index("local A")
    assert discover(tmp_path)["s"].num_keys == 1 and discover(tmp_path)["t"].num_keys == 0
    scripts = Scripts(store.client, root=tmp_path)
    assert await scripts.call("s", ["k"], []) == 3  # loaded on first use ("Function not found")
    assert await scripts.call("t", [], ["x", "y"]) == 12  # KEYS and ARGV are the function's arguments
    (inc / "b.lua").write_text('--- @include "includes/a"\n')
    with pytest.raises(ScriptLoadError, match="cycle"):
        build_library(tmp_path)


def test_the_library_name_follows_its_text(tmp_path: Path) -> None:
    """Builds with other defines (the tests' clock hook) or another version live side by side on one
    server: the library and function names carry a digest of the text."""
    prod, test = build_library(), build_library(defines={"test_clock": True})
    assert prod.name != test.name and prod.functions["dispatch_task"] != test.functions["dispatch_task"]
    assert build_library().source == prod.source


async def test_every_script_is_a_function_of_the_loaded_library(store: Store) -> None:
    """The whole library compiles on the server (a body using more than Lua's 60 upvalues, or a name
    no include defines at load, would fail here) and registers one function per script file."""
    lib = store.scripts.library
    await store.scripts.load_all(store.client)
    listed = await store.client.execute_command("FUNCTION", "LIST", "LIBRARYNAME", lib.name)
    [entry] = [e for e in listed if e[b"library_name"] == lib.name.encode()]
    registered = {f[b"name"].decode() for f in entry[b"functions"]}
    files = {path.name.split("-")[0] for path in LUA_DIR.glob("*.lua")}
    assert registered == set(lib.functions.values()) and set(lib.functions) == files


def test_every_script_documents_its_keys_and_args() -> None:
    for name, spec in discover().items():
        header = spec.source.split("]]", 1)[0]
        assert "Input:" in header and "Output:" in header, name
        for i in range(1, spec.num_keys + 1):
            assert f"KEYS[{i}]" in header, f"{name}: KEYS[{i}] undocumented"


async def test_survives_a_server_restart(settings) -> None:
    from dragoman.embedded import EmbeddedServer

    server = EmbeddedServer().start()
    port = server.port
    store = Store.from_url(server.url, settings, proc="p1")
    try:
        await register(store, "n1")
        server.stop()
        server = EmbeddedServer(port=port).start()  # same address, empty and with no scripts loaded
        # The pooled connection died with the old server: the call is retried on a new connection,
        # which loads the script again (every script is retry-safe, I8).
        await register(store, "n1")
        assert (await store.dispatch(job())).status == "assigned"
    finally:
        await store.aclose()
        server.stop()


async def test_an_outage_longer_than_the_retry_budget_is_dependency_down(settings) -> None:
    from dragoman.embedded import EmbeddedServer

    server = EmbeddedServer().start()
    store = Store.from_url(server.url, settings.replace(redis_retry_ms=300), proc="p1")
    try:
        await register(store, "n1")
        server.stop()
        with pytest.raises(DependencyDown, match="register_node"):
            await register(store, "n1")
    finally:
        await store.aclose()


async def test_the_reaper_renews_its_own_lapsed_registration_for_proc_ttl_ms(redis_url: str, settings) -> None:
    """A reaper that finds its own registration lapsed (Redis stalled it) renews it for the
    configured proc_ttl_ms, not a fixed 3 s."""
    s = Store.from_url(redis_url, settings.replace(proc_ttl_ms=60_000), proc="slow", test_clock=True)
    try:
        await s.touch_proc(ttl_ms=10)
        await s.set_clock_offset(1_000)  # its registration has lapsed
        reply = (await s.reap())[0]
        deadline = await s.client.zscore(s.cells["c0"].procs, "slow")
        assert deadline >= await s.server_now_ms() + 1_000 + 50_000, reply
    finally:
        await s.aclose()


async def test_heartbeats_of_a_few_milliseconds_are_one_script_call_each_with_its_own_reply(store: Store) -> None:
    await register(store, "n1", max_c=2)
    await register(store, "n2", max_c=3)
    await store.register_node("n3", conn="newer", max_concurrency=1, pools=[ZH_EN])
    await store.drain("n2")
    before = (store.heartbeats.batches, store.heartbeats.items)
    n1, n2, n3, ghost = await asyncio.gather(
        store.heartbeat("n1", conn="conn-n1"), store.heartbeat("n2", conn="conn-n2"),
        store.heartbeat("n3", conn="older"), store.heartbeat("ghost", conn="conn-ghost"))
    assert (store.heartbeats.batches, store.heartbeats.items) == (before[0] + 1, before[1] + 4)
    assert (n1.status, n1.state, n1.max, n1.used) == ("ok", "ready", 2, 0)
    assert (n2.status, n2.state, n2.max) == ("ok", "draining", 3)
    assert n3.status == "superseded" and ghost.status == "unknown"
    assert n1.deadline == n2.deadline > 0 and n1.now == n2.now  # one call: one server time


async def test_a_heartbeat_batch_the_script_refuses_changes_nothing(store: Store) -> None:
    await register(store, "n1")
    ck = store.cells["c0"]
    before = await snapshot(store.client)
    good = ["n1", "conn-n1", "", "", "", "{}"]
    for args in ([*good, "n2"], [*good, "", "c", "", "", "", "{}"], [*good[:2], "maybe", *good[3:]]):
        with pytest.raises(ScriptError, match="dragoman"):
            await store._call("heartbeat", ck, [ck.nodes], [store.proc, 45000, "", *args], Reply)
    assert await snapshot(store.client) == before


async def test_acks_of_several_sessions_within_a_few_milliseconds_are_one_script_call(store: Store) -> None:
    """Each session gets its own count; ended jobs are forgotten and leave their session's record;
    a job that has not ended is left as it is."""
    await register(store, "n1", max_c=4)
    s1 = [await store.dispatch(job("s1", i)) for i in range(2)]
    s2 = [await store.dispatch(job("s2", i)) for i in range(2)]
    for d in (*s1, s2[0]):
        await store.complete(d.job_id, "n1", 1, "completed", payload="{}")
    before = (store.acks.batches, store.acks.items)
    a1, a2 = await asyncio.gather(store.ack("s1", [d.job_id for d in s1], batched=True),
                                  store.ack("s2", [d.job_id for d in s2], batched=True))
    assert (store.acks.batches, store.acks.items) == (before[0] + 1, before[1] + 2)
    assert (a1, a2) == (2, 1)
    for d in (*s1, s2[0]):
        assert await store.job(d.job_id) is None
    assert (await store.job(s2[1].job_id))["state"] == "assigned"
    ck = store.cells["c0"]
    assert not [k for k in await store.client.hkeys(ck.sess("s1")) if k.startswith(b"j:")]
    assert [k for k in await store.client.hkeys(ck.sess("s2")) if k.startswith(b"j:")] == [
        f"j:{s2[1].job_id}".encode()]


async def test_ended_jobs_named_by_their_session_are_forgotten_unread(store: Store) -> None:
    await register(store, "n1", max_c=4)
    done = [await store.dispatch(job("s1", i)) for i in range(3)]
    for d in done:
        await store.complete(d.job_id, "n1", 1, "completed", payload="{}")
    before = await command_calls(store, "hmget")
    assert await store.ack("s1", [done[0].job_id], ended=[d.job_id for d in done[1:]]) == 3
    assert await command_calls(store, "hmget") == before + 1  # only the job named to be read was read
    for d in done:
        assert await store.job(d.job_id) is None
    assert not [k for k in await store.client.hkeys(store.cells["c0"].sess("s1")) if k.startswith(b"j:")]
    assert await store.ack("s1", ended=[d.job_id for d in done]) == 3  # a repeat changes nothing more


async def test_a_slot_held_for_a_job_that_is_gone_is_given_back_by_the_reaper(store: Store, settings) -> None:
    """Only a faulty ack (a running job named as ended) can forget a job a node holds: its holder's
    result is then refused, and once the lease index wakes the reaper the slot comes back (I1)."""
    await register(store, "n1", max_c=1)
    d = await store.dispatch(job("s1"))
    await store.ack("s1", ended=[d.job_id])
    assert await store.job(d.job_id) is None
    r = await store.complete(d.job_id, "n1", 1, "completed", payload="{}")
    assert (r.status, r.reason) == ("rejected", "unknown_job")
    assert (await store.node("n1"))["used"] == "1"
    await store.set_clock_offset(settings.job_timeout_ms + 1)
    await store.heartbeat("n1", conn="conn-n1")
    await reap_all(store)
    assert (await store.node("n1"))["used"] == "0"
    assert (await store.slot_report())["violations"] == []
    assert (await store.dispatch(job("s2"))).node == "n1"


async def test_an_ack_batch_the_script_refuses_changes_nothing(store: Store) -> None:
    await register(store, "n1")
    d = await store.dispatch(job("s1"))
    await store.complete(d.job_id, "n1", 1, "completed", payload="{}")
    ck = store.cells["c0"]
    before = await snapshot(store.client)
    for groups in (["s1", 1, 0, d.job_id, "s2", 2, 0, "j-x"], ["s1", "one", 0, d.job_id], ["", 1, 0, d.job_id],
                   ["s1", 1, 0, d.job_id, "s2"], ["s1", 0, 2, d.job_id], ["s1", 1, -1, d.job_id],
                   ["s1", 1, d.job_id]):
        with pytest.raises(ScriptError, match="dragoman"):
            await store._call("ack_outcomes", ck, [ck.nodes], [store.proc, *groups], Reply)
    assert await snapshot(store.client) == before


async def test_a_refused_job_gives_its_slot_to_the_oldest_waiting_job_not_back_to_itself(store: Store) -> None:
    """Found by the state machine: the slot a refusal gives back went to nobody while a job waited
    for that node (only a result handed it on)."""
    await register(store, "n1", max_c=1, pools=(ZH_EN, "en>zh"))
    first = await store.dispatch(job("s1", 0))
    waiting = await store.dispatch(job("s2", 0, pool="en>zh", tgt="zh"))
    assert (first.status, waiting.status) == ("assigned", "queued")
    r = await store.complete(first.job_id, "n1", 1, "refused")
    assert r.status == "refused"
    assert [(e.kind, e.job, e.node) for e in r.effects] == [("assign", waiting.job_id, "n1")]
    assert (await store.job(waiting.job_id))["state"] == "assigned"
    assert (await store.job(first.job_id))["state"] == "queued"  # no other node: it waits, not on n1


async def test_a_job_refused_by_the_only_node_goes_back_to_it_with_the_next_slot_it_gives_back(store: Store) -> None:
    """The refusing node keeps a free slot while the job waits: it is marked, so its next result
    (given back by a node that was not full) still looks at the queue."""
    await register(store, "n1", max_c=2)
    first = await store.dispatch(job("s1", 0))
    refused = await store.dispatch(job("s2", 0))
    assert (first.node, refused.node) == ("n1", "n1")
    assert (await store.complete(refused.job_id, "n1", 1, "refused")).status == "refused"
    assert (await store.job(refused.job_id))["state"] == "queued"
    assert (await store.node("n1")).get("waits") == "1"
    done = await store.complete(first.job_id, "n1", 1, "completed", payload="{}")
    assert ("assign", refused.job_id, "n1") in [(e.kind, e.job, e.node) for e in done.effects]
    j = await store.job(refused.job_id)
    assert (j["state"], j["node"], j["attempt"]) == ("assigned", "n1", "2")
    assert "waits" not in await store.node("n1")  # nothing waits any more: the mark is gone


async def test_a_node_that_could_not_read_past_stale_queue_entries_stays_marked(store: Store) -> None:
    """A freed slot drops at most 64 queue entries no longer waiting (none are left by the scripts
    themselves: here, entries Redis kept of jobs it lost); a job behind them still waits, so the
    node keeps its mark and looks again, at its heartbeat at the latest."""
    await register(store, "n1", max_c=1)
    running = await store.dispatch(job("s1", 0))
    waiting = await store.dispatch(job("s1", 1))
    assert waiting.status == "queued"
    await store.client.lpush(store.cells["c0"].queue(ZH_EN), *[f"c0.lost{i}" for i in range(65)])
    await store.complete(running.job_id, "n1", 1, "completed", payload="{}")
    assert (await store.job(waiting.job_id))["state"] == "queued"  # 64 stale entries dropped, one left
    assert (await store.node("n1")).get("waits") == "1"
    await store.heartbeat("n1", conn="conn-n1")
    j = await store.job(waiting.job_id)
    assert (j["state"], j["node"]) == ("assigned", "n1")
    await store.complete(waiting.job_id, "n1", int(j["attempt"]), "completed", payload="{}")
    assert "waits" not in await store.node("n1")  # nothing waits any more


async def test_a_result_reads_the_queues_only_when_the_node_was_full_or_is_marked(store: Store) -> None:
    await register(store, "n1", max_c=2)
    first = await store.dispatch(job("s1", 0))
    before = await command_calls(store, "zcard")
    await store.complete(first.job_id, "n1", 1, "completed", payload="{}")
    assert await command_calls(store, "zcard") == before  # a free slot, no mark: no job can wait for this node
    a, b = await store.dispatch(job("s1", 1)), await store.dispatch(job("s2", 0))
    assert (a.node, b.node) == ("n1", "n1")
    before = await command_calls(store, "zcard")
    await store.complete(a.job_id, "n1", 1, "completed", payload="{}")
    assert await command_calls(store, "zcard") == before + 1  # it was full: a job may wait for it


async def test_a_job_is_created_with_one_hset_of_a_few_fields_and_read_back_whole(store: Store, settings) -> None:
    await register(store, "n1")
    before = await command_calls(store, "hset")
    d = await store.dispatch(job("s1", 7, tgt="de"))
    raw = await store.client.hgetall(store.cells["c0"].job(d.job_id))
    fields = {k.decode() for k in raw}
    # write-once fields packed into one ("spec"); the placement's own; the audio; no field written twice
    # (when it was assigned is its lease less its job_timeout; the nodes it tried, its node: neither is written)
    assert fields == {"spec", "sproc", "data", "state", "node", "attempt", "lease"}, fields
    assert await command_calls(store, "hset") == before + 3  # the session, the node, the job
    view = await store.job(d.job_id)
    assert view is not None and "data" not in view and "spec" not in view
    assert {k: view[k] for k in ("id", "pool", "session", "utt", "tgt", "max_attempts", "job_timeout",
                                 "pending_timeout", "queue_max", "state", "node", "attempt")} == {
        "id": d.job_id, "pool": ZH_EN, "session": "s1", "utt": "7", "tgt": "de",
        "max_attempts": str(settings.max_attempts), "job_timeout": str(settings.job_timeout_ms),
        "pending_timeout": str(settings.pending_timeout_ms), "queue_max": str(settings.queue_max),
        "state": "assigned", "node": "n1", "attempt": "1"}
    assert int(view["created"]) == int(view["assigned_at"]) and view["tried"] == "n1"
    status = (await store.get_jobs([d.job_id]))[d.job_id]
    assert (status.state, status.node, status.attempt, status.utt, status.tgt) == ("assigned", "n1", 1, 7, "de")


async def test_a_job_written_before_its_fields_were_packed_is_read_and_finished(store: Store, settings) -> None:
    """A rolling upgrade: jobs in flight were written by the earlier version, one field each."""
    await register(store, "n1")
    d = await store.dispatch(job("s1", 3))
    key = store.cells["c0"].job(d.job_id)
    spec = (await store.client.hget(key, "spec")).decode().split()
    await store.client.hdel(key, "spec")
    await store.client.hset(key, mapping=dict(zip(
        ("pool", "session", "utt", "tgt", "max_attempts", "job_timeout", "pending_timeout", "queue_max", "created"),
        spec, strict=True)))
    c = await store.complete(d.job_id, "n1", 1, "completed", payload='{"text":"x"}')
    assert c.status == "completed"
    [outcome] = [e for e in c.effects if e.kind == "outcome"]
    assert (outcome.session, outcome.utt, outcome.tgt) == ("s1", 3, "en")
    assert (await store.client.hget(key, "spec")).decode().split() == spec  # packed on its first read


@pytest.mark.parametrize(("index", "value", "what"), [(5, "0x10", "utterance_index"), (5, " 4", "utterance_index"),
                                                      (7, "60000.0", "job_timeout_ms"), (6, "e n", "tgt_lang"),
                                                      (6, "", "tgt_lang"), (3, "zh>en x", "no spaces")])
async def test_numbers_must_be_decimal_digits_and_words_must_be_words(store: Store, index: int, value: str,
                                                                      what: str) -> None:
    """A job's spec keeps some arguments as given: one that is not plain digits, or a word, is refused."""
    await register(store, "n1")
    before = await snapshot(store.client)
    with pytest.raises(Exception, match=what):
        await raw_dispatch(store, {index: value})
    assert await snapshot(store.client) == before


async def test_the_nodes_a_job_tried_outlive_its_wait_in_a_queue(store: Store) -> None:
    """Its first holder is not written down (its node says it); once the job waits in a queue with no
    node, the list is written, and the next holder is added to it."""
    await register(store, "n1")
    a = await store.dispatch(job("s1", 0))
    assert a.node == "n1" and (await store.job(a.job_id))["tried"] == "n1"
    await store.node_offline("n1", "conn-n1", "closed")
    assert (await store.job(a.job_id))["state"] == "queued"
    await register(store, "n2")
    view = await store.job(a.job_id)
    assert (view["state"], view["node"], view["attempt"], view["tried"]) == ("assigned", "n2", "2", "n1 n2")


async def test_complete_soon_settles_as_complete_does(store: Store) -> None:
    """``complete_soon`` (a node's frames read on meanwhile) gives the reply ``complete`` would:
    the outcome for the session with the result, the slot back, a repeat a duplicate."""
    assert store.scripts.pipeline is not None  # (its own path: the reply decoded in the pipeline's reader)
    await register(store, "n1")
    d = await store.dispatch(job())
    done = await store.complete_soon(d.job_id, "n1", 1, "completed", payload='{"text":"hi"}', result="decoded")
    assert (done.status, done.state) == ("completed", "completed")
    assert [(e.kind, e.job, e.payload, e.result) for e in done.effects] == [
        ("outcome", d.job_id, '{"text":"hi"}', "decoded")]
    assert [p["free_slots"] for p in await store.pools()] == [1]
    again = await store.complete_soon(d.job_id, "n1", 1, "completed", payload='{"text":"hi"}')
    assert again.status == "duplicate"


async def test_complete_soon_unknown_job_and_a_refused_call(store: Store) -> None:
    unknown = await store.complete_soon("nocell.j1", "n1", 1, "completed")
    assert (unknown.status, unknown.reason) == ("rejected", "unknown_job")
    await register(store, "n1")
    d = await store.dispatch(job())
    with pytest.raises(ScriptError, match="complete_task"):  # (an error reply is not run again)
        await store.complete_soon(d.job_id, "n1", 1, "no-such-outcome")
    assert (await store.job(d.job_id))["state"] == "assigned"


async def test_complete_soon_after_the_library_was_flushed(store: Store) -> None:
    """Its first attempt finds no library: ``complete`` takes over (loads it) and settles the job."""
    await register(store, "n1")
    d = await store.dispatch(job())
    await store.client.function_flush()
    done = await store.complete_soon(d.job_id, "n1", 1, "completed", payload="{}")
    assert (done.status, done.state) == ("completed", "completed")
    assert [p["free_slots"] for p in await store.pools()] == [1]
