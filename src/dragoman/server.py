"""Run the scheduler: Redis (the configured one, or an embedded server), the app, uvicorn.

With ``workers`` > 1 this process supervises that many scheduler processes (workers) that listen on
the same port with SO_REUSEPORT: the kernel spreads new connections over them. Each worker is a
whole scheduler (its own process id in Redis, its own sockets); they share one Redis like any
schedulers do. A worker that dies is started again; SIGTERM or Ctrl-C stops them all gracefully.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import structlog
import uvicorn

from dragoman.app.factory import create_app
from dragoman.app.sockets import FrameWriterProtocol
from dragoman.config import Settings
from dragoman.embedded import EmbeddedServer
from dragoman.eventloop import run
from dragoman.gcpolicy import collector_policy
from dragoman.logging import setup_logging
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
                            # Link writes frames to it in place, and pings idle sockets less often (app/sockets.py)
                            ws=FrameWriterProtocol.with_idle_pings(settings.ws_idle_ping_interval_ms / 1000),
                            # a watched peer that stops answering pings is gone within interval + timeout
                            ws_ping_interval=settings.ws_ping_interval_ms / 1000,
                            ws_ping_timeout=settings.ws_ping_timeout_ms / 1000,
                            timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def listening_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def serve_one(settings: Settings, url: str, cluster: bool = False, reuse_port: bool = False) -> None:
    """One scheduler process on ``url``, until SIGTERM / Ctrl-C."""
    store = Store.from_url(url, settings, cluster=cluster)
    server = build_server(settings, store)
    sock = listening_socket(settings.host, settings.port, reuse_port)
    log.info("scheduler listening", url=f"http://{settings.host}:{settings.port}/", redis=store.target,
             proc=store.proc, event_loop=settings.event_loop)
    # Everything made so far (the modules, the app: ~60k objects) lives as long as the process: the
    # cycle collector need not look at it again. A full collection of it alone took 40 ms on the
    # bench machine, a pause of every socket's frames each time one ran.
    gc.collect()
    gc.freeze()
    run(_serve(server, sock, settings.gc_sweep_ms / 1000), settings.event_loop)


async def _serve(server: uvicorn.Server, sock: socket.socket, gc_sweep_s: float) -> None:
    with collector_policy(gc_sweep_s):  # (full collections look at newcomers only: see gcpolicy.py)
        await server.serve(sockets=[sock])


def serve(settings: Settings, cluster: bool = False) -> None:
    with redis_for(settings) as url:
        if settings.workers == 1:
            serve_one(settings, url, cluster)
        else:
            Workers(settings.replace(redis_url=url), cluster).run()


def _worker_main(settings: Settings, cluster: bool) -> None:
    setup_logging(settings.log_level)
    with contextlib.suppress(KeyboardInterrupt):
        serve_one(settings, settings.redis_url, cluster, reuse_port=True)


class Workers:
    """The supervisor of ``settings.workers`` scheduler processes on one port."""

    RESTART_PAUSE_S = 1.0  # between a worker's death and its replacement (a crash loop stays slow)

    def __init__(self, settings: Settings, cluster: bool) -> None:
        self.settings = settings
        self.cluster = cluster
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.stopping = threading.Event()

    def _start(self, index: int) -> multiprocessing.process.BaseProcess:
        proc = self.ctx.Process(target=_worker_main, args=(self.settings, self.cluster),
                                name=f"dragoman-worker-{index}", daemon=False)
        proc.start()
        log.info("worker started", worker=index, pid=proc.pid)
        return proc

    def run(self) -> None:
        listening_socket(self.settings.host, self.settings.port, True).close()  # a port in use fails here, once
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        self.procs = [self._start(i) for i in range(self.settings.workers)]
        log.info("workers listening", url=f"http://{self.settings.host}:{self.settings.port}/",
                 workers=self.settings.workers)
        while not self.stopping.wait(0.5):  # a supervisor's poll of its children's exit codes
            for i, proc in enumerate(self.procs):
                if proc.exitcode is not None and not self.stopping.is_set():
                    log.error("worker exited; starting it again", worker=i, exitcode=proc.exitcode)
                    if not self.stopping.wait(self.RESTART_PAUSE_S):
                        self.procs[i] = self._start(i)
        self.stop()

    def stop(self, timeout: float = 15.0) -> None:
        for proc in self.procs:
            if proc.exitcode is None and proc.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)  # each drains gracefully (uvicorn's shutdown)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        log.info("workers stopped")

