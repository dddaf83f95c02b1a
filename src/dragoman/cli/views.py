"""Rich renderings of the cluster state, shared by ``dragoman status`` and the demo's live view."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

STATE_STYLE = {"ready": "green", "draining": "yellow", "offline": "red"}


def nodes_table(nodes: list[dict[str, Any]]) -> Table:
    t = Table(title="Nodes", expand=True)
    for col in ("node", "state", "slots", "pools", "heartbeat"):
        t.add_column(col)
    now = time.time() * 1000
    for n in nodes:
        used, cap = int(n.get("used", 0)), int(n.get("max", 0))
        bar = "█" * used + "·" * max(0, cap - used)
        age = (now - int(n.get("last_heartbeat", now))) / 1000
        state = n.get("state", "?")
        t.add_row(n.get("id", "?"), Text(state, style=STATE_STYLE.get(state, "")), f"{bar} {used}/{cap}",
                  n.get("pools", ""), f"{age:.1f}s ago")
    return t


def pools_table(pools: list[dict[str, Any]]) -> Table:
    t = Table(title="Pools", expand=True)
    for col in ("pool", "nodes", "free slots", "queued"):
        t.add_column(col)
    for p in pools:
        t.add_row(p["pool"], str(len(p["nodes"])), str(p["free_slots"]), str(p["queue_depth"]))
    return t


def counters_table(stats: dict[str, Any], extra: dict[str, str] | None = None) -> Table:
    c = stats.get("counters", {})
    t = Table(title="Jobs", expand=True)
    cols = {"dispatched": c.get("dispatched", 0), "completed": c.get("jobs_completed", 0),
            "empty": c.get("jobs_completed_empty", 0), "failed": c.get("jobs_failed", 0),
            "reassigned": c.get("reassigned", 0), "queued (ever)": c.get("queued", 0),
            "slots used": f"{stats.get('slots', {}).get('used', 0)}/{stats.get('slots', {}).get('max', 0)}"}
    cols.update(extra or {})
    for k in cols:
        t.add_column(k)
    t.add_row(*[str(v) for v in cols.values()])
    return t


def errors_table(stats: dict[str, Any]) -> Table:
    t = Table(title="Failures by code", expand=True)
    t.add_column("code")
    t.add_column("jobs")
    for k, v in sorted(stats.get("counters", {}).items()):
        if k.startswith("failed_"):
            t.add_row(k[len("failed_"):], str(v))
    return t


def cluster_view(nodes: list[dict[str, Any]], pools: list[dict[str, Any]], stats: dict[str, Any],
                 extra: dict[str, str] | None = None) -> Group:
    return Group(counters_table(stats, extra), nodes_table(nodes), pools_table(pools), errors_table(stats))
