"""Idle-socket load generator: many upstream-shaped sockets held open from one lean process.

``python -m bench.idle.gen --url ws://127.0.0.1:P --kind node|session --count K``

* ``node``: K ``/ws/node`` sockets, each sends the existing worker's ``node_register`` (as
  ``bench.e2e.nodes`` does) and then a ``node_heartbeat`` every ``--heartbeat-s`` (15 s) and
  nothing else. Protocol v1 has no reply to a heartbeat, so each heartbeat is followed at once by a
  WebSocket ping on the same socket; the scheduler reads a socket's frames in order, so the pong
  says the heartbeat was read and the scheduler's loop answered: *heartbeat reply* = heartbeat sent
  -> pong received.
* ``session``: K ``/ws/session`` sockets, each ``session_init`` and then a ``client_heartbeat``
  every ``--heartbeat-s`` (the web client's 15 s), answered by ``server_heartbeat`` (that round trip
  is the reply time).

The heartbeats are spread evenly: socket i of K is due at ``start + i/K x period`` (+ whole
periods), and never before its registration, so the rate is K/period from the start with no
bursts. Lean: the ``websockets`` asyncio client with compression off and no client keepalive (the
scheduler's pings are answered by the library), one reader task per socket that only counts what
it gets, one timer task for every heartbeat, uvloop when installed, the open-files limit raised.

Stdout, one JSON object a line: ``ready`` once every socket is open (and registered),
``stats`` on SIGUSR1 (cumulative heartbeats sent and answered, every reply time since the previous
``stats``, sockets closed by the scheduler), ``paused``/``resumed`` on SIGUSR2 (toggles the
heartbeats; a pause shifts the schedule, so the rate stays even), ``summary`` after SIGTERM once
every socket is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import heapq
import os
import signal
import time
from typing import Any

import msgspec
from websockets.asyncio.client import ClientConnection, connect

from bench.e2e.nodes import heartbeat_frame, register_frame, run
from bench.e2e.procs import raise_nofile
from bench.e2e.sessions import init_frame
from bench.peers.loadgen import emit, error_frame_seen, summarize_ms


class Reply(msgspec.Struct):
    type: str
    node_id: str | None = None
    session_id: str | None = None
    code: str | None = None
    message: str | None = None


_decode = msgspec.json.Decoder(Reply).decode


class Gen:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.socks: list[ClientConnection | None] = [None] * args.count
        self.ids: list[str] = [""] * args.count
        self.sent_at: list[collections.deque[float]] = [collections.deque() for _ in range(args.count)]
        self.sent = self.answered = self.closed = self.errors = 0
        self.rtts: list[float] = []
        self.first_error = ""
        self.stopping = False
        self.beats = 0
        self.pinged = 0  # heartbeats followed by a ping (the ones whose reply is timed)
        self.readers: list[asyncio.Task[None]] = []
        self.running = asyncio.Event()  # cleared while the heartbeats are paused
        self.running.set()
        self.paused_at = 0.0
        self.due: list[tuple[float, int]] = []

    # ------------------------------------------------------------------ sockets
    async def open_one(self, i: int, gate: asyncio.Semaphore) -> None:
        a = self.args
        async with gate:
            ws = await connect(a.url, compression=None, ping_interval=None, open_timeout=120,
                               max_size=1024 * 1024, max_queue=4)
            if a.kind == "node":
                await ws.send(register_frame(a.slots, ["zh", "en"], ["zh", "en"]))
            else:
                await ws.send(init_frame("zh", "en"))
            while True:
                msg = _decode(await ws.recv())
                if msg.type == "node_register_ack" and msg.node_id:
                    self.ids[i] = msg.node_id
                    break
                if msg.type == "session_init_ack" and msg.session_id:
                    self.ids[i] = msg.session_id
                    break
                if msg.type == "error":
                    raise RuntimeError(f"{a.kind} {i} refused: {msg.code}: {msg.message}")
        self.socks[i] = ws
        self.readers.append(asyncio.create_task(self.read(i)))

    async def read(self, i: int) -> None:
        ws = self.socks[i]
        assert ws is not None
        try:
            async for raw in ws:
                msg = _decode(raw)
                if msg.type == "server_heartbeat":
                    if self.sent_at[i]:
                        self.rtts.append(time.perf_counter() - self.sent_at[i].popleft())
                        self.answered += 1
                elif msg.type == "error":
                    error_frame_seen(self, msg.code, msg.message, f"{self.args.kind} {i}")
        except Exception:  # noqa: BLE001, S110 - the socket is gone: counted below
            pass
        self.socks[i] = None
        if not self.stopping:
            self.closed += 1

    # ------------------------------------------------------------------ heartbeats
    def _pong(self, t0: float) -> Any:
        def done(fut: asyncio.Future[float]) -> None:
            if not fut.cancelled() and fut.exception() is None:
                self.rtts.append(time.perf_counter() - t0)
                self.answered += 1
        return done

    async def beat(self, i: int) -> None:
        ws = self.socks[i]
        if ws is None:  # not registered yet (its next slot comes within a period), or closed
            return
        t0 = time.perf_counter()
        try:
            if self.args.kind == "node":
                await ws.send(heartbeat_frame(self.ids[i]))
                self.beats += 1
                if self.beats % self.args.ping_every == 0:
                    self.pinged += 1
                    waiter = await ws.ping()
                    waiter.add_done_callback(self._pong(t0))
            else:
                self.sent_at[i].append(t0)
                await ws.send(msgspec.json.encode({"type": "client_heartbeat", "session_id": self.ids[i],
                                                   "timestamp": int(time.time() * 1000)}).decode())
            self.sent += 1
        except Exception:  # noqa: BLE001, S110 - a closed socket is counted by its reader
            pass

    async def heartbeats(self, start: float) -> None:
        period, n = self.args.heartbeat_s, self.args.count
        self.due = [(start + period * i / n, i) for i in range(n)]
        heapq.heapify(self.due)
        while True:
            if not self.running.is_set():
                await self._wait_resume()
                continue
            t, i = self.due[0]
            wait = t - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(min(wait, 0.5))
                continue
            heapq.heapreplace(self.due, (t + period, i))
            await self.beat(i)

    async def _wait_resume(self) -> None:
        await self.running.wait()
        shift = time.perf_counter() - self.paused_at
        self.due = [(t + shift, i) for t, i in self.due]
        heapq.heapify(self.due)

    # ------------------------------------------------------------------ control
    def report(self) -> None:
        rtts, self.rtts = self.rtts, []
        emit("stats", kind=self.args.kind, sent=self.sent, pinged=self.pinged, answered=self.answered, closed=self.closed,
             errors=self.errors, open=sum(1 for s in self.socks if s is not None),
             reply_ms=summarize_ms(rtts), replies_ms=[round(x * 1000, 2) for x in rtts], cpu_s=_cpu_s())

    def toggle(self) -> None:
        if not self.running.is_set():
            self.running.set()
            emit("resumed", kind=self.args.kind, sent=self.sent)
        else:
            self.paused_at = time.perf_counter()
            self.running.clear()
            emit("paused", kind=self.args.kind, sent=self.sent)


def _cpu_s() -> float:
    t = os.times()
    return t.user + t.system


async def main_async(args: argparse.Namespace) -> None:
    gen = Gen(args)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, gen.report)
    loop.add_signal_handler(signal.SIGUSR2, gen.toggle)
    start = time.perf_counter()
    gate = asyncio.Semaphore(args.concurrency)
    # from the start: a socket's first heartbeat is its first slot after its registration (<= 15 s)
    beats = asyncio.create_task(gen.heartbeats(start))
    opened = await asyncio.gather(*(gen.open_one(i, gate) for i in range(args.count)), return_exceptions=True)
    failed = [r for r in opened if isinstance(r, BaseException)]
    emit("ready", kind=args.kind, count=args.count - len(failed), failed=len(failed),
         first_failure=repr(failed[0])[:300] if failed else "", open_s=time.perf_counter() - start,
         pid=os.getpid(), nofile=raise_nofile()[0])
    await stop.wait()
    gen.stopping = True
    beats.cancel()
    socks = [s for s in gen.socks if s is not None]
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*(s.close() for s in socks), return_exceptions=True), 60)
    for r in gen.readers:
        r.cancel()
    emit("summary", kind=args.kind, sent=gen.sent, answered=gen.answered, closed=gen.closed, errors=gen.errors,
         first_error=gen.first_error, cpu_s=_cpu_s())


def main(argv: list[str] | None = None) -> None:
    raise_nofile()
    ap = argparse.ArgumentParser(prog="python -m bench.idle.gen", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="ws://host:port (the endpoint path is added)")
    ap.add_argument("--kind", choices=("node", "session"), required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--heartbeat-s", type=float, default=15.0)
    ap.add_argument("--ping-every", type=int, default=1,
                    help="nodes: follow every K-th heartbeat with a ping that times its reply")
    ap.add_argument("--slots", type=int, default=4, help="max_concurrency each node reports")
    # a few at a time: the run measures holding the sockets, not a reconnect storm
    ap.add_argument("--concurrency", type=int, default=16, help="handshakes in progress at once")
    args = ap.parse_args(argv)
    args.url = args.url.rstrip("/") + ("/ws/node" if args.kind == "node" else "/ws/session")
    run(main_async, args)


if __name__ == "__main__":
    main()
