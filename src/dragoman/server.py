"""Run the scheduler: Redis (the configured one, or an embedded server), the app, uvicorn."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import structlog
import uvicorn

from dragoman.app.factory import create_app
from dragoman.config import Settings
from dragoman.embedded import EmbeddedServer
from dragoman.eventloop import run
from dragoman.store.api import Store

log = structlog.get_logger(__name__)


@contextlib.contextmanager
def redis_for(settings: Settings) -> Iterator[str]:
    """The configured Redis URL, or an embedded server started (and stopped) for the duration."""
    if settings.redis_url:
        yield settings.redis_url
        return
    with EmbeddedServer() as server:
        log.info("embedded Valkey started", url=server.url)
        yield server.url


def build_server(settings: Settings, store: Store) -> uvicorn.Server:
    app = create_app(settings, store)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, ws_max_size=settings.max_frame_bytes,
                            log_level="warning", lifespan="on", ws_per_message_deflate=settings.ws_deflate,
                            # a peer that stops answering pings is gone within interval + timeout
                            ws_ping_interval=settings.ws_ping_interval_ms / 1000,
                            ws_ping_timeout=settings.ws_ping_timeout_ms / 1000,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(settings: Settings, cluster: bool = False) -> None:
    with redis_for(settings) as url:
        server = build_server(settings, Store.from_url(url, settings, cluster=cluster))
        log.info("scheduler listening", url=f"http://{settings.host}:{settings.port}/", redis=url)
        run(server.serve(), settings.event_loop)

