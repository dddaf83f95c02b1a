"""The operator- and client-facing HTTP surface in process (Starlette's TestClient, a real Valkey)."""

from __future__ import annotations

import json
import warnings

with warnings.catch_warnings():  # Starlette suggests httpx2 for its test client; httpx is what we have
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from dragoman.app.factory import create_app
from dragoman.config import Settings
from dragoman.store.api import Store


def register(sock, node_id: str, pairs: list[list[str]]) -> None:  # noqa: ANN001
    sock.send_text(json.dumps({"type": "node_register", "node_id": node_id, "language_pairs": pairs,
                               "max_concurrency": 1}))
    assert json.loads(sock.receive_text())["type"] == "node_register_ack"


def test_languages_lists_each_pool_direction_once_and_two_way_pools_apart(redis_url: str) -> None:
    settings = Settings(warmup_ms=0)
    app = create_app(settings, Store.from_url(redis_url, settings, proc="p1"))
    with TestClient(app) as client, client.websocket_connect("/ws/node") as sock:
        register(sock, "n1", [["zh", "en"], ["zh", "ja"], ["en", "zh"]])
        body = client.get("/api/v1/languages").json()
    assert body["pairs"] == [["en", "zh"], ["zh", "en"], ["zh", "ja"]]
    assert body["two_way"] == [["en", "zh"]]
    assert body["sources"] == ["en", "zh"]
    assert body["targets"] == ["en", "ja", "zh"]
    assert body["by_source"] == {"en": ["zh"], "zh": ["en", "ja"]}


def open_session(client: TestClient, key: str = ""):  # noqa: ANN201
    url = f"/ws/session?api_key={key}" if key else "/ws/session"
    ws = client.websocket_connect(url)
    sock = ws.__enter__()
    sock.send_text(json.dumps({"type": "session_init", "src_lang": "zh", "tgt_lang": "en"}))
    return ws, json.loads(sock.receive_text())


def test_max_sessions_per_key_caps_only_sessions_with_api_keys(redis_url: str) -> None:
    for keys, second in (((), "session_init_ack"), (("k1",), "error")):
        settings = Settings(warmup_ms=0, max_sessions_per_key=1, api_keys=keys)
        app = create_app(settings, Store.from_url(redis_url, settings, proc="p1"))
        key = keys[0] if keys else ""
        with TestClient(app) as client:
            ws1, first = open_session(client, key)
            ws2, answer = open_session(client, key)
            assert first["type"] == "session_init_ack"
            assert answer["type"] == second, (keys, answer)
            if second == "error":
                assert answer["code"] == "RATE_LIMITED"
            for ws in (ws2, ws1):
                ws.__exit__(None, None, None)
