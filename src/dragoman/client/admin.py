"""``AdminClient``: the scheduler's HTTP API for operators and tools (status, demo, dashboards)."""

from __future__ import annotations

from typing import Any

import httpx


class AdminClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8700", timeout: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None, token: str | None = None) -> None:
        """``token``: an operator token, sent as ``Authorization: Bearer`` (needed when the scheduler
        has ``operator_tokens``)."""
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout, transport=transport,
                                      headers=headers)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _get(self, path: str) -> Any:
        r = await self.http.get(path)
        r.raise_for_status()
        return r.json()

    async def nodes(self) -> list[dict[str, Any]]:
        return (await self._get("/api/v1/nodes"))["nodes"]

    async def pools(self) -> list[dict[str, Any]]:
        return (await self._get("/api/v1/pools"))["pools"]

    async def sessions(self) -> list[dict[str, Any]]:
        return (await self._get("/api/v1/sessions"))["sessions"]

    async def stats(self) -> dict[str, Any]:
        return await self._get("/api/v1/stats")

    async def job(self, job_id: str) -> dict[str, Any]:
        return (await self._get(f"/api/v1/jobs/{job_id}"))["job"]

    async def drain(self, node_id: str, on: bool = True) -> dict[str, Any]:
        r = await self.http.post(f"/api/v1/nodes/{node_id}/{'drain' if on else 'undrain'}")
        r.raise_for_status()
        return r.json()

    async def cancel(self, job_id: str) -> dict[str, Any]:
        r = await self.http.post(f"/api/v1/jobs/{job_id}/cancel")
        r.raise_for_status()
        return r.json()
