"""``create_app(settings, store)``: the whole ASGI application, wired explicitly."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import FileResponse, HTMLResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from dragoman.config import Settings
from dragoman.store.api import Store

from . import http_api as api
from .hub import Hub
from .metrics import Metrics
from .node_ws import node_endpoint
from .session_ws import session_endpoint

STATIC = Path(__file__).parent / "static"
DOCS_HTML = """<!doctype html><html><head><title>Dragoman API</title></head><body>
<h1>Dragoman API</h1><p>OpenAPI document: <a href="/openapi.json">/openapi.json</a></p>
<pre id="spec"></pre><script>fetch('/openapi.json').then(r=>r.json()).then(s=>{
document.getElementById('spec').textContent=Object.entries(s.paths).map(([p,ops])=>
Object.entries(ops).map(([m,o])=>m.toUpperCase().padEnd(6)+p+'  '+o.summary).join('\\n')).join('\\n')})</script>
</body></html>"""


SOCKETS = {"/ws/node": node_endpoint, "/ws/session": session_endpoint}


class App(Starlette):
    """The scheduler's app. Its two WebSocket endpoints are called directly, not through
    Starlette's middleware and router: a socket lives for hours and thousands are open at once,
    and every layer between the server and the endpoint keeps a coroutine frame for the socket's
    whole life (~4 kB a socket). Nothing in those layers applies to them (no middleware of ours; an
    error in an endpoint closes its socket with 1011, as uvicorn does for any ASGI app)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            path, root = scope["path"], scope.get("root_path", "")
            endpoint = SOCKETS.get(path[len(root):] if root and path.startswith(root) else path)
            if endpoint is not None:
                scope["app"] = self
                await endpoint(WebSocket(scope, receive, send))
                return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, store: Store) -> Starlette:
    hub = Hub(store, settings, Metrics())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await hub.start()
        try:
            yield
        finally:
            await hub.stop()

    async def dashboard(request):  # type: ignore[no-untyped-def]
        return FileResponse(STATIC / "dashboard.html")

    async def client_page(request):  # type: ignore[no-untyped-def]
        return FileResponse(STATIC / "client.html")

    async def docs(request):  # type: ignore[no-untyped-def]
        return HTMLResponse(DOCS_HTML)

    routes = [
        Route("/", dashboard),
        Route("/client", client_page),
        Route("/docs", docs),
        Route("/openapi.json", api.openapi),
        Route("/healthz", api.healthz),
        Route("/readyz", api.readyz),
        Route("/metrics", api.metrics),
        Route("/api/v1/nodes", api.list_nodes),
        Route("/api/v1/nodes/{node_id}/drain", api.drain_node, methods=["POST"]),
        Route("/api/v1/nodes/{node_id}/undrain", api.undrain_node, methods=["POST"]),
        Route("/api/v1/pools", api.list_pools),
        Route("/api/v1/sessions", api.list_sessions),
        Route("/api/v1/rooms", api.list_rooms),
        Route("/api/v1/languages", api.languages),
        Route("/api/v1/jobs/{job_id}", api.get_job),
        Route("/api/v1/jobs/{job_id}/cancel", api.cancel_job, methods=["POST"]),
        Route("/api/v1/stats", api.stats),
        Route("/api/v1/stream", api.stream),
        Route("/api/v1/translate", api.translate, methods=["POST"]),
        *(WebSocketRoute(path, endpoint) for path, endpoint in SOCKETS.items()),  # (reached directly: see App)
        Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static"),
    ]
    app = App(routes=routes, lifespan=lifespan)
    app.state.hub = hub
    app.state.settings = settings
    return app
