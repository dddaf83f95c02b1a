"""The node endpoint in process (Starlette's TestClient, a real Valkey): failure paths of registration."""

from __future__ import annotations

import json
import warnings
from typing import Any

import redis

with warnings.catch_warnings():  # Starlette suggests httpx2 for its test client; httpx is what we have
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from dragoman.app.factory import create_app
from dragoman.config import Settings
from dragoman.errors import DependencyDown
from dragoman.store.api import Store


class LostReplyStore(Store):
    """The first registration runs in Redis but its reply is lost (as after a timeout)."""

    lost = 0

    async def register_node(self, node_id: str, **kw: Any):  # type: ignore[no-untyped-def,override]
        reply = await super().register_node(node_id, **kw)
        if self.lost == 0:
            self.lost += 1
            raise DependencyDown("reply lost")
        return reply


def test_a_registration_whose_reply_is_lost_is_undone(redis_url: str) -> None:
    """Loss path 11: Redis must never hold a node ready on a socket that never got its ack (its
    assignments would wait forever): every failure path undoes the registration."""
    settings = Settings(warmup_ms=0)
    store = LostReplyStore.from_url(redis_url, settings, proc="p1")
    app = create_app(settings, store)
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    register = {"type": "node_register", "node_id": "ghost", "language_pairs": [["zh", "en"]], "max_concurrency": 1}
    with TestClient(app) as client, client.websocket_connect("/ws/node") as ws:
        ws.send_text(json.dumps(register))
        err = json.loads(ws.receive_text())
        assert err["type"] == "error" and err["code"] == "SCHEDULER_DEPENDENCY_DOWN"
        assert sync.hget("dragoman:{c0}:node:ghost", "state") == "offline"
        assert "ghost" not in app.state.hub.nodes
        assert sync.zcard("dragoman:{c0}:pool:zh>en") == 0
        ws.send_text(json.dumps(register))  # it may try again, and then it works
        ack = json.loads(ws.receive_text())
        assert ack["type"] == "node_register_ack"
        assert sync.hget("dragoman:{c0}:node:ghost", "state") == "ready"
    sync.close()
