"""HTTP surface: health, the read API, operator actions, one-shot translation, metrics, and the
live stream the dashboard reads."""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from dragoman.clock import monotonic_ms, wall_ms, wall_offset_ms
from dragoman.core.audio import read_wav_pcm16
from dragoman.errors import DependencyDown, ProtocolError
from dragoman.sessions.protocol import SessionProtocol
from dragoman.sessions.spec import SessionConfig, SessionSpec
from dragoman.store.replies import Status
from dragoman.wire import ErrorCode, SessionClose, SessionInit, Utterance
from dragoman.wire.codec import decode_session_outbound

from .openapi import OPENAPI
from .sockets import bearer

if TYPE_CHECKING:
    from .hub import Hub


def _hub(request: Request) -> Hub:
    return request.app.state.hub


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    hub = _hub(request)
    ok = await hub.store.ping()
    scripts = False
    if ok:
        try:
            await hub.store.load_scripts()
            scripts = True
        except DependencyDown:
            ok = False
    body: dict[str, Any] = {"redis": ok, "scripts_loaded": scripts, "target": hub.store.target}
    if ok:
        try:
            body["primary"] = await hub.store.primary()
        except DependencyDown:
            body["primary"] = None
    return JSONResponse({"status": "ready" if ok and scripts else "not_ready", **body},
                        status_code=200 if ok and scripts else 503)


