"""SAQ peer: ``python saq_peer.py worker|submit --redis-url URL ...`` (bench venv-saq).

worker: a SAQ ``Worker`` with one no-op function (returns "ok"), ``concurrency`` = the in-flight
count. submit: ``Queue.apply("noop")``, SAQ's enqueue-and-wait-for-the-result call, with its
default ``poll_interval`` (0.5 s) unless ``--poll-interval`` is given.
"""

from __future__ import annotations

import argparse
import asyncio

import loadgen
from saq import Queue, Worker

QUEUE = "bench"


async def noop(ctx: dict) -> str:
    return "ok"


async def run_worker(args: argparse.Namespace) -> None:
    queue = Queue.from_url(args.redis_url, name=QUEUE)

    async def startup(ctx: dict) -> None:
        loadgen.emit("ready", role="worker", peer="saq")

    worker = Worker(queue, functions=[("noop", noop)], concurrency=args.inflight, startup=startup)
    await worker.start()


async def run_submit(args: argparse.Namespace) -> None:
    queue = Queue.from_url(args.redis_url, name=QUEUE)
    await queue.connect()
    kw = {} if args.poll_interval is None else {"poll_interval": args.poll_interval}

    async def one(_slot: int) -> None:
        if await queue.apply("noop", timeout=30, **kw) != "ok":
            raise RuntimeError("wrong result")

    loadgen.emit("ready", role="submitter", peer="saq")
    await loadgen.run_phases(args, one)
    await queue.disconnect()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("worker", "submit"))
    loadgen.add_load_args(ap)
    ap.add_argument("--poll-interval", type=float, default=None)
    args = ap.parse_args()
    asyncio.run(run_worker(args) if args.role == "worker" else run_submit(args))


if __name__ == "__main__":
    main()
