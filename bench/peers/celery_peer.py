"""Celery peer: ``python celery_peer.py worker|submit --redis-url URL ...`` (bench venv-celery).

worker: ``celery worker`` with the threads pool (``-P threads``), concurrency = the in-flight count,
Redis as broker and result backend, gossip/mingle/heartbeat off (no other workers to talk to).
submit: ``noop.apply_async().get()``, one blocking thread per job in flight (closed loop), or a
pacer handing jobs to a thread pool (open loop). ``get()`` on the Redis backend waits on pub/sub.
"""

from __future__ import annotations

import argparse
import os

import loadgen
from celery import Celery
from celery.signals import worker_ready

QUEUE = "bench"


def make_app(url: str) -> Celery:
    app = Celery("bench", broker=url, backend=url)
    app.conf.update(task_default_queue=QUEUE, worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
                    worker_prefetch_multiplier=4, result_expires=300, task_ignore_result=False,
                    worker_redirect_stdouts=False)

    @app.task(name="noop")
    def noop() -> str:
        return "ok"

    return app


def run_worker(args: argparse.Namespace) -> None:
    app = make_app(args.redis_url)

    @worker_ready.connect
    def _ready(**_kw: object) -> None:
        loadgen.emit("ready", role="worker", peer="celery")

    app.worker_main(["worker", "-P", "threads", "-c", str(args.inflight), "-Q", QUEUE, "-l", "warning",
                     "--without-gossip", "--without-mingle", "--without-heartbeat", "-n", f"bench{os.getpid()}@%h"])


def run_submit(args: argparse.Namespace) -> None:
    app = make_app(args.redis_url)
    noop = app.tasks["noop"]

    def one(_slot: int) -> None:
        if noop.apply_async().get(timeout=30) != "ok":
            raise RuntimeError("wrong result")

    loadgen.emit("ready", role="submitter", peer="celery")
    for phase in loadgen.phases(args):
        if phase == "closed":
            res = loadgen.closed_loop_threads(one, args.inflight, args.warmup, args.window)
        else:
            res = loadgen.open_loop_threads(one, args.rate, args.warmup, args.window, args.drain)
        loadgen.emit("result", **res)
    os._exit(0)  # result-consumer threads may still be blocked on pub/sub


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("worker", "submit"))
    loadgen.add_load_args(ap)
    args = ap.parse_args()
    run_worker(args) if args.role == "worker" else run_submit(args)


if __name__ == "__main__":
    main()
