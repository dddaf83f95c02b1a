"""The floor under the scheduler's CPU per job, measured in the same run: a bare uvloop relay that
does only the socket work a job needs of the scheduler (read a frame from a session's socket, write
it to a node's, read the node's answer, write it back to the session), with no WebSocket, JSON,
Redis or bookkeeping, under the same load (at most 50 jobs in flight over 100 session and 32 node
sockets, from one client process that also plays the nodes, answering at once), paced to the
scheduler's own closed-loop rate of the same run (so it wakes up as often per job) and, for
reference, unpaced. Its CPU per job is what a job's four socket operations and the event loop's
wake-ups cost on this machine.

Frames: 4-byte length, 4-byte session index, payload (2 kB in, 200 B back, about a job's sizes).

    python -c "from bench.e2e.floor import measure; print(measure(5.0))"
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import subprocess
import sys
import time
from typing import Any

import uvloop

from bench.e2e.procs import proc_times

HEAD = struct.Struct("!II")  # payload length, session index
SESSIONS, NODES, INFLIGHT = 100, 32, 50
UP, DOWN = bytes(2048), bytes(200)


class _Framed(asyncio.Protocol):
    """Splits what arrives into frames and hands each to ``on_frame(session, frame)``."""

    def __init__(self, on_frame: Any) -> None:
        self.on_frame = on_frame
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        at = 0
        while len(buf) - at >= HEAD.size:
            n, sess = HEAD.unpack_from(buf, at)
            end = at + HEAD.size + n
            if len(buf) < end:
                break
            self.on_frame(self, sess, buf[at:end])
            at = end
        self.buf = buf[at:]


async def _relay(session_sock: socket.socket, node_sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    sessions: dict[int, _Framed] = {}
    nodes: list[_Framed] = []
    turn = [0]

    def from_session(proto: _Framed, sess: int, frame: bytes) -> None:
        sessions[sess] = proto
        node = nodes[turn[0] % len(nodes)]
        turn[0] += 1
        assert node.transport is not None
        node.transport.write(frame)

    def from_node(_proto: _Framed, sess: int, frame: bytes) -> None:
        transport = sessions[sess].transport
        assert transport is not None
        transport.write(frame)

    def node_proto() -> _Framed:
        p = _Framed(from_node)
        nodes.append(p)
        return p

    s1 = await loop.create_server(lambda: _Framed(from_session), sock=session_sock)
    s2 = await loop.create_server(node_proto, sock=node_sock)
    async with s1, s2:
        await asyncio.Event().wait()


async def _load(session_port: int, node_port: int, window_s: float, warmup_s: float, rate: float) -> None:
    """At most INFLIGHT jobs in flight; ``rate`` > 0 also paces them to that many a second (the
    scheduler's own closed-loop rate), else each ended job starts the next at once."""
    loop = asyncio.get_running_loop()
    done = [0]
    sessions: list[_Framed] = []
    idle: list[int] = list(range(INFLIGHT))

    def start(sess: int) -> None:
        transport = sessions[sess].transport
        assert transport is not None
        transport.write(HEAD.pack(len(UP), sess) + UP)

    def answer(node: _Framed, sess: int, _frame: bytes) -> None:  # a zero-time node
        assert node.transport is not None
        node.transport.write(HEAD.pack(len(DOWN), sess) + DOWN)

    def result(_proto: _Framed, sess: int, _frame: bytes) -> None:  # a job ended: the session's next
        done[0] += 1
        if rate > 0:
            idle.append(sess)
        else:
            start(sess)

    async def pace() -> None:
        t0, sent = loop.time(), 0
        while True:
            await asyncio.sleep(0.001)  # (the pacer's tick)
            due = int((loop.time() - t0) * rate)
            while sent < due and idle:
                start(idle.pop())
                sent += 1
            sent = max(sent, due - INFLIGHT)  # (behind with every job in flight: no burst to catch up)

    for _ in range(NODES):
        await loop.create_connection(lambda: _Framed(answer), "127.0.0.1", node_port)
    await asyncio.sleep(0.2)  # (the relay has seen the node sockets before any job)
    for _ in range(SESSIONS):
        sessions.append((await loop.create_connection(lambda: _Framed(result), "127.0.0.1", session_port))[1])
    if rate > 0:
        pacer = loop.create_task(pace())  # noqa: F841  (runs until the process is killed)
    else:
        for sess in idle:
            start(sess)
    await asyncio.sleep(warmup_s)  # (the load generator's own warm-up)
    print("window", flush=True)
    d0 = done[0]
    await asyncio.sleep(window_s)
    print(json.dumps({"jobs": done[0] - d0}), flush=True)



def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    return sock


def measure(window_s: float = 5.0, warmup_s: float = 2.0, rate: float = 0.0) -> dict[str, Any]:
    """The relay's CPU per job over ``window_s`` of the closed loop (paced to ``rate`` jobs/s if > 0)."""
    ss, ns = _listener(), _listener()
    # (run as -c: ``-m bench.e2e.floor`` would import this module twice, bench.e2e importing it first)
    me = [sys.executable, "-c", "import sys; from bench.e2e.floor import main; main(sys.argv[1:])"]
    relay = subprocess.Popen([*me, "relay", str(ss.fileno()), str(ns.fileno())], pass_fds=[ss.fileno(), ns.fileno()])
    ports = ss.getsockname()[1], ns.getsockname()[1]
    ss.close()
    ns.close()
    load = subprocess.Popen([*me, "load", str(ports[0]), str(ports[1]), str(window_s), str(warmup_s), str(rate)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None
        if load.stdout.readline().strip() != "window":
            raise RuntimeError("the floor's load generator did not start")
        c0, t0 = sum(proc_times(relay.pid)), time.monotonic()
        jobs = json.loads(load.stdout.readline())["jobs"]
        c1, t1 = sum(proc_times(relay.pid)), time.monotonic()
    finally:
        load.kill()
        relay.kill()
        load.wait()
        relay.wait()
    return {"jobs_per_s": jobs / (t1 - t0), "cores": (c1 - c0) / (t1 - t0),
            "us_per_job": (c1 - c0) / max(1, jobs) * 1e6, "window_s": round(t1 - t0, 1)}


def main(argv: list[str]) -> None:
    if argv[0] == "relay":
        uvloop.run(_relay(socket.socket(fileno=int(argv[1])), socket.socket(fileno=int(argv[2]))))
    elif argv[0] == "load":
        uvloop.run(_load(int(argv[1]), int(argv[2]), float(argv[3]), float(argv[4]), float(argv[5])))
    else:
        print(json.dumps(measure(float(argv[0]))))


if __name__ == "__main__":
    main(sys.argv[1:])
