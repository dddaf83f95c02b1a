"""Every Redis key name Dragoman uses, and nowhere else (the Lua side mirrors it in
``lua/includes/keys.lua``; a test compares the two).

All keys of a cell share the prefix ``<prefix>:{<cell>}:``. The braces are the hash tag: in a Redis
Cluster every key of one cell lands in one hash slot, so one script can touch all of them (I9).
"""

from __future__ import annotations

import re
import zlib

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}\Z")  # (\Z: "$" lets a final newline through)
_POOL = re.compile(r"^[A-Za-z0-9_.\-]{1,32}(>|<>)[A-Za-z0-9_.\-]{1,32}\Z")


def check_name(kind: str, value: str) -> str:
    """Ids become parts of key names: keep them free of separators, spaces and braces."""
    if not _NAME.match(value):
        raise ValueError(f"{kind} {value!r} must be 1-128 characters of letters, digits, '_', '.', '-'")
    return value


def check_pool(value: str) -> str:
    """Pool ids are ``src>tgt`` (one direction) or ``a<>b`` (both directions); see core/pools.py."""
    if value in _GOOD_POOLS:  # (a network has a few dozen pools; every job names one)
        return value
    if not _POOL.match(value):
        raise ValueError(f"pool id {value!r} must look like 'zh>en' or 'en<>zh'")
    if len(_GOOD_POOLS) < 4096:
        _GOOD_POOLS.add(value)
    return value


_GOOD_POOLS: set[str] = set()


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
    def pools(self) -> str:  # hash pool id -> registered nodes serving it
        return self.base + "pools"

    @property
    def pools_gone(self) -> str:  # hash pool id -> when its last node left (see warmup_ms)
        return self.base + "pools_gone"

    @property
    def leases(self) -> str:  # zset node_id -> no later than the earliest lease of the jobs it holds
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
    def orphans(self) -> str:  # zset session_id -> end of its resume grace (socket or process lost)
        return self.base + "orphans"

    @property
    def rooms(self) -> str:  # zset room code -> when it expires (no speech for room_expiry_ms)
        return self.base + "rooms"

    @property
    def boot(self) -> str:  # "token:ms": the cell's data generation (changes when Redis lost its data)
        return self.base + "boot"

    @property
    def clock(self) -> str:  # test-only clock offset (ms) added to the server's TIME
        return self.base + "clock"

    # keys per entity
    def node(self, node_id: str) -> str:  # hash; its "jobs" field: the jobs it holds, space separated
        return f"{self.base}node:{node_id}"

    def pool(self, pool_id: str) -> str:
        return f"{self.base}pool:{pool_id}"

    def queue(self, pool_id: str) -> str:
        return f"{self.base}queue:{pool_id}"

    def job(self, job_id: str) -> str:  # hash; "data" holds the job_assign body while it lives
        return f"{self.base}job:{job_id}"

    def sess(self, session_id: str) -> str:  # hash: holder, epoch, affinity, owed jobs (see sessions.lua)
        return f"{self.base}sess:{session_id}"

    def inbox(self, proc: str) -> str:  # stream of effects for sockets held by that process
        return f"{self.base}inbox:{proc}"

    def proc_nodes(self, proc: str) -> str:  # set of node ids registered through that process
        return f"{self.base}proc:{proc}:nodes"

    def proc_sessions(self, proc: str) -> str:  # set of session ids held by that process
        return f"{self.base}proc:{proc}:sessions"

    def room(self, code: str) -> str:  # hash: the room's id, when it was made, its last speech
        return f"{self.base}room:{code}"

    def room_members(self, code: str) -> str:  # hash session id -> member (JSON)
        return f"{self.base}room:{code}:members"

    def proc_rooms(self, proc: str) -> str:  # set of "code session_id": room members held by that process
        return f"{self.base}proc:{proc}:rooms"

    def reply(self, call_id: str) -> str:  # a kept reply, for a retry after a lost one (30 s)
        return f"{self.base}reply:{call_id}"


def cell_of_node(node_id: str, cells: tuple[str, ...]) -> str:
    """A node lives in exactly one cell, chosen by a stable hash of its id."""
    return cells[zlib.crc32(node_id.encode()) % len(cells)]


def job_id_for(cell: str, unique: str) -> str:
    """Job ids name their cell, so a result finds its job's cell without a lookup."""
    return f"{cell}.{unique}"


def cell_of_job(job_id: str, cells: tuple[str, ...]) -> str | None:
    """The cell a job id names (cell names never contain '.', see config)."""
    cell, sep, _ = job_id.partition(".")
    return cell if sep and cell in cells else None


def room_cell(code: str, cells: tuple[str, ...]) -> str:
    """A room lives in one cell, chosen by its code (so a code is unique where it is made)."""
    return cells[zlib.crc32(code.encode()) % len(cells)]


def home_cell(session_id: str, cells: tuple[str, ...]) -> str:
    """A session's home cell keeps its settings and resume point; its jobs may be in any cell."""
    if len(cells) == 1:  # (no hash to compute: the common, single-cell deployment)
        return cells[0]
    return cells[zlib.crc32(session_id.encode()) % len(cells)]
