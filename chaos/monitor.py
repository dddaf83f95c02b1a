"""A sampler that watches the pool the load uses while a fault runs, to explain failures: how many of
the legitimate nodes were in the pool (able to take jobs) and how long the pool's wait queue got."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

from .topology import Topology

POOL = "en>zh"


@dataclass
class Sample:
    at: float
    in_pool: int
    queued: int


@dataclass
class Monitor:
    topo: Topology
    every: float = 0.5
    samples: list[Sample] = field(default_factory=list)

    async def run(self) -> None:
        rc = self.topo.rc
        ids = [self.topo.node_id(t) for t in self.topo.nodes]
        cells = [self.topo.cell_keys(c) for c in self.topo.shape.cells]
        while True:
            with contextlib.suppress(Exception):  # Redis down or stalled: no sample
                in_pool = queued = 0
                for ck in cells:
                    scores = await asyncio.wait_for(rc.zmscore(ck.pool(POOL), ids), self.every)
                    in_pool += sum(s is not None for s in scores)
                    queued += int(await asyncio.wait_for(rc.llen(ck.queue(POOL)), self.every))
                self.samples.append(Sample(time.monotonic(), in_pool, queued))
            await asyncio.sleep(self.every)  # a sampling period, not synchronisation

    def summary(self, t_fault: float) -> dict[str, str]:
        after = [s for s in self.samples if s.at >= t_fault]
        if not after:
            return {}
        n = len(self.topo.nodes)
        last = after[-1]
        return {f"legitimate nodes in pool {POOL} (min after the fault / at the end, of {n})":
                f"{min(s.in_pool for s in after)} / {last.in_pool}",
                f"queue {POOL} longest after the fault": str(max(s.queued for s in after))}
