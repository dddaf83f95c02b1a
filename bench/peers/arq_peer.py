"""arq peer: ``python arq_peer.py worker|submit --redis-url URL [--poll-delay S] ...`` (bench venv-arq).

worker: an arq ``Worker`` with one no-op function (returns "ok"), ``max_jobs`` = the in-flight
count, so the worker never caps the load. submit: ``ArqRedis.enqueue_job("noop")`` then
``Job.result(poll_delay=...)``, the submitter holding the result. arq polls on both sides: the
worker reads its queue every ``poll_delay`` seconds and ``Job.result`` polls for the result; the
same ``--poll-delay`` is given to both (arq's default is 0.5 s for each).
"""

from __future__ import annotations

import argparse
import asyncio

import loadgen
from arq import create_pool
from arq.connections import RedisSettings
from arq.worker import Worker, func

QUEUE = "arq:bench"


async def noop(ctx: dict) -> str:
    return "ok"


async def run_worker(args: argparse.Namespace) -> None:
    async def startup(ctx: dict) -> None:
        loadgen.emit("ready", role="worker", peer="arq")

    w = Worker(functions=[func(noop, name="noop")], redis_settings=RedisSettings.from_dsn(args.redis_url),
               queue_name=QUEUE, max_jobs=args.inflight, poll_delay=args.poll_delay, on_startup=startup,
               handle_signals=False, keep_result=300)
    try:
        await w.main()
    finally:
        await w.close()


async def run_submit(args: argparse.Namespace) -> None:
    pool = await create_pool(RedisSettings.from_dsn(args.redis_url), default_queue_name=QUEUE)

    async def one(_slot: int) -> None:
        job = await pool.enqueue_job("noop")
        if job is None:
            raise RuntimeError("enqueue_job returned None")
        if await job.result(timeout=30, poll_delay=args.poll_delay) != "ok":
            raise RuntimeError("wrong result")

    loadgen.emit("ready", role="submitter", peer="arq")
    await loadgen.run_phases(args, one)
    await pool.aclose()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=("worker", "submit"))
    loadgen.add_load_args(ap)
    ap.add_argument("--poll-delay", type=float, default=0.5)
    args = ap.parse_args()
    asyncio.run(run_worker(args) if args.role == "worker" else run_submit(args))


if __name__ == "__main__":
    main()