def operator(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    """The operator surface (read API, actions, metrics, live stream) needs an operator token when
    ``operator_tokens`` is configured; when the listener requires credentials of nodes or clients
    but no operator token is configured, it is closed (never open to anyone while the rest is not)."""

    @functools.wraps(handler)
    async def guarded(request: Request) -> Response:
        s = _hub(request).settings
        if s.operator_tokens:
            if bearer(request, "token") not in s.operator_tokens:
                return _error(401, ErrorCode.UNAUTHORIZED, "this needs a valid operator token (Authorization: Bearer, "
                                                   "or ?token=)")
        elif s.node_tokens or s.api_keys:
            return _error(401, ErrorCode.UNAUTHORIZED, "node tokens or API keys are configured but no operator token: "
                                               "configure operator_tokens to use the operator surface")
        return await handler(request)

    return guarded


@operator
async def list_nodes(request: Request) -> Response:
    nodes = await _hub(request).store.nodes()
    for n in nodes:
        for field in ("info", "usage"):
            if n.get(field):
                try:
                    n[field] = json.loads(n[field])
                except ValueError:
                    pass
    return JSONResponse({"nodes": nodes})


@operator
async def list_pools(request: Request) -> Response:
    return JSONResponse({"pools": await _hub(request).store.pools()})


@operator
async def list_rooms(request: Request) -> Response:
    return JSONResponse({"rooms": await _hub(request).store.rooms()})


async def languages(request: Request) -> Response:
    """What the network can translate now, from the pools that have a node (for client pages; needs
    an API key when API keys are configured). A pool ``zh>en`` serves source ``zh``, target ``en``;
    a two-way pool ``a<>b`` is listed under ``two_way`` only (its nodes also serve both directed
    pairs, which have pools of their own)."""
    hub = _hub(request)
    keys = hub.settings.api_keys
    if keys and bearer(request, "api_key") not in keys:
        return _error(401, ErrorCode.UNAUTHORIZED, "missing or wrong API key")
    return JSONResponse(served_languages(p["pool"] for p in await hub.store.pools() if p["nodes"]))


def served_languages(pools: Iterable[str]) -> dict[str, Any]:
    """``pairs`` [src, tgt], ``two_way`` [a, b], ``sources``, ``targets``, and ``by_source``: the
    targets each source reaches."""
    pairs: set[tuple[str, str]] = set()
    two_way: set[tuple[str, str]] = set()
    for pool in pools:
        a, sep, b = pool.partition("<>")  # before ">": "a<>b" also contains ">"
        if sep:
            two_way.add((a, b))
            continue
        src, sep, tgt = pool.partition(">")
        if sep:
            pairs.add((src, tgt))
    by_source: dict[str, list[str]] = {}
    for src, tgt in sorted(pairs):
        by_source.setdefault(src, []).append(tgt)
    return {"pairs": sorted(pairs), "two_way": sorted(two_way), "sources": sorted(by_source),
            "targets": sorted({t for _, t in pairs}), "by_source": by_source}


@operator
async def list_sessions(request: Request) -> Response:
    return JSONResponse({"sessions": _hub(request).session_rows(), "scope": "this process"})


@operator
async def get_job(request: Request) -> Response:
    job = await _hub(request).store.job(request.path_params["job_id"])
    if job is None:
        return _error(404, "NOT_FOUND", "no such job (unknown, or ended and its outcome delivered)")
    return JSONResponse({"job": job})


@operator
async def stats(request: Request) -> Response:
    hub = _hub(request)
    await hub.store.flush_stats()
    report = await hub.store.slot_report()
    return JSONResponse({"counters": await hub.store.stats(), "slots": report, "latency": hub.metrics.snapshot()})


@operator
async def drain_node(request: Request) -> Response:
    return await _drain(request, True)


@operator
async def undrain_node(request: Request) -> Response:
    return await _drain(request, False)


async def _drain(request: Request, on: bool) -> Response:
    hub = _hub(request)
    try:
        reply = await hub.store.drain(request.path_params["node_id"], on=on, source="operator")
    except ValueError as exc:
        return _error(400, ErrorCode.INVALID_MESSAGE, str(exc))
    if reply.status == Status.UNKNOWN:
        return _error(404, "NOT_FOUND", "no such live node")
    return JSONResponse({"node": request.path_params["node_id"], "state": reply.state, "used": reply.used})


@operator
async def cancel_job(request: Request) -> Response:
    hub = _hub(request)
    reply = await hub.store.cancel(request.path_params["job_id"])
    if reply.status == Status.UNKNOWN:
        return _error(404, "NOT_FOUND", "no such job")
    return JSONResponse({"job": request.path_params["job_id"], "status": reply.status, "state": reply.state})


@operator
async def metrics(request: Request) -> Response:
    hub = _hub(request)
    await hub.metrics.refresh(hub.store)
    return Response(hub.metrics.render(), media_type="text/plain; version=0.0.4")


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


async def snapshot(hub: Hub) -> dict[str, Any]:
    nodes = await hub.store.nodes()
    lat = hub.metrics.snapshot()
    return {
        "ts": wall_ms(), "nodes": nodes, "pools": await hub.store.pools(),
        "sessions": hub.session_rows(), "rooms": await hub.store.rooms(), "stats": await hub.store.stats(),
        "latency_histogram": lat["e2e"], "rates": {
            "dispatch_p50_ms": lat["dispatch"]["p50_ms"], "dispatch_p95_ms": lat["dispatch"]["p95_ms"],
            "e2e_p50_ms": lat["e2e"]["p50_ms"], "e2e_p95_ms": lat["e2e"]["p95_ms"], "e2e_p99_ms": lat["e2e"]["p99_ms"]},
        "events": await hub.store.events(30),
    }


@operator
async def stream(request: Request) -> Response:
    hub = _hub(request)

    async def events() -> AsyncIterator[str]:
        last: tuple[float, int] | None = None
        while True:
            if await request.is_disconnected():
                return
            try:
                snap = await snapshot(hub)
            except DependencyDown as exc:
                yield f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n"
                await asyncio.sleep(2)
                continue
            done = sum(int(snap["stats"].get(k, 0)) for k in ("jobs_completed", "jobs_completed_empty", "jobs_failed"))
            now = time.monotonic()
            snap["rates"]["jobs_per_s"] = round((done - last[1]) / (now - last[0]), 2) if last else 0.0
            last = (now, done)
            yield f"data: {json.dumps(snap)}\n\n"
            await asyncio.sleep(1.0)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Collector:
    """A session sink that keeps what the session would have sent to a socket."""

    def __init__(self) -> None:
        self.frames: list[str] = []

    def send(self, text: str) -> bool:
        self.frames.append(text)
        return True

    send_soon = send


def _wav_to_pcm16(data: bytes) -> bytes:
    try:
        return read_wav_pcm16(io.BytesIO(data))[0]
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None


async def translate(request: Request) -> Response:
    """One-shot translation: ``{audio (base64), audio_format: wav|pcm16|opus, src_lang, tgt_lang,
    tgt_langs?, lang_a?, lang_b?}`` as JSON, or a raw ``audio/wav`` body with the languages as query
    parameters. Answers every target's outcome in one JSON document."""
    hub = _hub(request)
    keys = hub.settings.api_keys
    if keys and bearer(request, "api_key") not in keys:
        return _error(401, ErrorCode.UNAUTHORIZED, "missing or wrong API key")
    limit = hub.settings.max_frame_bytes
    if int(request.headers.get("content-length") or 0) > limit:
        return _error(413, ErrorCode.INVALID_MESSAGE, "request body too large")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            return _error(413, ErrorCode.INVALID_MESSAGE, "request body too large")
    try:
        if request.headers.get("content-type", "").startswith("application/json"):
            try:
                req = json.loads(body)
                audio = base64.b64decode(req.get("audio", ""), validate=True)
            except (ValueError, binascii.Error):
                raise ProtocolError("body must be JSON with base64 'audio'") from None
        else:
            req = dict(request.query_params)
            req.setdefault("audio_format", "wav")
            audio = bytes(body)
        fmt = req.get("audio_format", "wav")
        if fmt == "wav":
            audio, fmt = await asyncio.to_thread(_wav_to_pcm16, audio), "pcm16"
        if fmt not in ("pcm16", "opus"):
            raise ProtocolError("audio_format must be wav, pcm16 or opus")
        if not audio:
            raise ProtocolError("no audio")
        tgts = req.get("tgt_langs") or [req.get("tgt_lang")]
        if isinstance(tgts, str):
            tgts = tgts.split(",")
        init = msgspec.convert({"type": "session_init", "src_lang": req.get("src_lang"), "tgt_lang": tgts[0],
                                "tgt_langs": tgts, "audio_format": fmt, "lang_a": req.get("lang_a"),
                                "lang_b": req.get("lang_b"),
                                "mode": "two_way_auto" if req.get("src_lang") == "auto" else None}, SessionInit)
        key = bearer(request, "api_key")
        spec = SessionSpec.from_init(init, api_key=key)
    except (msgspec.ValidationError, ProtocolError) as exc:
        return _error(400, ErrorCode.INVALID_MESSAGE, getattr(exc, "message", str(exc)))
    sink = _Collector()
    proto = SessionProtocol(spec, SessionConfig.from_settings(hub.settings), now=monotonic_ms(),
                            wall_offset_ms=wall_offset_ms())
    actor = hub.new_session(proto, sink, api_key=key)
    try:
        task = asyncio.create_task(actor.run())
        for frame in (Utterance(utterance_index=0, src_lang=spec.src_lang, tgt_lang=tgts[0],
                                audio=base64.b64encode(audio).decode(), audio_format=fmt),
                      SessionClose(reason="one_shot")):
            await actor.frame_slots.acquire()
            actor.post_frame(frame)
        await task
    finally:
        hub.end_session(actor)
    results = [msgspec.to_builtins(decode_session_outbound(f)) for f in sink.frames]
    wanted = {"translation_result", "missing_result", "error"}
    return JSONResponse({"session_id": spec.session_id, "results": [r for r in results if r["type"] in wanted]})
