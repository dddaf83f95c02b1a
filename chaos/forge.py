"""Forged and replayed results and partials, sent while the load runs.

Two attacker nodes register properly (their own ids, a language pair nobody uses, so they never hold
a job) directly on scheduler A and on scheduler B (B holds the sessions, so a partial relayed there
would reach a client). In a loop they pick legitimate jobs (in flight: seen ``DISPATCHED`` by the
speakers, holder and attempt read from the job hash in Redis; finished: seen translated) and send:

- ``job_result`` for an in-flight job with the right attempt, under the attacker's own node id;
- the same claiming the holder's node id over the attacker's connection;
- ``asr_partial`` with a legitimate session id and utterance, from each attacker node;
- ``job_ack`` / ``job_started`` for another node's job;
- a replay of a finished job's result, with its holder's id and attempt;
- and, every second, a **takeover**: a new connection registers with the node id of a live
  legitimate node holding a job (I11 forbids that); if the scheduler accepts, it sends a forged result
  for that job with the right attempt and a replay of a finished job of that node, then goes away.

Every forged text contains ``FORGED``; the speakers count any such text they receive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from dragoman.store.api import job_view

from .load import Ledger
from .topology import Topology


@dataclass
class ForgeStats:
    sent: Counter[str] = field(default_factory=Counter)
    replies: Counter[str] = field(default_factory=Counter)  # "<action>: <code>"
    takeovers_tried: int = 0
    takeovers_accepted: int = 0


def register_frame(node_id: str, pairs: list[list[str]], slots: int) -> str:
    return json.dumps({"type": "node_register", "node_id": node_id, "version": "forger", "platform": "linux",
                       "hardware": {"cpu_cores": 1, "memory_gb": 1}, "installed_models": [],
                       "capability_by_type": [], "features_supported": {}, "accept_public_jobs": True,
                       "language_pairs": pairs, "max_concurrency": slots})


def result_frame(job: dict[str, Any], node_id: str, attempt: int, text: str) -> str:
    return json.dumps({"type": "job_result", "job_id": job["id"], "attempt_id": attempt, "node_id": node_id,
                       "session_id": job["session"], "utterance_index": job["utt"], "trace_id": "forged",
                       "success": True, "text_asr": text, "text_translated": text, "tts_audio": "",
                       "tts_format": ""})


class Forger:
    def __init__(self, topo: Topology, ledger: Ledger, seed: int = 0) -> None:
        self.topo, self.ledger = topo, ledger
        self.stats = ForgeStats()
        self.rng = random.Random(seed)

    async def _open(self, url: str, node_id: str, pairs: list[list[str]], slots: int,
                    tag: str) -> tuple[ClientConnection, dict[str, Any]] | None:
        try:
            ws = await connect(url + "/ws/node", open_timeout=3, close_timeout=1, max_size=None)
            await ws.send(register_frame(node_id, pairs, slots))
            ack = json.loads(await asyncio.wait_for(ws.recv(), 3))
        except Exception as exc:
            self.stats.replies[f"{tag}: connect failed ({type(exc).__name__})"] += 1
            return None
        return ws, ack

    async def _read(self, ws: ClientConnection, tag: str) -> None:
        with contextlib.suppress(Exception):
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "error":
                    text = str(msg.get("message", ""))
                    reason = "rejected" if "rejected" in text else "not registered node" \
                        if "not the node registered" in text else msg.get("code")
                    self.stats.replies[f"{tag}: error {reason}"] += 1
                else:
                    self.stats.replies[f"{tag}: {kind}"] += 1

    async def _job(self, job_id: str) -> dict[str, Any] | None:
        raw = await self.topo.rc.hgetall(f"dragoman:{{c0}}:job:{job_id}")
        if not raw:
            return None
        job = job_view(job_id, raw)
        job["utt"] = int(job.get("utt") or 0)
        job["attempt"] = int(job.get("attempt") or 0)
        return job

    async def _in_flight(self) -> dict[str, Any] | None:
        recent = list(self.ledger.dispatched)[-40:]
        self.rng.shuffle(recent)
        for job_id in recent[:10]:
            job = await self._job(job_id)
            if job and job.get("state") in ("assigned", "running") and job.get("node"):
                return job
        return None

    async def _finished(self) -> dict[str, Any] | None:
        if not self.ledger.translated_jobs:
            return None
        job_id, _, _ = self.rng.choice(self.ledger.translated_jobs[-200:])
        return await self._job(job_id)

    async def run(self, duration: float) -> None:
        attackers = []
        readers = []
        for name in ("A", "B"):
            opened = await self._open(self.topo.ws(name), f"forger-{name}", [["fz", "fy"]], 2, f"forger-{name}")
            if opened is not None:
                ws, _ = opened
                attackers.append((name, ws))
                readers.append(asyncio.create_task(self._read(ws, "forger")))
        end = time.monotonic() + duration
        next_takeover = time.monotonic() + 0.5
        try:
            while time.monotonic() < end:
                await asyncio.sleep(0.05)  # the attack's pace
                job = await self._in_flight()
                for name, ws in attackers:
                    own = f"forger-{name}"
                    with contextlib.suppress(Exception):
                        if job is not None:
                            await self._send(ws, "result as self", result_frame(job, own, job["attempt"],
                                                                                 f"FORGED result by {own}"))
                            await self._send(ws, "result claiming holder", result_frame(
                                job, job["node"], job["attempt"], "FORGED result claiming holder"))
                            await self._send(ws, "asr_partial", json.dumps({
                                "type": "asr_partial", "job_id": job["id"], "node_id": own,
                                "session_id": job["session"], "utterance_index": job["utt"],
                                "text": "FORGED partial", "is_final": True, "trace_id": "forged"}))
                            for kind, nid in (("job_started", own), ("job_ack", job["node"])):
                                await self._send(ws, f"{kind} for another's job", json.dumps({
                                    "type": kind, "job_id": job["id"], "attempt_id": job["attempt"],
                                    "node_id": nid, "session_id": job["session"]}))
                        done = await self._finished()
                        if done is not None and done.get("node"):
                            await self._send(ws, "replay of finished result", result_frame(
                                done, done["node"], done["attempt"], "FORGED replay"))
                            await self._send(ws, "replay as self", result_frame(
                                done, own, done["attempt"], "FORGED replay"))
                if time.monotonic() >= next_takeover:
                    next_takeover = time.monotonic() + 1.0
                    await self._takeover()
        finally:
            for _, ws in attackers:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 1)
            for r in readers:
                r.cancel()

    async def _send(self, ws: ClientConnection, action: str, frame: str) -> None:
        await ws.send(frame)
        self.stats.sent[action] += 1

    async def _takeover(self) -> None:
        job = await self._in_flight()
        if job is None:
            return
        done = await self._finished()
        self.stats.takeovers_tried += 1
        target = self.rng.choice(["A", "B"])
        opened = await self._open(self.topo.ws(target) if self.topo.schedulers[target].alive() else
                                  self.topo.ws("A" if target == "B" else "B"),
                                  job["node"], [["zh", "en"], ["en", "zh"]], 6, "takeover")
        if opened is None:
            return
        ws, ack = opened
        reader = asyncio.create_task(self._read(ws, "takeover"))
        try:
            if ack.get("type") != "node_register_ack":
                self.stats.replies[f"takeover: refused ({ack.get('code')})"] += 1
                return
            self.stats.takeovers_accepted += 1
            await self._send(ws, "takeover: result for the node's job", result_frame(
                job, job["node"], job["attempt"], "FORGED result after takeover"))
            if done is not None and done.get("node") == job["node"]:
                await self._send(ws, "takeover: replay", result_frame(done, done["node"], done["attempt"],
                                                                      "FORGED replay after takeover"))
            await asyncio.sleep(0.3)  # let the answers arrive before going away
        except Exception:
            pass
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1)
            reader.cancel()
