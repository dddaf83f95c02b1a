"""The operator's first contact: `dragoman demo` runs to its summary; `dragoman status` renders."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest

from tests.e2e.peers import ScriptedNode
from tests.e2e.test_node_plane import ws

pytestmark = pytest.mark.e2e


def test_demo_runs_to_summary_with_every_slot_returned() -> None:
    run = subprocess.run([sys.executable, "-m", "dragoman.cli.main", "demo", "--duration", "8"],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "every slot returned" in run.stdout and "demo OK" in run.stdout
    assert "killed gpu-delta" in run.stdout and "draining gpu-epsilon" in run.stdout


async def test_status_shows_nodes_and_metrics_move(scheduler) -> None:
    base = scheduler()
    node = await ScriptedNode.connect(ws(base), node_id="shown-node", slots=3)
    # The node must stay live (TTL 1.5 s here) while `status` starts, which can take longer on a slow host.
    beat = asyncio.create_task(node.keep_alive())
    out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "dragoman.cli.main", "status", "--url", base],
                                  capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "shown-node" in out.stdout and "zh>en" in out.stdout
    async with httpx.AsyncClient() as c:
        metrics = (await c.get(base + "/metrics")).text
    assert 'dragoman_nodes{state="ready"} 1.0' in metrics
    assert "dragoman_slots_total 3.0" in metrics
    assert 'dragoman_open_sockets{endpoint="node"} 1.0' in metrics
    beat.cancel()
    await node.close()


async def test_status_takes_an_operator_token(scheduler) -> None:
    base = scheduler(DRAGOMAN_OPERATOR_TOKENS="op-secret")
    argv = [sys.executable, "-m", "dragoman.cli.main", "status", "--url", base]
    refused = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "401" in refused.stderr
    by_flag = await asyncio.to_thread(subprocess.run, [*argv, "--token", "op-secret"], capture_output=True,
                                      text=True, timeout=60)
    assert by_flag.returncode == 0, by_flag.stderr
    by_env = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=60,
                                     env=os.environ | {"DRAGOMAN_TOKEN": "op-secret"})
    assert by_env.returncode == 0, by_env.stderr
