"""``dragoman serve --workers N``: N scheduler processes behind one port. Connections spread over
them, a session on one worker is served by nodes on the others (their effects cross through Redis),
and a worker that dies is started again."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import pytest
import redis.asyncio as aioredis

from dragoman.client import SessionClient
from dragoman.wire import TranslationResult
from tests.e2e.peers import ScriptedNode
from tests.e2e.test_node_plane import one_utterance, ws
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
NODES = 16
UTTERANCES = 12


async def answering(node: ScriptedNode) -> None:
    """Answers every job at once (a duty loop)."""
    while True:
        job = await node.expect("job_assign", timeout=3600)
        await node.result(job)


def workers_of(pid: int) -> set[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {int(c) for c in children if b"spawn_main" in _cmdline(c)}


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except (ProcessLookupError, FileNotFoundError):  # (a child that exited since it was listed)
        return b""


async def test_two_workers_share_the_port_and_serve_each_other_s_sockets(scheduler, redis_url: str) -> None:
    base = scheduler(DRAGOMAN_WORKERS="2")
    rc = aioredis.Redis.from_url(redis_url)

    async def both_up() -> bool:  # each worker registers itself in Redis once it serves
        return await rc.zcard("dragoman:{c0}:procs") == 2

    await wait_for(both_up, timeout=20)
    nodes = [await ScriptedNode.connect(ws(base), node_id=f"w-{i}", slots=2) for i in range(NODES)]
    duties = [asyncio.create_task(d) for n in nodes for d in (n.keep_alive(), answering(n))]
    try:
        holders = {(await rc.hget(f"dragoman:{{c0}}:node:w-{i}", "proc")) for i in range(NODES)}
        assert len(holders) == 2, f"all {NODES} node sockets landed on one worker: {holders}"
        async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
            own = await rc.hget(f"dragoman:{{c0}}:sess:{client.session_id}", "proc")
            assert own in holders
            for i, n in enumerate(nodes):  # only nodes on the other worker are left to serve the session
                if await rc.hget(f"dragoman:{{c0}}:node:w-{i}", "proc") == own:
                    await n.close()

            async def only_others_in_pool() -> bool:
                members = await rc.zrange("dragoman:{c0}:pool:zh>en", 0, -1)
                procs = [await rc.hget(f"dragoman:{{c0}}:node:{m.decode()}", "proc") for m in members]
                return bool(procs) and own not in procs

            await wait_for(only_others_in_pool, timeout=10)
            for _ in range(UTTERANCES):
                await one_utterance(client, ms=200)
            outcomes = await client.results(UTTERANCES, timeout=30)
        assert sorted(m.utterance_index for m in outcomes if isinstance(m, TranslationResult)) == list(
            range(UTTERANCES))  # every job crossed to the other worker and its outcome came back
    finally:
        for d in duties:
            d.cancel()
        await rc.aclose()


async def test_a_worker_that_dies_is_started_again(scheduler) -> None:
    base = scheduler(DRAGOMAN_WORKERS="2")
    supervisor = base.proc.popen.pid
    first = workers_of(supervisor)
    assert len(first) == 2
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        now = workers_of(supervisor)
        return len(now) == 2 and victim not in now

    await wait_for(replaced, timeout=20)
    async with httpx.AsyncClient() as c:
        for _ in range(4):  # whichever worker takes the connection answers
            assert (await c.get(base + "/readyz")).status_code == 200
