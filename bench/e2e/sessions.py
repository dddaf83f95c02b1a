"""Session-side load generator: ``python -m bench.e2e.sessions --url ws://127.0.0.1:P/ws/session``.

S client sessions on one process, shaped like the existing web client: ``session_init`` (src zh, tgt
en, ``audio_format`` opus), then per utterance **one** ``audio_chunk`` carrying 256 ms of Opus in the
web client's "Plan A" framing (20 ms packets, each prefixed by its 2-byte little-endian length;
encoded once at start-up with opuslib_next, the same buffer reused) with ``is_final: true``. The
scheduler numbers a session's utterances from 0 in the order their final chunks arrive, and a
session's results come in that order, so each session keeps a FIFO of the utterances it has in
flight and checks every ``translation_result``'s ``utterance_index`` against it.

A job is complete when its ``translation_result`` is in hand; an ``error`` / ``missing_result``
naming the utterance fails it (counted). The load comes from ``bench.peers.loadgen`` (the same
closed and open loops as the peers): closed loop, ``--inflight`` utterances in flight over all
sessions; open loop, ``--rate`` utterances per second; either way each new utterance goes to the
next session round-robin (a session may have several in flight). Latency = final chunk sent ->
``translation_result`` received.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import math
import os
import time
from collections.abc import Callable
from typing import Any

import msgspec

from bench.e2e.nodes import run
from bench.e2e.rawws import RawWebSocket
from bench.peers import loadgen

CHUNK_MS = 256
PACKET_MS = 20


class Outbound(msgspec.Struct):
    type: str
    session_id: str | None = None
    utterance_index: int | None = None
    code: str | None = None
    message: str | None = None
    details: dict[str, Any] | None = None
    reason: str | None = None
    action: str | None = None


_decode = msgspec.json.Decoder(Outbound).decode


def opus_plan_a(ms: int = CHUNK_MS, sample_rate: int = 16000) -> bytes:
    """``ms`` of a 440 Hz tone with some noise, Opus-encoded in 20 ms packets, each length-prefixed
    (the last packet padded with silence, as the web client does)."""
    import random

    import opuslib_next as opus

    enc = opus.Encoder(sample_rate, 1, opus.APPLICATION_VOIP)
    n = sample_rate * ms // 1000
    rng = random.Random(7)
    samples = [int(8000 * math.sin(2 * math.pi * 440 * i / sample_rate) + rng.randint(-800, 800)) for i in range(n)]
    per = sample_rate * PACKET_MS // 1000
    out = bytearray()
    for start in range(0, n, per):
        frame = samples[start:start + per]
        frame += [0] * (per - len(frame))
        pcm = b"".join(int(s).to_bytes(2, "little", signed=True) for s in frame)
        packet = enc.encode(pcm, per)
        out += len(packet).to_bytes(2, "little") + packet
    return bytes(out)


class JobFailed(Exception):
    pass


class Session:
    def __init__(self, ws: RawWebSocket, session_id: str, payload_b64: str) -> None:
        self.ws, self.session_id = ws, session_id
        self.next_index = 0
        self.seq = 0
        self.pending: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._head = '{"type":"audio_chunk","session_id":"' + session_id + '","seq":'
        self._tail = ',"is_final":true,"payload":"' + payload_b64 + '","client_timestamp_ms":'

    async def utter(self) -> None:
        """Send one utterance (one final chunk) and wait for its translation_result."""
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((self.next_index, fut))
        self.next_index += 1
        frame = f"{self._head}{self.seq}{self._tail}{int(time.time() * 1000)}}}"
        self.seq += 1
        self.ws.send(frame)
        await fut

    def settle(self, index: int | None, error: str | None, stats: dict[str, Any]) -> None:
        if not self.pending:
            stats["unexpected"] += 1
            return
        if index is None or self.pending[0][0] == index:
            _, fut = self.pending.popleft()
        else:  # should not happen: results come in utterance order per session
            stats["out_of_order"] += 1
            match = [p for p in self.pending if p[0] == index]
            if not match:
                stats["unexpected"] += 1
                return
            self.pending.remove(match[0])
            fut = match[0][1]
        if fut.done():
            return
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(JobFailed(error))

    def read(self, stats: dict[str, Any]) -> None:
        """Take every frame in the socket's own callback; once the socket is gone, whatever it still
        owed has failed."""
        self.ws.handle(lambda raw: self._frame(raw, stats))
        self.ws.closed.add_done_callback(lambda _: self._lost())

    def _lost(self) -> None:
        while self.pending:
            _, fut = self.pending.popleft()
            if not fut.done():
                fut.set_exception(JobFailed("session socket closed"))

    def _frame(self, raw: str, stats: dict[str, Any]) -> None:
        msg = _decode(raw)
        kind = msg.type
        if kind == "translation_result":
            self.settle(msg.utterance_index, None, stats)
        elif kind == "ui_event" or kind == "server_heartbeat":
            return
        elif kind == "missing_result":
            stats["missing"] += 1
            self.settle(msg.utterance_index, f"missing_result {msg.reason}", stats)
        elif kind == "error":
            stats["errors"] += 1
            idx = (msg.details or {}).get("utterance_index")
            if stats["first_error"] == "":
                stats["first_error"] = f"{msg.code}: {msg.message}"
                loadgen.log(f"session error frame: {stats['first_error']}")
            if idx is not None:
                self.settle(int(idx), f"{msg.code}: {msg.message}", stats)
        elif kind == "backpressure":
            stats["backpressure"] += 1


def init_frame(src: str, tgt: str) -> str:
    return msgspec.json.encode({
        "type": "session_init", "client_version": "web-bench/1.0", "platform": "web", "src_lang": src,
        "tgt_lang": tgt, "dialect": None, "features": {}, "mode": "one_way", "audio_format": "opus",
        "sample_rate": 16000}).decode()


async def open_session(url: str, src: str, tgt: str, payload_b64: str) -> Session:
    ws = await RawWebSocket.connect(url)
    ws.send(init_frame(src, tgt))
    while True:
        msg = _decode(await ws.recv())
        if msg.type == "session_init_ack" and msg.session_id:
            return Session(ws, msg.session_id, payload_b64)
        if msg.type == "error":
            raise RuntimeError(f"session_init refused: {msg.code}: {msg.message}")


async def main_async(args: argparse.Namespace) -> None:
    payload = opus_plan_a()
    payload_b64 = base64.b64encode(payload).decode()
    t0 = time.perf_counter()
    sessions = await asyncio.gather(*(open_session(args.url, args.src, args.tgt, payload_b64)
                                      for _ in range(args.sessions)))
    stats: dict[str, Any] = {"errors": 0, "missing": 0, "backpressure": 0, "unexpected": 0, "out_of_order": 0,
                             "first_error": ""}
    for s in sessions:
        s.read(stats)
    loadgen.emit("ready", role="sessions", sessions=len(sessions), open_s=time.perf_counter() - t0,
                 payload_bytes=len(payload), chunk_frame_bytes=len(sessions[0]._head) + len(sessions[0]._tail) + 20,
                 pid=os.getpid())
    n = len(sessions)
    turn = [0]

    async def one(_slot: int) -> None:
        # round-robin over the sessions, so no session's chunk rate limit (chunks_per_s, 50 by
        # default) caps the total: S sessions allow S x 50 utterances/s
        k = turn[0]
        turn[0] = k + 1 if k + 1 < n else 0
        await sessions[k].utter()

    def frames() -> Callable[[], dict[str, Any]]:
        before = dict(stats)
        return lambda: {"frames": {k: stats[k] - before[k] for k in stats if k != "first_error"}, "sessions": n}

    await loadgen.run_phases(args, one, frames)
    await asyncio.gather(*(s.ws.close() for s in sessions), return_exceptions=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.e2e.sessions", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="ws://host:port/ws/session")
    ap.add_argument("--sessions", type=int, default=100)
    ap.add_argument("--src", default="zh")
    ap.add_argument("--tgt", default="en")
    loadgen.add_load_args(ap)
    ap.set_defaults(redis_url="")
    for a in ap._actions:  # the sessions never talk to Redis
        if a.dest == "redis_url":
            a.required = False
    run(main_async, ap.parse_args(argv))


if __name__ == "__main__":
    main()
