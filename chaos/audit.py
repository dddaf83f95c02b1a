"""Checks against Redis after quiescence: every slot came back (I1) and every job ended (I3).

Read straight from the keys (``store/keys.py`` names them) rather than through a scheduler process,
so the audit works whichever process is dead.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

TERMINAL = {b"completed", b"completed_empty", b"failed"}


@dataclass
class Audit:
    nodes: int = 0
    leaked: int = 0  # slots still taken: sum over nodes of max(used, jobs held)
    violations: list[str] = field(default_factory=list)  # I1: used != held, used < 0
    non_terminal: int = 0
    non_terminal_states: dict[str, int] = field(default_factory=dict)
    error: str = ""

    @property
    def clean(self) -> bool:
        return not self.error and self.leaked == 0 and not self.violations and self.non_terminal == 0


async def audit(rc: aioredis.Redis) -> Audit:
    out = Audit()
    try:
        async for key in rc.scan_iter(match="dragoman:*:node:*", count=1000):
            if await rc.type(key) != b"hash":
                continue
            out.nodes += 1
            jobs, used = await rc.hmget(key, "jobs", "used")
            held = (jobs or b"").split()  # the jobs it holds: its slots in use
            out.leaked += max(len(held), int(used or 0))
            if int(used or 0) != len(held) or len(set(held)) != len(held):
                out.violations.append(f"{key.decode().rsplit(':', 1)[-1]}: used={int(used or 0)} holds {held}")
        async for key in rc.scan_iter(match="dragoman:*:job:*", count=1000):
            if await rc.type(key) != b"hash":
                continue
            state = await rc.hget(key, "state") or b"?"
            if state not in TERMINAL:
                out.non_terminal += 1
                name = state.decode()
                out.non_terminal_states[name] = out.non_terminal_states.get(name, 0) + 1
    except Exception as exc:  # Redis unreachable: say so, do not pretend it is clean
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def quiesce(rc: aioredis.Redis, timeout: float) -> tuple[Audit, float]:
    """Audit until clean or ``timeout``; returns the last audit and how long it took."""
    start = time.monotonic()
    while True:
        result = await audit(rc)
        waited = time.monotonic() - start
        if result.clean or waited >= timeout:
            return result, waited
        await asyncio.sleep(0.25)
