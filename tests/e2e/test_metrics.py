"""Prometheus /metrics: scraped before and after real work, the counters move by the work done."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dragoman.client import SessionClient
from tests.e2e.peers import ScriptedNode
from tests.e2e.test_node_plane import one_utterance, ws

pytestmark = pytest.mark.e2e


async def scrape(base: str) -> dict[tuple[str, tuple], float]:
    async with httpx.AsyncClient() as c:
        text = (await c.get(base + "/metrics")).text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def val(m: dict, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_count_the_work_done(scheduler) -> None:
    base = scheduler()
    before = await scrape(base)
    node = await ScriptedNode.connect(ws(base), node_id="metered", slots=2)
    async with SessionClient.connect(ws(base) + "/ws/session", src_lang="zh", tgt_langs=["en"]) as client:
        for _ in range(3):
            await one_utterance(client)
        assigns = [await node.expect("job_assign") for _ in range(2)]  # two slots: the third waits
        await node.result(assigns[0], "a")
        await node.result(assigns[0], "again")  # a duplicate: counted, never delivered
        assigns.append(await node.expect("job_assign"))
        await node.result(assigns[1], "b")
        await node.send({"type": "job_result", "job_id": assigns[2]["job_id"], "attempt_id": 1,
                         "node_id": "metered", "success": False, "error": {"code": "PROCESSING_ERROR", "message": "x"}})
        await client.results(3)
        mid = await scrape(base)
        assert val(mid, "dragoman_open_sockets", endpoint="session") == 1
        await client.close()
    after = await scrape(base)
    assert val(after, "dragoman_job_outcomes_total", state="completed", code="") - \
        val(before, "dragoman_job_outcomes_total", state="completed", code="") == 2
    assert val(after, "dragoman_job_outcomes_total", state="failed", code="PROCESSING_ERROR") == 1
    assert val(after, "dragoman_dispatch_seconds_count") - val(before, "dragoman_dispatch_seconds_count") == 3
    assert val(after, "dragoman_e2e_seconds_count") - val(before, "dragoman_e2e_seconds_count") == 2
    assert val(after, "dragoman_rejected_results_total", reason="duplicate") == 1
    assert val(after, "dragoman_jobs", counter="dispatched") == 3
    assert val(after, "dragoman_nodes", state="ready") == 1
    assert val(after, "dragoman_slots_used") == 0 and val(after, "dragoman_slots_total") == 2
    assert val(after, "dragoman_queue_depth", pool="zh>en") == 0
    await node.close()
