"""Two scheduler processes racing on one cell, with an observer checking slot accounting while they run.

The parent registers 50 nodes (max_concurrency 1-4, one or two of three pools), half held by
process "w1" and half by "w2" (the node's ``proc``: the process holding its socket). It then starts
two OS processes running this file as a worker. Each worker runs many concurrent sessions that
dispatch utterances, and acts as the nodes it holds: every ``assign`` effect for one of them, whether
returned by its own call (dispatch, or a completion that pulled the next job from a queue) or read
from its inbox stream (the other process placed the job), is completed by that node and attempt.
Outcomes reach the session's process the same two ways. Meanwhile the parent samples every node's
``used``, ``max`` and job set in one MULTI/EXEC and asserts 0 <= used <= max and used == job set
size (I1) in every sample.

At the end every job completed exactly once, its one outcome reached the process that dispatched it
(I3), every assignment went to a node of the process that received it, and every slot is free again.

Run as ``python test_concurrency.py worker '<json config>'`` it is one worker: it prints ``DONE``
once every job it dispatched has its outcome, keeps serving its nodes until the parent writes
``STOP``, then prints ``RESULT <json>`` and exits.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from dragoman.config import Settings
from dragoman.store.api import Effect, JobSpec, Store
from dragoman.store.keys import CellKeys

N_NODES = 50
POOLS = ("zh>en", "en>zh", "en<>zh")
PROCS = ("w1", "w2")
SESSIONS_PER_WORKER = 100
UTTERANCES_PER_SESSION = 10
# Nothing may expire while the test runs: every job must complete, none be reassigned or fail.
SETTINGS = Settings(node_ttl_ms=600_000, job_timeout_ms=600_000, pending_timeout_ms=600_000,
                    queue_max=100_000, max_attempts=3, warmup_ms=0)
CK = CellKeys(SETTINGS.key_prefix, SETTINGS.cells[0])
TIME_BUDGET_S = 90.0
PROC_TTL_MS = 600_000


# ---------------------------------------------------------------------------------------- worker
async def run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    proc: str = cfg["proc"]
    my_nodes = set(cfg["nodes"])
    rng = random.Random(cfg["seed"])
    # Up to ~200 calls are in flight here at once (sessions, nodes, the inbox reader); Store.from_url's
    # client would fail call 101 at once ("Too many connections", redis-py's default pool of 100).
    client = aioredis.Redis.from_url(cfg["url"], decode_responses=False, max_connections=1000,
                                     socket_timeout=30.0, socket_connect_timeout=10.0)
    store = Store(client, SETTINGS, proc=proc)
    errors: list[str] = []
    dispatched: set[str] = set()
    outcomes: dict[str, list[str]] = collections.defaultdict(list)
    assigns: set[tuple[str, int]] = set()
    counts: collections.Counter[str] = collections.Counter()
    jobs_running: set[asyncio.Task[None]] = set()
    all_outcomes_in = asyncio.Event()
    state = {"dispatching": True, "stop": False}

    def check_done() -> None:
        if not state["dispatching"] and dispatched <= outcomes.keys():
            all_outcomes_in.set()

    def handle(effects: list[Effect], via: str) -> None:
        for e in effects:
            counts[f"{e.kind}_{via}"] += 1
            if e.kind == "assign":
                if e.node not in my_nodes:
                    errors.append(f"{proc} was told to assign {e.job} to {e.node}, a node it does not hold")
                    continue
                if (e.job, e.attempt) in assigns:
                    errors.append(f"{proc} got assign {e.job}/{e.attempt} twice")
                    continue
                if e.attempt != 1:
                    errors.append(f"reassignment with nothing expiring: {e}")
                if via == "inbox" and not e.payload:
                    errors.append(f"assign through the inbox without its job data: {e}")
                assigns.add((e.job, e.attempt))
                task = asyncio.create_task(node_runs_job(e))
                jobs_running.add(task)
                task.add_done_callback(jobs_running.discard)
            elif e.kind == "outcome":
                outcomes[e.job].append(e.state)
                check_done()
            else:
                errors.append(f"unexpected effect {e}")

    async def node_runs_job(e: Effect) -> None:
        try:
            await asyncio.sleep(rng.random() * 0.003)  # the node's work; lets other coroutines interleave
            if rng.random() < 0.2:
                r = await store.start_job(e.job, e.node, e.attempt)
                if r.status != "running":
                    errors.append(f"start_job {e.job} by its holder: {r}")
            if rng.random() < 0.05:
                r = await store.complete(e.job, e.node, e.attempt + 1, "completed", payload="{}")
                if r.status != "rejected" or r.effects:
                    errors.append(f"result for a future attempt of {e.job} accepted: {r}")
            payload = json.dumps({"job": e.job, "by": e.node})
            r = await store.complete(e.job, e.node, e.attempt, "completed", payload=payload)
            if r.status != "completed":
                errors.append(f"complete {e.job} by {e.node}/{e.attempt}: {r}")
                return
            counts["completed"] += 1
            handle(r.effects, "local")  # the next queued job for this node, and outcomes of local sessions
            if rng.random() < 0.1:
                r = await store.complete(e.job, e.node, e.attempt, "completed", payload=payload)
                # a repeat changes nothing; it may carry the same outcome again for a local session
                if r.status != "duplicate" or any((x.kind, x.job) != ("outcome", e.job) for x in r.effects):
                    errors.append(f"repeated result of {e.job}: {r}")
        except Exception as exc:  # recorded, so the parent sees it instead of a hang
            errors.append(f"node {e.node} running {e.job}: {exc!r}")

    async def session(i: int) -> None:
        sid = f"{proc}-s{i:03d}"
        for utt in range(UTTERANCES_PER_SESSION):
            pool = rng.choice(POOLS)
            spec = JobSpec(pool=pool, session_id=sid, utterance_index=utt, tgt_lang=pool[-2:],
                           body=json.dumps({"session": sid, "utt": utt}))
            try:
                r = await store.dispatch(spec)
                dispatched.add(r.job_id)
                if r.status not in ("assigned", "queued"):
                    errors.append(f"dispatch {r.job_id}: {r}")
                counts[f"dispatch_{r.status}"] += 1
                handle(r.effects, "local")
                if rng.random() < 0.1:
                    again = await store.dispatch(spec)
                    # a repeat changes nothing; it may carry the same assignment again (for a caller
                    # whose reply was lost), which a node ignores
                    if again.status != "exists" or any((x.kind, x.job, x.attempt) != ("assign", r.job_id, 1)
                                                       for x in again.effects):
                        errors.append(f"repeated dispatch of {r.job_id}: {again}")
            except Exception as exc:
                errors.append(f"session {sid} utterance {utt}: {exc!r}")
            await asyncio.sleep(rng.random() * 0.002)

    async def read_inbox() -> None:
        last = "0-0"
        while not state["stop"]:
            try:
                entries = await store.read_inbox(CK.cell, last, block_ms=50, count=200)
            except Exception as exc:
                errors.append(f"inbox: {exc!r}")
                return
            for entry_id, effect in entries:
                last = entry_id
                handle([effect], "inbox")

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)

    await store.touch_proc(ttl_ms=PROC_TTL_MS)
    inbox_task = asyncio.create_task(read_inbox())
    await asyncio.gather(*(session(i) for i in range(cfg["sessions"])))
    state["dispatching"] = False
    check_done()
    try:
        await asyncio.wait_for(all_outcomes_in.wait(), timeout=TIME_BUDGET_S)
    except TimeoutError:
        missing = sorted(dispatched - outcomes.keys())
        errors.append(f"{proc}: no outcome for {len(missing)} jobs, e.g. {missing[:5]}")
    print("DONE", flush=True)

    # Keep serving this process's nodes (they may hold the other process's jobs) until told to stop.
    await asyncio.wait_for(stdin.readline(), timeout=TIME_BUDGET_S)
    state["stop"] = True
    await asyncio.wait_for(inbox_task, timeout=10)
    if jobs_running:
        await asyncio.wait(set(jobs_running), timeout=10)
    if jobs_running:
        errors.append(f"{len(jobs_running)} jobs still running at stop")
    await store.flush_stats()
    await store.aclose()
    return {
        "proc": proc,
        "errors": errors[:50],
        "dispatched": sorted(dispatched),
        "outcomes": outcomes,
        "assigns": sorted(f"{j}/{a}" for j, a in assigns),
        "counts": dict(counts),
    }


def worker_main(raw_cfg: str) -> None:
    result = asyncio.run(run_worker(json.loads(raw_cfg)))
    print("RESULT " + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------- the test
async def test_two_processes_keep_slots_within_capacity(redis_url: str) -> None:
    rng = random.Random(20240611)
    nodes = [f"n{i:02d}" for i in range(N_NODES)]
    caps = {nid: rng.randint(1, 4) for nid in nodes}
    pools = {nid: sorted(rng.sample(POOLS, rng.randint(1, 2))) for nid in nodes}
    owner = {nid: PROCS[i % len(PROCS)] for i, nid in enumerate(nodes)}
    for pool in POOLS:
        assert any(pool in p for p in pools.values()), f"no node serves {pool}"
    for proc in PROCS:  # registered as if each worker held its nodes' sockets
        reg = Store.from_url(redis_url, SETTINGS, proc=proc)
        # a process must be registered before anyone starts: effects for an unregistered one are dropped
        await reg.touch_proc(ttl_ms=PROC_TTL_MS)
        for nid in nodes:
            if owner[nid] == proc:
                r = await reg.register_node(nid, conn=f"{nid}-c1", max_concurrency=caps[nid], pools=pools[nid])
                assert r.status == "registered", r
        await reg.aclose()

    logs = Path(tempfile.mkdtemp(prefix="dragoman-concurrency-"))
    workers: dict[str, asyncio.subprocess.Process] = {}
    stderr_files = {}
    for i, proc in enumerate(PROCS):
        cfg = {"url": redis_url, "proc": proc, "nodes": [n for n in nodes if owner[n] == proc],
               "seed": 1000 + i, "sessions": SESSIONS_PER_WORKER}
        stderr_files[proc] = (logs / f"{proc}.stderr").open("wb")  # noqa: ASYNC230 - closed below
        workers[proc] = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "worker", json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr_files[proc],
            limit=1 << 24)  # the RESULT line is long

    done = {proc: asyncio.Event() for proc in PROCS}
    results: dict[str, dict[str, Any]] = {}

    async def read_worker(proc: str) -> None:
        stdout = workers[proc].stdout
        assert stdout is not None
        async for line in stdout:
            if line.startswith(b"DONE"):
                done[proc].set()
            elif line.startswith(b"RESULT "):
                results[proc] = json.loads(line[len(b"RESULT "):])

    observer = aioredis.Redis.from_url(redis_url, decode_responses=True)
    samples = 0
    busiest = 0
    violations: list[str] = []

    async def observe() -> None:
        nonlocal samples, busiest
        while not all(e.is_set() for e in done.values()):
            if any(w.returncode is not None for w in workers.values()):
                return  # a worker died: the checks below report it
            pipe = observer.pipeline(transaction=True)  # one atomic picture of every node
            for nid in nodes:
                pipe.hmget(CK.node(nid), "max", "jobs")
            values = await pipe.execute()
            total = 0
            for k, nid in enumerate(nodes):
                cap, used = int(values[k][0]), len((values[k][1] or b"").split())  # used: the jobs it holds
                total += used
                if not 0 <= used <= cap:
                    violations.append(f"sample {samples}: {nid} used={used} max={cap}")
            busiest = max(busiest, total)
            samples += 1

    readers = [asyncio.create_task(read_worker(proc)) for proc in PROCS]
    try:
        await asyncio.wait_for(observe(), timeout=TIME_BUDGET_S)
        for proc in PROCS:
            await asyncio.wait_for(done[proc].wait(), timeout=10)
        for w in workers.values():
            assert w.stdin is not None
            w.stdin.write(b"STOP\n")
            await w.stdin.drain()
            w.stdin.close()
        for w in workers.values():
            await asyncio.wait_for(w.wait(), timeout=30)
        await asyncio.wait_for(asyncio.gather(*readers), timeout=10)
    finally:
        for w in workers.values():
            if w.returncode is None:
                w.kill()
                await w.wait()
        for task in readers:
            task.cancel()
        for f in stderr_files.values():
            f.close()
        await observer.aclose()

    stderr = {proc: (logs / f"{proc}.stderr").read_text()[-3000:] for proc in PROCS}
    for proc, w in workers.items():
        assert w.returncode == 0 and proc in results, f"worker {proc} exited {w.returncode}:\n{stderr[proc]}"
    for proc in PROCS:
        assert not results[proc]["errors"], f"{proc}: {results[proc]['errors']}"

    # the observer saw the work in flight, and never a node over capacity or out of step with its job set
    print(f"observer: {samples} samples, up to {busiest} of {sum(caps.values())} slots in use at once")
    assert not violations, violations[:20]
    assert samples >= 5 and busiest > 0, (samples, busiest)

    # I3: every job dispatched had exactly one outcome, completed, at the process that dispatched it
    all_jobs: set[str] = set()
    for proc in PROCS:
        res = results[proc]
        mine = set(res["dispatched"])
        assert len(mine) == SESSIONS_PER_WORKER * UTTERANCES_PER_SESSION
        assert not mine & all_jobs
        all_jobs |= mine
        assert set(res["outcomes"]) == mine, f"{proc} heard outcomes of jobs it did not dispatch"
        bad = {j: o for j, o in res["outcomes"].items() if o != ["completed"]}
        assert not bad, f"{proc}: jobs without exactly one 'completed' outcome: {list(bad.items())[:10]}"
    # every job was assigned exactly once, to a node of the process that received the assignment
    assigned = [a for proc in PROCS for a in results[proc]["assigns"]]
    assert sorted(assigned) == sorted(f"{j}/1" for j in all_jobs)
    assert sum(results[p]["counts"].get("completed", 0) for p in PROCS) == len(all_jobs)
    # both delivery paths were exercised: local replies and the other process's inbox
    for kind in ("assign_local", "assign_inbox", "outcome_local", "outcome_inbox"):
        assert sum(results[p]["counts"].get(kind, 0) for p in PROCS) > 0, (kind, [results[p]["counts"] for p in PROCS])

    # Redis agrees: every job completed, no slot in use, nothing pending or queued; the lease index
    # (scores no later than a node's earliest lease, cleared by the reaper) names nodes only
    check = Store.from_url(redis_url, SETTINGS, proc="checker")
    try:
        for jid in sorted(all_jobs):
            job = await check.job(jid)
            assert job is not None and job["state"] == "completed", (jid, job)
        report = await check.slot_report()
        assert report["used"] == 0 and not report["violations"], report
        assert report["max"] == sum(caps.values())
        client = check.client
        indexed = await client.zrange(CK.leases, 0, -1, withscores=True)
        for member, score in indexed:
            assert member.decode() in nodes, member
            assert int(await client.hget(CK.node(member.decode()), "lease_at")) == int(score), member
        assert await client.zcard(CK.pending) == 0
        for pool in POOLS:
            assert await client.llen(CK.queue(pool)) == 0, pool
        for nid in nodes:
            assert not await client.hget(CK.node(nid), "jobs"), nid
        stats = await check.stats()
        assert stats.get("jobs_completed") == len(all_jobs), stats
        assert stats.get("dispatched") == len(all_jobs), stats  # repeats of a dispatch are not counted
    finally:
        await check.aclose()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "worker":
        worker_main(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} worker '<json config>'")
