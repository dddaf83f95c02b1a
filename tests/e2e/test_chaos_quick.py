"""The short version of the fault suite (``make chaos`` runs the full one and writes
docs/reliability.md): a few faults, a few seconds each, on real processes (Valkey, two schedulers,
five node agents, twenty speaking clients at 50 utterances/s), asserting that nothing the clients
sent is lost or duplicated and that every slot and job comes back.

Every utterance is also to be served (failed 0): in each of these faults the failed party is
replaced or back within seconds."""

from __future__ import annotations

from pathlib import Path

import pytest

from chaos.faults import FAULTS
from chaos.run import run_fault

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(100)]

CASES = [
    pytest.param("node-kill", id="node-kill"),
    pytest.param("sched-nodes-kill", id="sched-nodes-kill"),
    pytest.param("redis-restart", id="redis-restart"),
    pytest.param("fuzz", id="fuzz-500"),
    pytest.param("sched-sessions-kill", id="sched-sessions-kill"),
    pytest.param("forge", id="forge"),
]


@pytest.mark.parametrize("fault", CASES)
async def test_fault_quick(fault: str, tmp_path: Path) -> None:
    r = await run_fault(fault, quick=True, workdir=tmp_path, log=lambda _: None)
    summary = (f"{fault}: sent {r.sent}, outcomes {r.kinds}, lost {r.lost}, dup {r.duplicates}, leaked {r.leaked}, "
               f"non-terminal {r.non_terminal}, audit {r.audit}, crashed {r.crashed}, forged {r.forged}, "
               f"misrouted {r.misrouted}, error {r.error!r}, notes {r.notes}; logs in {tmp_path / fault}/logs")
    assert not r.error, summary
    assert r.sent > 100, summary  # the load ran
    assert r.lost == 0, summary
    assert r.duplicates == 0, summary
    assert r.leaked == 0 and not r.audit["violations"], summary
    assert r.non_terminal == 0, summary
    assert r.misrouted == 0, summary
    assert r.failed == 0, summary
    assert not r.crashed, summary
    if FAULTS[fault].attack:
        assert r.forged == 0, summary
