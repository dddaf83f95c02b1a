"""``dragoman node``: run a node agent (a worker) against a scheduler.

Registered by ``cli/main.py`` as ``app.command("node")(node_command)``. Signals: the first SIGTERM or
SIGINT drains (no new jobs, running ones finish, exit 0); a second one stops at once (running jobs
are abandoned to the scheduler's leases, still exit 0). ``--drain-timeout`` bounds a drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import typer
from rich.console import Console

from dragoman.agent.engines import Engine, make_engine
from dragoman.agent.runner import NodeAgent, parse_language_pairs
from dragoman.errors import ConfigError
from dragoman.logging import setup_logging

ENGINES = ("simulated", "http")


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``"zh:en,en:zh"`` -> ``[("zh", "en"), ("en", "zh")]``; ``typer.BadParameter`` on bad input."""
    try:
        return parse_language_pairs(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--pairs") from None


def build_engine(
    engine: str,
    *,
    sim_speed: float = 1.0,
    asr_url: str | None = None,
    nmt_url: str | None = None,
    tts_url: str | None = None,
) -> Engine:
    """The engine named by ``--engine`` with its options; ``typer.BadParameter`` when they are wrong."""
    kind = engine.strip().lower()
    if kind not in ENGINES:
        raise typer.BadParameter(
            f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}", param_hint="--engine"
        )
    options: dict[str, Any] = {}
    if kind == "simulated":
        if not sim_speed > 0:
            raise typer.BadParameter(f"must be positive, got {sim_speed}", param_hint="--sim-speed")
        options["speed"] = sim_speed
        options["seed"] = None  # jitter/failures differ between nodes of one demo
    else:
        for name, url in (("asr_url", asr_url), ("nmt_url", nmt_url), ("tts_url", tts_url)):
            if url:
                options[name] = url
    try:
        return make_engine(kind, **options)
    except (ConfigError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="--engine") from None


def node_command(
    scheduler: str = typer.Option(
        "ws://127.0.0.1:8700/ws/node",
        "--scheduler",
        "-s",
        help="The scheduler's node endpoint (ws:// or wss://).",
    ),
    pairs: str = typer.Option(
        "zh:en,en:zh", "--pairs", "-p", help="Directed language pairs served, src:tgt, comma separated."
    ),
    slots: int = typer.Option(
        4, "--slots", "-n", min=1, max=1024, help="Jobs run at once (max_concurrency)."
    ),
    engine: str = typer.Option(
        "simulated",
        "--engine",
        "-e",
        help="Inference engine: 'simulated' (no models) or 'http' (node services).",
    ),
    node_id: str | None = typer.Option(
        None, "--node-id", help="Ask for this node id (default: the scheduler assigns one)."
    ),
    token: str | None = typer.Option(
        None, "--token", help="Node token, sent as 'Authorization: Bearer <token>'."
    ),
    sim_speed: float = typer.Option(
        1.0, "--sim-speed", help="Simulated engine only: latency divisor (10 = ten times faster)."
    ),
    asr_url: str | None = typer.Option(
        None, "--asr-url", help="HTTP engine only: ASR service base URL (default http://127.0.0.1:6007)."
    ),
    nmt_url: str | None = typer.Option(
        None, "--nmt-url", help="HTTP engine only: MT service base URL (default http://127.0.0.1:5008)."
    ),
    tts_url: str | None = typer.Option(
        None, "--tts-url", help="HTTP engine only: TTS service base URL (default http://127.0.0.1:5006)."
    ),
    two_way: bool = typer.Option(
        False, "--two-way/--one-way", help="Also serve the reverse of every pair (joins two-way auto pools)."
    ),
    heartbeat_interval: float | None = typer.Option(
        None, "--heartbeat-interval", min=0.01, help="Seconds between heartbeats (default: the scheduler's)."
    ),
    drain_timeout: float = typer.Option(
        120.0,
        "--drain-timeout",
        min=0.0,
        help="On SIGTERM/SIGINT, wait at most this many seconds for running jobs.",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning."),
) -> None:
    """Run a node agent: register with the scheduler and run the jobs it assigns."""
    language_pairs = parse_pairs(pairs)
    setup_logging(log_level)
    built = build_engine(engine, sim_speed=sim_speed, asr_url=asr_url, nmt_url=nmt_url, tts_url=tts_url)
    console = Console()
    announced = False

    def on_registered(nid: str) -> None:
        nonlocal announced
        if not announced:
            announced = True
            served = ", ".join(f"{s}>{t}" for s, t in agent.pairs)
            console.print(
                f"dragoman node [bold]{nid}[/bold] ready: {served}; {slots} slots; "
                f"engine {built.name}; scheduler {scheduler}",
                highlight=False,
            )

    try:
        agent = NodeAgent(
            scheduler,
            pairs=language_pairs,
            slots=slots,
            engine=built,
            node_id=node_id,
            token=token,
            heartbeat_interval_s=heartbeat_interval,
            two_way=two_way,
            drain_timeout_s=drain_timeout,
            on_registered=on_registered,
        )
    except ConfigError as exc:
        asyncio.run(built.aclose())
        raise typer.BadParameter(str(exc)) from None
    from dragoman.eventloop import run

    run(_serve(agent, built))


async def _serve(agent: NodeAgent, engine: Engine) -> None:
    """Run the agent under signal handlers; close the engine however it ends."""
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        if not agent.draining:
            agent.request_drain()
        elif not stopping:
            stopping.append(loop.create_task(agent.stop()))

    installed: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows, non-main thread
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
    try:
        await agent.run()
        if stopping:
            await asyncio.gather(*stopping)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await engine.aclose()
