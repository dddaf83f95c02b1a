"""A scripted node peer speaking the node protocol, for tests that need exact control over what a
node answers and when (real node agents run as processes in other tests)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect


class ScriptedNode:
    def __init__(self, ws: ClientConnection, node_id: str) -> None:
        self.ws = ws
        self.node_id = node_id
        self.received: list[dict[str, Any]] = []  # every frame, in order
        self._taken: set[int] = set()
        self._arrived = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, base_ws: str, *, node_id: str | None = None, pairs=(("zh", "en"),), slots: int | None = 2,
                      register: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> ScriptedNode:
        ws = await connect(base_ws + "/ws/node", additional_headers=headers, max_size=16 * 1024 * 1024)
        msg = register or {"type": "node_register", "node_id": node_id, "version": "test", "platform": "linux",
                           "hardware": {"cpu_cores": 2, "memory_gb": 4}, "installed_models": [],
                           "capability_by_type": [], "features_supported": {}, "accept_public_jobs": True,
                           "language_pairs": [list(p) for p in pairs]}
        if slots is not None and register is None:
            msg["max_concurrency"] = slots
        await ws.send(json.dumps(msg))
        ack = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert ack["type"] == "node_register_ack", ack
        return cls(ws, ack["node_id"])

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for raw in self.ws:
                async with self._arrived:
                    self.received.append(json.loads(raw))
                    self._arrived.notify_all()

    def _take(self, kind: str) -> dict[str, Any] | None:
        for i, msg in enumerate(self.received):
            if i not in self._taken and msg["type"] == kind:
                self._taken.add(i)
                return msg
        return None

    async def expect(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        """The oldest frame of this type not yet taken, waiting for one if needed."""
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: self._peek(kind)), timeout)
            msg = self._take(kind)
            assert msg is not None
            return msg

    def _peek(self, kind: str) -> bool:
        return any(i not in self._taken and m["type"] == kind for i, m in enumerate(self.received))

    def frames(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.received if m["type"] == kind]

    async def send(self, msg: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(msg))

    async def heartbeat(self, **extra: Any) -> None:
        await self.send({"type": "node_heartbeat", "node_id": self.node_id, "timestamp": 0,
                         "resource_usage": {"cpu_percent": 1, "mem_percent": 1, "running_jobs": 0}, **extra})

    async def result(self, assign: dict[str, Any], text: str = "hello", **extra: Any) -> None:
        await self.send({"type": "job_result", "job_id": assign["job_id"], "attempt_id": assign["attempt_id"],
                         "node_id": self.node_id, "session_id": assign["session_id"],
                         "utterance_index": assign["utterance_index"], "trace_id": assign["trace_id"],
                         "success": True, "text_asr": f"asr:{text}", "text_translated": f"{assign['tgt_lang']}:{text}",
                         "tts_audio": "", "tts_format": "wav", **extra})

    async def keep_alive(self, every: float = 0.2, **extra: Any) -> None:
        """Heartbeat in the background (a periodic duty, not synchronisation)."""
        while True:
            await self.heartbeat(**extra)
            await asyncio.sleep(every)

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()
