"""The transition scripts as a state machine: random interleavings of every Store transition, with the
invariants of DESIGN.md checked against Redis after every step.

Hypothesis drives register / heartbeat / drain / node_offline / dispatch / complete (and a node's
refusal) / start_job / cancel / a session's acknowledgement and its end / reap and a test clock (``set_clock_offset``) that runs past pending timeouts (15 s), node
deadlines (45 s) and leases (55 s). The machine keeps a small model of what the scripts told it (every
effect of every call: with one process "p1" holding every socket, every effect comes back to the
caller) and checks Redis against it:

  I1  used == members of the node's job set == non-terminal jobs naming the node; 0 <= used <= max
  I2  a live job has exactly one holder (node, attempt), the one its last ``assign`` effect named;
      1 <= attempt <= max_attempts; wrong node / stale attempt results are rejected and change nothing
  I3  a terminal job stays in its one terminal state; exactly one ``outcome`` effect once terminal,
      none before
  I4  ``assign`` effects only name nodes that were ready and within their heartbeat deadline
  I5  after the clock passes deadlines and the reaper has run, no job is held by an offline or silent
      node, and no lease or pending deadline is in the past
  I8  a repeated dispatch is answered "exists", a repeated result "duplicate", a repeated drain /
      offline / cancel / start changes nothing (a repeat may carry the local effect again: the same
      assignment, the same outcome, for a caller whose first reply was lost)
plus the indexes the scripts select with: pool sorted sets hold exactly the ready nodes scored by
free slots (exactly for a node in one pool; for a node in several, at least 1 while it has one), the node registry holds the non-offline nodes scored by deadline, leases / pending hold
exactly the assigned / queued jobs, and no job waits in a queue while a live node of its pool has a
free slot.

A node keeps the max_concurrency it first registered with for the whole example (its capacity is a
property of the node): re-registering with a smaller one while holding more jobs leaves used > max,
which register_node accepts today (an open design question, not exercised here).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from dragoman.config import Settings
from dragoman.embedded import EmbeddedServer
from dragoman.store.api import Effect, JobSpec, Reply, Store, job_view
from dragoman.store.keys import CellKeys

NODE_IDS = ("n1", "n2", "n3", "n4")
POOLS = ("zh>en", "en>zh", "en<>zh")
UNSERVED_POOL = "fr>de"  # no node ever serves it: dispatch fails at once with NO_AVAILABLE_NODE
SESSIONS = ("s1", "s2", "s3")
# Time moves in steps of 10 s while every timeout is 5 s off a multiple of 10 s: whether a deadline has
# passed then never depends on how many real milliseconds the example took (it would need > 5 s), so
# Hypothesis replays (shrinking) see the same history.
CLOCK_STEPS_MS = (10_000, 20_000, 30_000, 50_000, 70_000)
OUTCOMES = ("completed", "completed_empty", "failed")
TERMINAL = frozenset(OUTCOMES)
HELD = frozenset({"assigned", "running"})
STORE_SETTINGS = Settings(node_ttl_ms=45_000, job_timeout_ms=55_000, pending_timeout_ms=15_000,
                          queue_max=2, max_attempts=2, warmup_ms=0)
CK = CellKeys(STORE_SETTINGS.key_prefix, STORE_SETTINGS.cells[0])
PROC = "p1"


@dataclasses.dataclass
class JobModel:
    spec: JobSpec
    job_id: str
    holders: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # every assign, in order
    outcomes: list[Effect] = dataclasses.field(default_factory=list)
    accepted: tuple[str, int, str, str, str] | None = None  # (node, attempt, outcome, code, payload)
    terminal: tuple[str, str] | None = None  # (state, code) once seen terminal
    refused_by: set[str] = dataclasses.field(default_factory=set)  # nodes that said they cannot take it


def snapshot(r: redis.Redis) -> dict[str, Any]:
    """Every key with its type, value and whether it has a TTL: 'changed nothing' means equal snapshots."""
    out: dict[str, Any] = {}
    for key in sorted(r.keys("*")):
        kind = r.type(key)
        if kind == "string":
            value: Any = r.get(key)
        elif kind == "hash":
            value = r.hgetall(key)
        elif kind == "set":
            value = sorted(r.smembers(key))
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "stream":
            value = r.xrange(key)
        else:
            value = None
        out[key] = (kind, value, r.pttl(key) >= 0)
    return out


def snapshot_diff(a: dict[str, Any], b: dict[str, Any]) -> str:
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"  {key}: {a.get(key)!r} -> {b.get(key)!r}")
    return "\n".join(lines)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.sync = redis.Redis.from_url(url, decode_responses=True)
        self.sync.flushall()
        self.loop = asyncio.new_event_loop()
        self.store = Store.from_url(url, STORE_SETTINGS, proc=PROC, test_clock=True)
        # Every effect of every call, as the process's sink (the Hub) hears them: a call's reply to
        # its caller may carry only some (a heartbeat's reply: what its node was given; an outcome of a
        # job that timed out in the queue while the node's free slot was being filled is no node's).
        self.heard: list[Effect] = []

        def hear(effects: list[Effect]) -> None:
            self.heard.extend(effects)

        self.store.sink = hear
        self.offset_ms = 0
        self.node_max: dict[str, int] = {}  # fixed per node on first registration
        self.conns: dict[str, str] = {}
        self.jobs: dict[str, JobModel] = {}
        self.job_states: dict[str, str] = {}  # as read by the last invariant check
        self.utt = itertools.count()
        # Nodes that refused a job: they are not handed waiting work until their next completion,
        # heartbeat or registration (they said they cannot take more).
        self.refused: set[str] = set()
        self.conn_ids = itertools.count(1)
        self.payloads = itertools.count(1)

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self.store.aclose())
        finally:
            self.loop.close()
            self.sync.close()

    # ------------------------------------------------------------------ plumbing
    def _nodes_now(self) -> dict[str, dict[str, str]]:
        pipe = self.sync.pipeline(transaction=False)
        for nid in NODE_IDS:
            pipe.hgetall(CK.node(nid))
        return {nid: h for nid, h in zip(NODE_IDS, pipe.execute(), strict=True) if h}

    def _run(self, coro: Any, *, revives: str | None = None) -> Reply:
        """One transition: run it, then check and absorb its effects. ``revives`` names the node the
        call itself may make ready (register, heartbeat, undrain): it is exempt from the I4 'before' check."""
        before = self._nodes_now()
        reply = self.loop.run_until_complete(coro)
        self._absorb(reply, before, revives)
        return reply

    def _absorb(self, reply: Reply, before: dict[str, dict[str, str]], revives: str | None) -> None:
        assert isinstance(reply.effects, list)
        effects, self.heard = self.heard, []
        after: dict[str, dict[str, str]] | None = None
        for e in effects:
            job = self.jobs.get(e.job)
            assert job is not None, f"effect for a job nobody dispatched: {e}"
            if e.kind == "assign" and job.holders and (e.node, e.attempt) == job.holders[-1]:
                continue  # the current assignment again (a re-registration, a repeated dispatch)
            if e.kind == "assign":
                last = job.holders[-1][1] if job.holders else 0
                assert e.attempt == last + 1, f"I2: assign attempt {e.attempt} after attempt {last}: {e}"
                assert 1 <= e.attempt <= STORE_SETTINGS.max_attempts, f"I5: attempt over the cap: {e}"
                if e.node != revives:
                    n = before.get(e.node)
                    assert n is not None and n.get("state") == "ready" and int(n["deadline"]) >= reply.now, (
                        f"I4: job {e.job} assigned to {e.node}, which before the call was {n} (now={reply.now})")
                if after is None:
                    after = self._nodes_now()
                n = after.get(e.node)
                assert n is not None and n.get("state") == "ready" and int(n["deadline"]) >= reply.now, (
                    f"I4: job {e.job} assigned to {e.node}, which after the call is {n} (now={reply.now})")
                assert e.lease == reply.now + STORE_SETTINGS.job_timeout_ms, f"lease not from the call's time: {e}"
                job.holders.append((e.node, e.attempt))
            elif e.kind == "cancel":
                assert job.holders and (e.node, e.attempt) == job.holders[-1], (
                    f"cancel names {e.node}/{e.attempt}, the holder was {job.holders[-1:]}")
            elif e.kind == "outcome":
                job.outcomes.append(e)
                assert len(job.outcomes) == 1, f"I3: a second outcome for {e.job}: {job.outcomes}"
                assert e.state in TERMINAL, f"I3: outcome with a non-terminal state: {e}"
                assert e.session == job.spec.session_id and e.utt == job.spec.utterance_index, e
            else:
                raise AssertionError(f"unknown effect kind: {e}")

    def _unchanged(self, coro: Any) -> Reply:
        """A call that must change nothing: same keys, values and TTL presence before and after; its only
        effects may be repeats of what the job already had (its current assignment, its one outcome)."""
        before = snapshot(self.sync)
        reply = self.loop.run_until_complete(coro)
        after = snapshot(self.sync)
        assert before == after, f"call changed state:\n{snapshot_diff(before, after)}\nreply={reply}"
        effects, self.heard = self.heard, []
        for e in effects:
            job = self.jobs[e.job]
            if e.kind == "assign":
                assert job.holders and (e.node, e.attempt) == job.holders[-1], f"not a repeat: {e} {job.holders}"
            else:
                assert e.kind == "outcome" and job.outcomes, f"not a repeat: {e}"
                assert (e.state, e.code) == (job.outcomes[0].state, job.outcomes[0].code), (e, job.outcomes)
        return reply

    def _conn_arg(self, node: str, which: str) -> str:
        if which == "current":
            return self.conns.get(node, f"{node}-never")
        if which == "stale":
            return f"{node}-stale"
        return ""

    def _jobs_in(self, states: frozenset[str]) -> list[str]:
        return sorted(j for j, s in self.job_states.items() if s in states)

    # ------------------------------------------------------------------ node plane
    @initialize(caps=st.lists(st.integers(1, 3), min_size=1, max_size=3))
    def first_nodes(self, caps: list[int]) -> None:
        for nid, max_c in zip(NODE_IDS, caps, strict=False):
            self.register(nid, max_c, frozenset(POOLS))

    @rule(node=st.sampled_from(NODE_IDS), max_c=st.integers(1, 3),
          pools=st.frozensets(st.sampled_from(POOLS), min_size=1))
    def register(self, node: str, max_c: int, pools: frozenset[str]) -> None:
        max_c = self.node_max.setdefault(node, max_c)
        conn = f"{node}-c{next(self.conn_ids)}"
        before = (self._nodes_now().get(node) or {}).get("state")
        r = self._run(self.store.register_node(node, conn=conn, max_concurrency=max_c, pools=sorted(pools)),
                      revives=node)
        self.refused.discard(node)
        assert r.status == "registered", r
        assert r.max == max_c
        assert r.state == ("draining" if before == "draining" else "ready"), (before, r)  # a drain outlives a reconnect
        self.conns[node] = conn

    @rule(node=st.sampled_from(NODE_IDS), draining=st.sampled_from([None, True, False]),
          which=st.sampled_from(["current", "any", "stale"]),
          pools=st.none() | st.frozensets(st.sampled_from(POOLS), min_size=1))
    def heartbeat(self, node: str, draining: bool | None, which: str, pools: frozenset[str] | None) -> None:
        """One node's heartbeat, maybe with its draining flag or a new set of pools."""
        conn = self._conn_arg(node, which)
        state = (self._nodes_now().get(node) or {}).get("state")
        new_pools = None if pools is None else sorted(pools)
        if state in (None, "offline") or which == "stale":
            r = self._unchanged(self.store.heartbeat(node, conn=conn, draining=draining, pools=new_pools))
            # an older socket is told it is superseded even when the node has gone offline since
            assert r.status == ("superseded" if which == "stale" and state is not None else "unknown"), r
            return
        source = self._nodes_now()[node].get("drain_source", "")
        r = self._run(self.store.heartbeat(node, conn=conn, draining=draining, pools=new_pools), revives=node)
        self.refused.discard(node)
        assert r.status == "ok", r
        if new_pools is not None:
            assert self._nodes_now()[node]["pools"] == " ".join(new_pools)
        assert r.deadline == r.now + STORE_SETTINGS.node_ttl_ms
        # the node's own flag drains it and undrains it, but never undoes an operator's drain
        if draining is True:
            expected = "draining"
        elif draining is False and state == "draining" and source == "node":
            expected = "ready"
        else:
            expected = state
        assert r.state == expected, (state, source, draining, r)

    @rule(node=st.sampled_from(NODE_IDS), on=st.booleans())
    def drain(self, node: str, on: bool) -> None:
        state = (self._nodes_now().get(node) or {}).get("state")
        if state in (None, "offline"):
            r = self._unchanged(self.store.drain(node, on))
            assert r.status == "unknown", r
            return
        r = self._run(self.store.drain(node, on), revives=None if on else node)
        if not on:
            self.refused.discard(node)
        assert r.status == "ok" and r.state == ("draining" if on else "ready"), r
        r2 = self._unchanged(self.store.drain(node, on))  # I8
        assert r2.status == "ok" and r2.state == r.state, r2

    @rule(node=st.sampled_from(NODE_IDS), which=st.sampled_from(["current", "any", "stale"]))
    def node_offline(self, node: str, which: str) -> None:
        conn = self._conn_arg(node, which)
        state = (self._nodes_now().get(node) or {}).get("state")
        if state in (None, "offline") or which == "stale":
            r = self._unchanged(self.store.node_offline(node, conn=conn))
            expected = "superseded" if which == "stale" and state is not None else "unknown"
            assert r.status == expected, r
            return
        r = self._run(self.store.node_offline(node, conn=conn))
        assert r.status == "offline", r
        n = self._nodes_now()[node]
        assert n["state"] == "offline" and not n.get("jobs"), n
        r2 = self._unchanged(self.store.node_offline(node, conn=conn))  # I8
        assert r2.status == "unknown", r2

    # ------------------------------------------------------------------ jobs
    @rule(pools=st.lists(st.sampled_from((*POOLS, *POOLS, UNSERVED_POOL)), min_size=1, max_size=4),
          session=st.sampled_from(SESSIONS))
    def dispatch(self, pools: list[str], session: str) -> None:
        """A burst of utterances (1-4) from one session, so pools fill and queues form."""
        for pool in pools:
            self._dispatch_one(pool, session)

    @rule()
    def next_utterance(self) -> None:
        """The steady stream between rarer events: the next utterance, round robin over the served pools
        and the sessions. (Hypothesis favours the first rule in its order, the one without arguments.)"""
        n = len(self.jobs)
        self._dispatch_one(POOLS[n % len(POOLS)], SESSIONS[(n // len(POOLS)) % len(SESSIONS)])

    def _dispatch_one(self, pool: str, session: str) -> None:
        utt = next(self.utt)  # ids are deterministic so replays pick the same jobs
        spec = JobSpec(pool=pool, session_id=session, utterance_index=utt, tgt_lang=pool[-2:],
                       body=json.dumps({"pool": pool}), unique=f"j{utt:04d}")
        jid = f"{CK.cell}.{spec.unique}"
        self.jobs[jid] = JobModel(spec=spec, job_id=jid)
        r = self._run(self.store.dispatch(spec))
        assert r.job_id == jid
        mine = [e for e in r.effects if e.job == jid]
        if r.status == "assigned":
            assert [(e.kind, e.node, e.attempt) for e in mine] == [("assign", r.node, 1)], r
        elif r.status == "queued":
            assert not mine, r
        elif r.status == "failed":
            assert r.code in ("NO_AVAILABLE_NODE", "NODE_OVERLOADED"), r
            assert [(e.kind, e.state, e.code) for e in mine] == [("outcome", "failed", r.code)], r
        else:
            raise AssertionError(f"dispatch answered {r}")
        if pool == UNSERVED_POOL:
            assert r.status == "failed" and r.code == "NO_AVAILABLE_NODE", r

    @precondition(lambda self: any(s in HELD for s in self.job_states.values()))
    @rule(pick=st.integers(0, 1 << 16), result=st.sampled_from([*OUTCOMES, "failed:ASR_FAILED", "refused"]),
          extras=st.sampled_from(["", "start", "retry", "start+retry"]))
    def complete_by_holder(self, pick: int, result: str, extras: str) -> None:
        """The holder (after job_started, with "start") returns its result; a retried result ("retry")
        is a duplicate."""
        outcome, _, code = result.partition(":")
        start_first, retry = "start" in extras, "retry" in extras
        held = self._jobs_in(HELD)
        job = self.jobs[held[pick % len(held)]]
        node, attempt = job.holders[-1]
        if start_first:
            r = self._run(self.store.start_job(job.job_id, node, attempt))
            assert r.status == "running", r
            r = self._unchanged(self.store.start_job(job.job_id, node, attempt))  # I8
            assert r.status == "running", r
            other = next(n for n in NODE_IDS if n != node)
            r = self._unchanged(self.store.start_job(job.job_id, other, attempt))
            assert r.status == "rejected", r
        payload = json.dumps({"result": next(self.payloads)})
        if outcome == "refused":  # the node cannot take it: it moves on (no outcome unless it fails)
            job.refused_by.add(node)
            self.refused.add(node)
            r = self._run(self.store.complete(job.job_id, node, attempt, "refused", code="NODE_OVERLOADED"))
            assert r.status == "refused" and r.state in ("assigned", "queued", "failed"), r
            if r.state == "assigned":
                assert job.holders[-1][0] != node, f"a refused job went back to the node that refused it: {r}"
            return
        r = self._run(self.store.complete(job.job_id, node, attempt, outcome, code=code, payload=payload))
        assert r.status == "completed" and r.state == outcome, r
        self.refused.discard(node)
        mine = [e for e in r.effects if e.job == job.job_id]
        expected_code = "" if outcome != "failed" else (code or "PROCESSING_ERROR")
        assert [(e.kind, e.state, e.code) for e in mine] == [("outcome", outcome, expected_code)], r
        job.accepted = (node, attempt, outcome, code, payload)
        if retry:
            r = self._unchanged(self.store.complete(job.job_id, node, attempt, outcome, code=code, payload=payload))
            assert r.status == "duplicate", r

    @precondition(lambda self: self.jobs)
    @rule(pick=st.integers(0, 1 << 16), how=st.sampled_from(["other_node", "earlier_holder", "next_attempt",
                                                            "previous_attempt", "unknown_node"]),
          outcome=st.sampled_from(OUTCOMES))
    def replays(self, pick: int, how: str, outcome: str) -> None:
        """Late, repeated and forged messages about one job, none of which may change anything:
        the same dispatch again is "exists" (I8); a result from anyone but the current (node, attempt)
        is rejected (I2); the accepted result again is a "duplicate" (I8)."""
        job = self.jobs[sorted(self.jobs)[pick % len(self.jobs)]]
        h = self.sync.hgetall(CK.job(job.job_id))
        r = self._unchanged(self.store.dispatch(job.spec))
        assert r.status == "exists", r
        assert (r.state, r.node, r.attempt, r.code) == (h["state"], h["node"], int(h["attempt"]), h.get("code", "")), (
            r, h)

        cur = (h["node"], int(h["attempt"]))
        if how == "other_node":
            others = [n for n in NODE_IDS if n != cur[0]]
            args = (others[pick % len(others)], max(cur[1], 1))
        elif how == "earlier_holder" and any(p != cur for p in job.holders):
            earlier = [p for p in job.holders if p != cur]
            args = earlier[pick % len(earlier)]
        elif how == "previous_attempt" and cur[1] >= 1 and cur[0]:
            args = (cur[0], cur[1] - 1)
        elif how == "unknown_node":
            args = ("nX", max(cur[1], 1))
        else:
            args = (cur[0] or NODE_IDS[0], cur[1] + 1)
        assert args != cur
        r = self._unchanged(self.store.complete(job.job_id, args[0], args[1], outcome, payload="{}"))
        assert r.status == "rejected" and r.reason == "stale", r
        r = self._unchanged(self.store.start_job(job.job_id, args[0], args[1]))
        assert r.status == "rejected", r

        if job.accepted is not None:
            node, attempt, accepted_outcome, code, payload = job.accepted
            r = self._unchanged(self.store.complete(job.job_id, node, attempt, accepted_outcome, code=code,
                                                    payload=payload))
            assert r.status == "duplicate", r

    @precondition(lambda self: self.jobs)
    @rule(pick=st.integers(0, 1 << 16))
    def cancel(self, pick: int) -> None:
        job = self.jobs[sorted(self.jobs)[pick % len(self.jobs)]]
        state = self.sync.hget(CK.job(job.job_id), "state")
        if state in TERMINAL:
            r = self._unchanged(self.store.cancel(job.job_id))
            assert r.status == "finished" and r.state == state, r
            return
        holder = job.holders[-1] if state in HELD else None
        r = self._run(self.store.cancel(job.job_id))
        assert r.status == "cancelled", r
        mine = [(e.kind, e.node, e.attempt) for e in r.effects if e.job == job.job_id]
        expected = [("cancel", *holder)] if holder else []
        assert [m for m in mine if m[0] == "cancel"] == expected, r
        assert [e.code for e in r.effects if e.job == job.job_id and e.kind == "outcome"] == ["JOB_CANCELLED"], r
        r2 = self._unchanged(self.store.cancel(job.job_id))  # I8
        assert r2.status == "finished", r2

    # ------------------------------------------------------------------ sessions
    @rule(session=st.sampled_from(SESSIONS), unread=st.booleans())
    def session_acknowledges(self, session: str, unread: bool) -> None:
        """The session delivered its ended jobs' outcomes: they are forgotten (and nothing else moves).
        ``unread``: it names them as ended (as it does for outcomes Redis gave it); the others it
        names are read first, and those not ended are left as they are."""
        self._refresh_states()
        done = [j for j in self._jobs_in(TERMINAL) if self.jobs[j].spec.session_id == session]
        live = [j for j in self.jobs if j not in done and self.jobs[j].spec.session_id == session]
        if unread:
            acked = self.loop.run_until_complete(self.store.ack(session, live, ended=done))
        else:
            acked = self.loop.run_until_complete(self.store.ack(session, done + live))
        assert acked == len(done), (acked, done)
        for jid in done:
            assert not self.sync.exists(CK.job(jid)), f"{jid} acknowledged but kept"
            del self.jobs[jid]

    @rule(session=st.sampled_from(SESSIONS), detach=st.booleans())
    def session_ends(self, session: str, detach: bool) -> None:
        """The session is over (or its socket is gone with no grace): one transition cancels what it
        was still owed (its nodes get job_cancel and their slots back) and forgets its jobs."""
        self._refresh_states()
        mine = [j for j in self.jobs if self.jobs[j].spec.session_id == session]
        held = {j: self.jobs[j].holders[-1] for j in mine if self.job_states.get(j) in HELD}
        async def close() -> Reply:
            [reply] = await self.store.close_session(session, 1, detach=detach, grace_ms=0)
            return reply

        r = self._run(close())
        cancels = sorted((e.job, e.node, e.attempt) for e in r.effects if e.kind == "cancel")
        assert cancels == sorted((j, *h) for j, h in held.items()), (cancels, held)
        # nobody hears of this session's jobs (freed slots may end other sessions' jobs that waited too long)
        assert not [e for e in r.effects if e.kind == "outcome" and e.session == session], r
        for jid in mine:
            assert not self.sync.exists(CK.job(jid)), f"{jid} outlived its session"
            del self.jobs[jid]
        assert not self.sync.exists(CK.sess(session))

    # ------------------------------------------------------------------ time and recovery
    def _advance(self, step: int) -> None:
        self.offset_ms += step
        self.loop.run_until_complete(self.store.set_clock_offset(self.offset_ms))

    @rule(step=st.sampled_from(CLOCK_STEPS_MS), silent=st.sets(st.sampled_from(NODE_IDS), max_size=len(NODE_IDS)),
          then_reap=st.booleans())
    def time_passes(self, step: int, silent: set[str], then_reap: bool) -> None:
        """Time passes; the nodes not in ``silent`` heartbeat as they should meanwhile, so jobs that are
        never answered run out of their lease while their node stays alive, and silent nodes pass
        their deadline. The reaper may run at the end."""
        self._advance(step)
        for nid, n in sorted(self._nodes_now().items()):
            if n["state"] != "offline" and nid not in silent:
                r = self._run(self.store.heartbeat(nid, conn=self.conns[nid]), revives=nid)
                assert r.status == "ok", r
                self.refused.discard(nid)
        if then_reap:
            self._reap_until_done(100)

    @rule(batch=st.sampled_from([1, 2, 100]))
    def reap(self, batch: int) -> None:
        self._reap_until_done(batch)

    def _reap_until_done(self, batch: int) -> None:
        """I5: once the reaper says nothing more is due, nothing overdue is left."""
        last: Reply | None = None
        for _ in range(500):
            before = self._nodes_now()
            replies = self.loop.run_until_complete(self.store.reap(batch))
            assert len(replies) == 1
            last = replies[0]
            self._absorb(last, before, None)
            assert last.status == "ok", last
            if not last.more:
                break
        else:
            raise AssertionError("reap still reported more after 500 calls")
        now = last.now
        overdue_nodes = self.sync.zrange(CK.nodes, "-inf", now - 1, byscore=True)
        assert not overdue_nodes, f"I5: nodes past their deadline after reaping: {overdue_nodes} (now={now})"
        overdue_leases = self.sync.zrange(CK.leases, "-inf", now - 1, byscore=True)
        assert not overdue_leases, f"I5: leases in the past after reaping: {overdue_leases}"
        overdue_pending = self.sync.zrange(CK.pending, "-inf", now - 1, byscore=True)
        assert not overdue_pending, f"I5: queued jobs past their pending deadline: {overdue_pending}"
        nodes = self._nodes_now()
        for jid in self.jobs:
            h = self.sync.hgetall(CK.job(jid))
            if h.get("state") in HELD:
                n = nodes.get(h["node"], {})
                assert n.get("state") != "offline" and int(n.get("deadline", 0)) >= now, (
                    f"I5: {jid} still held by {h['node']} = {n} after reaping (now={now})")
                assert int(h["lease"]) >= now, f"I5: {jid} lease {h['lease']} < now {now}"

    @rule(node=st.sampled_from([*NODE_IDS, "all"]), outcome=st.sampled_from(OUTCOMES))
    def finish_work(self, node: str, outcome: str) -> None:
        """One node (or every node) returns the result of everything it holds, including the jobs its
        freed slots pull from the queues: then it holds no slot (with "all": no slot is in use anywhere,
        I1 'when all work is done')."""
        for _ in range(200):
            self._refresh_states()
            held = [j for j in self._jobs_in(HELD) if node == "all" or self.jobs[j].holders[-1][0] == node]
            if not held:
                break
            for jid in held:
                holder, attempt = self.jobs[jid].holders[-1]
                r = self._run(self.store.complete(jid, holder, attempt, outcome, payload="{}"))
                assert r.status == "completed", r
                self.refused.discard(holder)
                self.jobs[jid].accepted = (holder, attempt, outcome, "", "{}")
        else:
            raise AssertionError("jobs kept being assigned while finishing the work")
        for nid in self._nodes_now():
            if node in ("all", nid):
                held_now = self.sync.hget(CK.node(nid), "jobs")
                assert not held_now, f"I1: {nid} finished its work but holds {held_now}"
        if node == "all":
            report = self.loop.run_until_complete(self.store.slot_report())
            assert report["used"] == 0 and not report["violations"], report

    # ------------------------------------------------------------------ invariants
    def _refresh_states(self) -> None:
        pipe = self.sync.pipeline(transaction=False)
        ids = sorted(self.jobs)
        for jid in ids:
            pipe.hget(CK.job(jid), "state")
        self.job_states = {jid: s for jid, s in zip(ids, pipe.execute(), strict=True) if s}

    @invariant()
    def redis_agrees_with_the_invariants(self) -> None:
        r = self.sync
        sec, usec = r.time()
        now = int(sec) * 1000 + int(usec) // 1000 + self.offset_ms
        ids = sorted(self.jobs)
        pipe = r.pipeline(transaction=True)  # one consistent picture
        for nid in NODE_IDS:
            pipe.hgetall(CK.node(nid))
        for jid in ids:
            pipe.hgetall(CK.job(jid))
            pipe.hget(CK.job(jid), "data")
        pipe.zrange(CK.leases, 0, -1, withscores=True)
        pipe.zrange(CK.pending, 0, -1, withscores=True)
        pipe.zrange(CK.nodes, 0, -1, withscores=True)
        for pid in (*POOLS, UNSERVED_POOL):
            pipe.zrange(CK.pool(pid), 0, -1, withscores=True)
            pipe.lrange(CK.queue(pid), 0, -1)
        pipe.keys(CK.base + "inbox:*")
        res = iter(pipe.execute())
        nodes: dict[str, dict[str, str]] = {}
        jobsets: dict[str, set[str]] = {}
        for nid in NODE_IDS:
            h = next(res)
            if h:
                nodes[nid] = h
            jobsets[nid] = set(h.get("jobs", "").split())
        jobs: dict[str, dict[str, str]] = {}
        has_data: dict[str, bool] = {}
        for jid in ids:
            h, data = next(res), next(res)
            assert h, f"job {jid} vanished from Redis"
            jobs[jid] = job_view(jid, h)
            has_data[jid] = bool(data)
        leases = dict(next(res))
        pending = dict(next(res))
        registry = dict(next(res))
        pool_members: dict[str, dict[str, float]] = {}
        queues: dict[str, list[str]] = {}
        for pid in (*POOLS, UNSERVED_POOL):
            pool_members[pid] = dict(next(res))
            queues[pid] = next(res)
        inboxes = next(res)
        self.job_states = {jid: h["state"] for jid, h in jobs.items()}

        assert not inboxes, f"one process holds every socket, yet effects went to inbox streams: {inboxes}"

        # I1 slot conservation
        for nid in NODE_IDS:
            if nid not in nodes:
                assert not jobsets[nid], f"I1: unknown node {nid} holds jobs {jobsets[nid]}"
                continue
            n = nodes[nid]
            used, cap = len(jobsets[nid]), int(n["max"])
            holding = {jid for jid, h in jobs.items() if h["state"] in HELD and h["node"] == nid}
            assert used >= 0, f"I1: {nid} used={used} < 0"
            assert used == len(jobsets[nid]), f"I1: {nid} used={used} but its job set is {sorted(jobsets[nid])}"
            assert jobsets[nid] == holding, (
                f"I1: {nid} job set {sorted(jobsets[nid])} != jobs naming it {sorted(holding)}")
            if n["state"] != "offline":
                assert used <= cap, f"I1: {nid} ({n['state']}) used={used} > max={cap}"
            assert cap == self.node_max[nid], n

        # I2 / I3 per job
        for jid, h in jobs.items():
            model = self.jobs[jid]
            state, node, attempt = h["state"], h["node"], int(h["attempt"])
            in_sets = [nid for nid, members in jobsets.items() if jid in members]
            assert 0 <= attempt <= STORE_SETTINGS.max_attempts, f"I5: {jid} attempt {attempt} over the cap"
            if state in HELD:
                assert attempt >= 1, h
                assert in_sets == [node], f"I2: {jid} held by {node} but in job sets of {in_sets}"
                assert nodes.get(node, {}).get("state") != "offline", (
                    f"I2: {jid} held by offline node {node}: {nodes.get(node)}")
                assert model.holders and model.holders[-1] == (node, attempt), (
                    f"I2: {jid} is held by {node}/{attempt} but the last assign effect named {model.holders[-1:]}")
                assert node in leases and leases[node] <= int(h["lease"]), (
                    f"I10: {jid}'s lease {h['lease']} is before its node's lease index score {leases.get(node)}")
                assert jid not in pending, f"{jid} is {state} yet pending"
                assert has_data[jid], f"{jid} is {state} but its job data is gone (no redelivery possible)"
                assert not model.outcomes, f"I3: {jid} is {state} but already had an outcome {model.outcomes}"
            elif state == "queued":
                assert node == "" and not in_sets, f"I2: queued {jid} has holder {node!r} / sets {in_sets}"
                assert jid in pending, f"{jid} queued but not in the pending index"
                assert queues[h["pool"]].count(jid) == 1, f"{jid} queued but queue is {queues[h['pool']]}"
                assert attempt == (model.holders[-1][1] if model.holders else 0), (h, model.holders)
                assert has_data[jid], f"queued {jid} lost its job data"
                assert not model.outcomes, f"I3: {jid} is queued but already had an outcome {model.outcomes}"
            elif state in TERMINAL:
                assert not in_sets, f"I1: finished {jid} still in job sets of {in_sets}"
                assert jid not in pending, f"finished {jid} still pending"
                assert not has_data[jid], f"finished {jid} kept its job data"
                assert len(model.outcomes) == 1, f"I3: {jid} is {state} with outcomes {model.outcomes}"
                o = model.outcomes[0]
                assert (o.state, o.code) == (state, h["code"]), f"I3: outcome {o} vs job {h}"
                if model.terminal is None:
                    model.terminal = (state, h["code"])
                assert model.terminal == (state, h["code"]), f"I3: {jid} was {model.terminal}, now {h}"
            else:
                raise AssertionError(f"{jid} in unexpected state {state!r}: {h}")
            if state not in TERMINAL:
                assert model.terminal is None, f"I3: {jid} left terminal state {model.terminal} for {state}"
        queued_ids = {j for j, h in jobs.items() if h["state"] == "queued"}
        # the lease index scores nodes (no later than their earliest lease: checked per job above),
        # each with the score its record keeps
        for nid, score in leases.items():
            assert nid in nodes, f"lease index names {nid}, which is not a node"
            assert nodes[nid].get("lease_at") == str(int(score)), f"{nid} indexed at {score}: {nodes[nid]}"
        for nid, n in nodes.items():
            if nid not in leases:
                assert "lease_at" not in n, f"{nid} not in the lease index but its record says {n}"
        assert set(pending) == queued_ids, f"pending index {sorted(pending)} != queued jobs {sorted(queued_ids)}"

        # the node registry and the pools dispatch selects from
        for nid, n in nodes.items():
            if n["state"] == "offline":
                assert nid not in registry, f"offline {nid} still in the registry"
            else:
                assert registry.get(nid) == int(n["deadline"]), f"registry {registry.get(nid)} vs {n}"
        for pid, members in pool_members.items():
            for nid, score in members.items():
                n = nodes.get(nid)
                assert n is not None and n["state"] == "ready" and pid in n["pools"].split(), (
                    f"pool {pid} lists {nid}, which is {n}")
                free = max(0, int(n["max"]) - len(jobsets[nid]))
                if len(n["pools"].split()) == 1:  # one pool: exact
                    assert score == free, f"pool {pid} scores {nid} at {score}, it has {free} free slots ({n})"
                else:  # several: may over-state, never hides a free slot
                    assert score >= min(free, 1), f"pool {pid} scores {nid} at {score}, it has {free} free ({n})"
            assert len([j for j in queued_ids if jobs[j]["pool"] == pid]) <= STORE_SETTINGS.queue_max
        for nid, n in nodes.items():
            live = n["state"] == "ready" and int(n["deadline"]) >= now
            if live and len(jobsets[nid]) < int(n["max"]):
                # a job waits in a pool where this node, ready, has a free slot (one that refused
                # it): the node is marked, so the next slot it gives back looks at the queues
                for pid in n["pools"].split():
                    waiting = [j for j in queued_ids if jobs[j]["pool"] == pid]
                    assert not waiting or n.get("waits") == "1", (
                        f"{waiting} wait in {pid}; {nid} has a free slot and no 'waits' mark: {n}")
            if not live or nid in self.refused:
                continue
            for pid in n["pools"].split():
                assert nid in pool_members[pid], f"live ready {nid} missing from pool {pid}: {n}"
                # (a node that refused a job is not handed it again at once: it said it cannot take it)
                waiting = [j for j in queued_ids if jobs[j]["pool"] == pid and nid not in self.jobs[j].refused_by]
                assert not (waiting and len(jobsets[nid]) < int(n["max"])), (
                    f"{waiting} wait in {pid} while live {nid} has a free slot: {n}")


@pytest.fixture
def server_url(redis_server: EmbeddedServer) -> str:
    return redis_server.url


EXAMPLES = int(os.environ.get("DRAGOMAN_STATEFUL_EXAMPLES", "100"))  # more for a thorough run


@pytest.mark.timeout(900)
def test_store_state_machine(server_url: str) -> None:
    run_state_machine_as_test(
        lambda: StoreMachine(server_url),
        settings=settings(max_examples=EXAMPLES, stateful_step_count=40, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]),
    )


def play(state: StoreMachine, steps: list[Callable[[], object]]) -> None:
    """A sequence the machine found, checked as between the machine's steps (I3: one outcome each)."""
    for step in steps:
        step()
        state.redis_agrees_with_the_invariants()


def test_an_outcome_of_no_node_is_heard(server_url: str) -> None:
    """Found by the machine: a queued job that times out while a node's heartbeat fills its freed
    slot ends with an outcome addressed to no node; the process's sink hears it (the heartbeat's
    reply to its node carries only what that node was given)."""
    state = StoreMachine(server_url)
    steps = [
        lambda: state.first_nodes(caps=[1]),
        state.next_utterance,
        state.next_utterance,  # queued behind the first: one slot
        lambda: state.time_passes(silent={"n1"}, step=50_000, then_reap=False),
        lambda: state.complete_by_holder(extras="", pick=0, result="completed"),
        lambda: state.time_passes(silent=set(), step=10_000, then_reap=False),  # past the queued job's deadline
    ]
    try:
        play(state, steps)
        assert sorted(o.state for job in state.jobs.values() for o in job.outcomes) == ["completed", "failed"]
    finally:
        state.teardown()


def test_a_refusal_hands_the_slot_to_a_waiting_job(server_url: str) -> None:
    """Found by the machine: a job refused by a one-slot node in three pools went back to the queue,
    and the slot it gave back stayed free while another job waited for that node."""
    state = StoreMachine(server_url)
    steps = [  # (as the machine ran them)
        lambda: state.first_nodes(caps=[1]),
        lambda: state.session_acknowledges(session="s3", unread=False),
        state.next_utterance,
        lambda: state.finish_work(node="n4", outcome="completed"),
        state.next_utterance,  # queued: n1's one slot is taken
        lambda: state.drain(node="n4", on=False),
        lambda: state.reap(batch=100),
        lambda: state.complete_by_holder(extras="retry", pick=139, result="refused"),
        lambda: state.reap(batch=2),
        lambda: state.drain(node="n1", on=False),  # (where the machine looked again)
    ]
    try:
        play(state, steps)
    finally:
        state.teardown()
