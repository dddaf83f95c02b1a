"""Every Redis key name Dragoman uses, and nowhere else (the Lua side mirrors it in
``lua/includes/keys.lua``; a test compares the two).

All keys of a cell share the prefix ``<prefix>:{<cell>}:``. The braces are the hash tag: in a Redis
Cluster every key of one cell lands in one hash slot, so one script can touch all of them (I9).
"""

from __future__ import annotations

import re
import zlib

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_POOL = re.compile(r"^[A-Za-z0-9_.\-]{1,32}(>|<>)[A-Za-z0-9_.\-]{1,32}$")


def check_name(kind: str, value: str) -> str:
    """Ids become parts of key names: keep them free of separators, spaces and braces."""
    if not _NAME.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-128 characters of letters, digits, '_', '.', '-'")
    return value


def check_pool(value: str) -> str:
    """Pool ids are ``src>tgt`` (one direction) or ``a<>b`` (both directions); see core/pools.py."""
    if not _POOL.match(value):
        raise ValueError(f"pool id {value!r} must look like 'zh>en' or 'en<>zh'")
    return value


class CellKeys:
    __slots__ = ("cell", "base")

    def __init__(self, prefix: str, cell: str) -> None:
        self.cell = cell
        self.base = f"{prefix}:{{{cell}}}:"

    # fixed keys of a cell
    @property
    def nodes(self) -> str:  # zset node_id -> heartbeat deadline (ms); the cell's anchor key
        return self.base + "nodes"

    @property
    def pools(self) -> str:  # set of pool ids ever served in this cell
        return self.base + "pools"

    @property
    def leases(self) -> str:  # zset job_id -> lease deadline (assigned jobs)
        return self.base + "leases"

    @property
    def pending(self) -> str:  # zset job_id -> pending deadline (queued jobs)
        return self.base + "pending"

    @property
    def stats(self) -> str:  # hash of counters
        return self.base + "stats"

    @property
    def events(self) -> str:  # capped stream of notable events
        return self.base + "events"

    @property
    def procs(self) -> str:  # zset scheduler process id -> registration deadline
        return self.base + "procs"

    @property
    def offline(self) -> str:  # zset node_id -> when it went offline (kept an hour, for operators)
        return self.base + "offline"

    @property
    def clock(self) -> str:  # test-only clock offset (ms) added to the server's TIME
        return self.base + "clock"

    # keys per entity
    def node(self, node_id: str) -> str:
        return f"{self.base}node:{node_id}"

    def node_jobs(self, node_id: str) -> str:
        return f"{self.base}node:{node_id}:jobs"

    def pool(self, pool_id: str) -> str:
        return f"{self.base}pool:{pool_id}"

    def queue(self, pool_id: str) -> str:
        return f"{self.base}queue:{pool_id}"

    def job(self, job_id: str) -> str:
        return f"{self.base}job:{job_id}"

    def jobdata(self, job_id: str) -> str:
        return f"{self.base}jobdata:{job_id}"

    def affinity(self, session_id: str) -> str:
        return f"{self.base}affinity:{session_id}"

    def inbox(self, proc: str) -> str:
        return f"{self.base}inbox:{proc}"


def cell_of_node(node_id: str, cells: tuple[str, ...]) -> str:
    """A node lives in exactly one cell, chosen by a stable hash of its id."""
    return cells[zlib.crc32(node_id.encode()) % len(cells)]


def job_id_for(cell: str, unique: str) -> str:
    """Job ids name their cell, so a result finds its job's cell without a lookup."""
    return f"{cell}.{unique}"


def cell_of_job(job_id: str, cells: tuple[str, ...]) -> str | None:
    cell, sep, _ = job_id.partition(".")
    return cell if sep and cell in cells else None
