"""Node-side load generator: ``python -m bench.e2e.nodes --url ws://127.0.0.1:P/ws/node --nodes K``.

K node WebSockets on one process, each shaped like the existing worker (PROTOCOL.md section 1): a
``node_register`` with ``language_capabilities`` (asr/semantic/tts languages), installed services and
capabilities, plus the ``max_concurrency`` extension; a ``node_heartbeat`` every 15 s; and a
``job_result`` (success, short texts) sent the moment each ``job_assign`` arrives: a zero-time node.
No ``job_ack`` / ``job_started`` (the existing worker sends none).

Lean on purpose, so it is never the bottleneck: a raw WebSocket client (``bench.e2e.rawws``: each
``job_assign`` answered in the socket's own callback, no task woken), msgspec decoding only the
fields it needs (the audio is skipped, never decoded), a result frame built by one
``msgspec.json.encode``, uvloop when installed.

Prints ``{"event": "ready", "nodes": K, "node_ids": [...]}`` once every node is registered, and on
SIGTERM/SIGINT a ``{"event": "summary", ...}`` line (jobs answered, error frames, cancels).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import time
from typing import Any

import msgspec

from bench.e2e.rawws import RawWebSocket
from bench.peers.loadgen import emit, error_frame_seen

HEARTBEAT_S = 15.0


class Inbound(msgspec.Struct):
    type: str
    job_id: str | None = None
    attempt_id: int | None = None
    session_id: str | None = None
    utterance_index: int | None = None
    trace_id: str | None = None
    node_id: str | None = None
    code: str | None = None
    message: str | None = None


_decode = msgspec.json.Decoder(Inbound).decode
_encode = msgspec.json.Encoder().encode


def register_frame(slots: int, src: list[str], tgt: list[str]) -> str:
    services = [{"service_id": f"{kind}-bench", "type": kind, "device": "gpu", "status": "running", "version": "1.0"}
                for kind in ("asr", "nmt", "tts", "semantic")]
    return _encode({
        "type": "node_register", "node_id": None, "version": "bench-node/1.0", "capability_schema_version": "1.0",
        "platform": "linux-x64", "hardware": {"cpu_cores": 16, "memory_gb": 64.0,
                                             "gpus": [{"name": "bench", "memory_gb": 24.0}]},
        "installed_models": [], "installed_services": services,
        "capability_by_type": [{"type": k, "ready": True} for k in ("asr", "nmt", "tts", "semantic")],
        "features_supported": {}, "accept_public_jobs": True,
        "language_capabilities": {"asr_languages": src, "semantic_languages": tgt, "tts_languages": tgt,
                                  "semantic_core_ready": True},
        "max_concurrency": slots,
    }).decode()


def heartbeat_frame(node_id: str) -> str:
    """A ``node_heartbeat`` as the existing worker sends it every 15 s."""
    return _encode({
        "type": "node_heartbeat", "node_id": node_id, "timestamp": int(time.time() * 1000),
        "resource_usage": {"cpu_percent": 1.0, "mem_percent": 1.0, "running_jobs": 0},
        "installed_services": [], "capability_by_type": [
            {"type": k, "ready": True} for k in ("asr", "nmt", "tts", "semantic")]}).decode()


class Stats:
    def __init__(self) -> None:
        self.answered = 0
        self.errors = 0
        self.cancels = 0
        self.first_error = ""


async def run_node(i: int, args: argparse.Namespace, stats: Stats, registered: asyncio.Queue[str],
                   stop: asyncio.Event) -> None:
    src, tgt = args.asr_languages.split(","), args.semantic_languages.split(",")
    ws = await RawWebSocket.connect(args.url)
    try:
        ws.send(register_frame(args.slots, src, tgt))
        node_id = ""
        while not node_id:
            msg = _decode(await ws.recv())
            if msg.type == "node_register_ack":
                node_id = msg.node_id or ""
            elif msg.type == "error":
                raise RuntimeError(f"node_register refused: {msg.code}: {msg.message}")
        await registered.put(node_id)
        prefix = '{"type":"job_result","node_id":"' + node_id + '","success":true,'
        tail = (',"text_asr":"今天天气很好","text_translated":"The weather is nice today.","tts_audio":"",'
                '"tts_format":"pcm16","processing_time_ms":0,"extra":{"service_timings":{}}}')

        def on_text(raw: str) -> None:  # (in the socket's callback: the result leaves before it returns)
            msg = _decode(raw)
            if msg.type == "job_assign":
                ws.send(prefix + _encode({
                    "job_id": msg.job_id, "attempt_id": msg.attempt_id, "session_id": msg.session_id,
                    "utterance_index": msg.utterance_index, "trace_id": msg.trace_id})[1:-1].decode() + tail)
                stats.answered += 1
            elif msg.type == "job_cancel":
                stats.cancels += 1
            elif msg.type == "error":
                error_frame_seen(stats, msg.code, msg.message, f"node {i}")

        ws.handle(on_text)
        while not ws.closed.done() and not stop.is_set():
            await asyncio.wait([ws.closed], timeout=HEARTBEAT_S)  # (the heartbeat's period, not a synchronisation)
            if not ws.closed.done():
                ws.send(heartbeat_frame(node_id))
    finally:
        await ws.close()


async def main_async(args: argparse.Namespace) -> None:
    stats, stop = Stats(), asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    registered: asyncio.Queue[str] = asyncio.Queue()
    t0 = time.perf_counter()
    tasks = [asyncio.create_task(run_node(i, args, stats, registered, stop)) for i in range(args.nodes)]
    ids: list[str] = []
    while len(ids) < args.nodes:
        getter = asyncio.create_task(registered.get())
        done, _ = await asyncio.wait([getter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if getter in done:
            ids.append(getter.result())
            continue
        getter.cancel()
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    emit("ready", role="nodes", nodes=len(ids), node_ids=ids, register_s=time.perf_counter() - t0,
         pid=os.getpid())
    await stop.wait()
    for t in tasks:
        t.cancel()
    with contextlib.suppress(Exception):
        await asyncio.gather(*tasks, return_exceptions=True)
    t = os.times()
    emit("summary", role="nodes", answered=stats.answered, errors=stats.errors, cancels=stats.cancels,
         first_error=stats.first_error, cpu_s=t.user + t.system)


def run(coro_main: Any, args: argparse.Namespace) -> None:
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        runner.run(coro_main(args))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.e2e.nodes", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", required=True, help="ws://host:port/ws/node")
    ap.add_argument("--nodes", type=int, default=32)
    ap.add_argument("--slots", type=int, default=4, help="max_concurrency each node reports")
    ap.add_argument("--asr-languages", default="zh,en")
    ap.add_argument("--semantic-languages", default="zh,en")
    run(main_async, ap.parse_args(argv))


if __name__ == "__main__":
    main()
