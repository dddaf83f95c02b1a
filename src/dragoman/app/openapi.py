"""The OpenAPI description of the HTTP API (served at /openapi.json, rendered at /docs)."""

from __future__ import annotations

from typing import Any


def _op(summary: str, tag: str, params: list[str] | None = None, body: bool = False,
        responses: dict[str, str] | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {
        code: {"description": text} for code, text in (responses or {"200": "OK"}).items()}}
    if params:
        op["parameters"] = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in params]
    if body:
        op["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"type": "object", "required": ["audio", "src_lang", "tgt_lang"],
                                             "properties": {
                                                 "audio": {"type": "string", "format": "byte"},
                                                 "audio_format": {"type": "string", "enum": ["wav", "pcm16", "opus"]},
                                                 "src_lang": {"type": "string"}, "tgt_lang": {"type": "string"},
                                                 "tgt_langs": {"type": "array", "items": {"type": "string"}},
                                                 "lang_a": {"type": "string"}, "lang_b": {"type": "string"}}}},
            "audio/wav": {"schema": {"type": "string", "format": "binary"}}}}
    return op


OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Dragoman scheduler", "version": "0.1.0",
             "description": "HTTP API of the Dragoman scheduler. WebSocket endpoints: /ws/node, /ws/session "
                            "(see PROTOCOL.md)."},
    "paths": {
        "/healthz": {"get": _op("Process is up", "health")},
        "/readyz": {"get": _op("Redis reachable and scripts loaded", "health",
                               responses={"200": "ready", "503": "not ready"})},
        "/api/v1/nodes": {"get": _op("Every node, live or recently offline", "nodes")},
        "/api/v1/nodes/{node_id}/drain": {"post": _op("Drain a node: no new jobs", "nodes", ["node_id"],
                                                      responses={"200": "OK", "404": "no such node"})},
        "/api/v1/nodes/{node_id}/undrain": {"post": _op("Put a drained node back to work", "nodes", ["node_id"])},
        "/api/v1/pools": {"get": _op("Pools with members, free slots and queue depth", "pools")},
        "/api/v1/sessions": {"get": _op("Sessions open on this process", "sessions")},
        "/api/v1/jobs/{job_id}": {"get": _op("One job's state", "jobs", ["job_id"],
                                             responses={"200": "OK", "404": "no such job"})},
        "/api/v1/jobs/{job_id}/cancel": {"post": _op("Cancel a job", "jobs", ["job_id"])},
        "/api/v1/stats": {"get": _op("Counters, slot check, latency", "stats")},
        "/api/v1/stream": {"get": _op("Server-sent events: a live snapshot every second", "stats")},
        "/api/v1/translate": {"post": _op("One-shot translation of an audio file", "translate", body=True,
                                          responses={"200": "results", "400": "bad input", "401": "bad key"})},
        "/metrics": {"get": _op("Prometheus metrics", "stats")},
    },
}
