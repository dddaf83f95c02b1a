"""``dragoman demo``: the whole system on one machine for about a minute.

An embedded Valkey, a scheduler (in this process), simulated nodes as separate processes (different
pairs and slot counts; one is killed partway, one drains), and simulated speakers streaming real
speech recordings. A live terminal view while it runs; a summary at the end, including the slot
check: every slot taken must have been given back. Exit code 0 only if that check passes and every
utterance got exactly one outcome per target.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from dragoman.cli.views import cluster_view
from dragoman.client import SessionClient
from dragoman.client.admin import AdminClient
from dragoman.client.speech import follow_outcomes, outcome_index, send_utterances, split_on_silence
from dragoman.config import load_settings
from dragoman.core.audio import read_wav_pcm16
from dragoman.embedded import EmbeddedServer, free_port
from dragoman.logging import setup_logging
from dragoman.server import build_server
from dragoman.store.api import Store
from dragoman.wire import ErrorMessage, TranslationResult

AUDIO = Path(__file__).resolve().parents[1] / "demo" / "audio"


@dataclass(frozen=True)
class NodePlan:
    node_id: str
    pairs: str
    slots: int
    fate: str = "lives"  # "lives" | "dies" (SIGKILL partway) | "drains" (SIGTERM partway)
    slowness: float = 1.0  # divides the simulated speed: a slow node is likely mid-job when it dies


NODES = [
    NodePlan("gpu-alpha", "en:zh,en:de,de:en", 4),
    NodePlan("gpu-beta", "en:zh,zh:en,fr:en", 2),
    NodePlan("gpu-gamma", "de:en,fr:en,zh:en,en:de", 3),
    NodePlan("gpu-delta", "en:zh,en:de,zh:en", 6, "dies", slowness=8.0),
    NodePlan("gpu-epsilon", "fr:en,de:en,en:zh", 2, "drains"),
]
SPEAKERS = [("speech-en.wav", "en", ["zh", "de"], "pcm16"), ("speech-de.wav", "de", ["en"], "opus"),
            ("speech-zh.wav", "zh", ["en"], "pcm16"), ("speech-fr.wav", "fr", ["en"], "opus")]


@dataclass
class Tally:
    utterances: int = 0
    expected: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    unanswered: int = 0

    def add(self, kind: str) -> None:
        self.outcomes[kind] = self.outcomes.get(kind, 0) + 1

    @property
    def received(self) -> int:
        return sum(self.outcomes.values())


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def speaker(url: str, clip: str, src: str, tgts: list[str], fmt: str, until: float, tally: Tally,
                  speed: float) -> None:
    pcm, rate = read_wav_pcm16(AUDIO / clip)
    pieces = split_on_silence(pcm, rate)
    while time.monotonic() < until:
        async with SessionClient.connect(url, src_lang=src, tgt_langs=tgts, audio_format=fmt,
                                         sample_rate=rate) as client:
            sent_at: dict[int, float] = {}

            def count(msg: Any, sent_at: dict[int, float] = sent_at) -> None:
                idx = outcome_index(msg)
                tally.add(f"error:{msg.code}" if isinstance(msg, ErrorMessage) else type(msg).__name__)
                if isinstance(msg, TranslationResult) and idx in sent_at:
                    tally.latencies_ms.append((time.monotonic() - sent_at[idx]) * 1000)

            def spoken(index: int, sent_at: dict[int, float] = sent_at) -> None:
                sent_at[index] = time.monotonic()
                tally.utterances += 1
                tally.expected += len(tgts)

            listener = asyncio.create_task(follow_outcomes(client, count))
            await send_utterances(client, pieces, rate, fmt, speed, on_final=spoken)
            await client.close(timeout=120)
            await listener


def spawn_node(plan: NodePlan, scheduler_ws: str, logdir: Path, sim_speed: float) -> subprocess.Popen[bytes]:
    log = (logdir / f"{plan.node_id}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "dragoman.cli.main", "node", "--scheduler", scheduler_ws,
                             "--pairs", plan.pairs, "--slots", str(plan.slots), "--node-id", plan.node_id,
                             "--sim-speed", str(sim_speed / plan.slowness), "--heartbeat-interval", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_until(check, timeout: float) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return False


async def run_demo(duration: float, port: int, speed: float, sim_speed: float, console: Console) -> int:
    settings = load_settings(overrides={
        "port": port, "heartbeat_interval_ms": 1000, "node_ttl_ms": 3000, "job_timeout_ms": 8000,
        "reaper_interval_ms": 250, "pause_ms": 1500, "pending_timeout_ms": 10000})
    logdir = Path(tempfile.mkdtemp(prefix="dragoman-demo-"))
    with EmbeddedServer() as redis:
        store = Store.from_url(redis.url, settings)
        server = build_server(settings, store)
        serving = asyncio.create_task(server.serve())
        base = f"http://{settings.host}:{port}"
        admin = AdminClient(base)
        procs: dict[str, subprocess.Popen[bytes]] = {}
        try:
            if not await wait_until(lambda: asyncio.sleep(0, server.started), 20):
                console.print("[red]scheduler did not start[/]")
                return 1
            console.print(f"[bold]Dragoman demo[/]  dashboard: [link]{base}/[/link]   client page: {base}/client   "
                          f"metrics: {base}/metrics   (Valkey {redis.url}, logs {logdir})")
            ws_base = base.replace("http://", "ws://")
            for plan in NODES:
                procs[plan.node_id] = spawn_node(plan, ws_base + "/ws/node", logdir, sim_speed)

            async def all_ready() -> bool:
                return sum(n["state"] == "ready" for n in await admin.nodes()) == len(NODES)

            if not await wait_until(all_ready, 30):
                console.print(f"[red]nodes did not register; see {logdir}[/]")
                return 1
            tally = Tally()
            started = time.monotonic()
            until = started + duration
            talkers = [asyncio.create_task(speaker(ws_base + "/ws/session", clip, src, tgts, fmt, until, tally, speed))
                       for clip, src, tgts, fmt in SPEAKERS]
            fates = {p.node_id: p.fate for p in NODES}
            done_fates: list[str] = []

            async def frame() -> object:
                stats = await admin.stats()
                extra = {"elapsed": f"{time.monotonic() - started:.0f}s", "utterances": str(tally.utterances),
                         "e2e p50": _ms(percentile(tally.latencies_ms, 0.5)),
                         "e2e p95": _ms(percentile(tally.latencies_ms, 0.95))}
                return cluster_view(await admin.nodes(), await admin.pools(), stats, extra)

            async def holds_jobs(node_id: str) -> bool:  # kill it mid-job, to show a reassignment
                return any(n["id"] == node_id and int(n.get("used", 0)) > 0 for n in await admin.nodes())

            live = Live(await frame(), console=console, refresh_per_second=2) if console.is_terminal else None
            with live or contextlib.nullcontext():
                last_line = 0.0
                while not all(t.done() for t in talkers):
                    elapsed = time.monotonic() - started
                    for nid, fate in fates.items():
                        if fate == "dies" and elapsed > 0.4 * duration and nid not in done_fates and (
                                elapsed > 0.7 * duration or await holds_jobs(nid)):
                            procs[nid].send_signal(signal.SIGKILL)
                            done_fates.append(nid)
                            console.print(f"[red]killed {nid} (SIGKILL) at {elapsed:.0f}s[/]")
                        if fate == "drains" and elapsed > 0.6 * duration and nid not in done_fates:
                            procs[nid].send_signal(signal.SIGTERM)
                            done_fates.append(nid)
                            console.print(f"[yellow]draining {nid} (SIGTERM) at {elapsed:.0f}s[/]")
                    if live is not None:
                        live.update(await frame())
                    elif time.monotonic() - last_line > 5:
                        last_line = time.monotonic()
                        console.print(f"  t={elapsed:4.0f}s utterances={tally.utterances} "
                                      f"outcomes={tally.received}/{tally.expected}")
                    await asyncio.wait(talkers, timeout=0.5)
            for t in talkers:
                t.result()  # surface a speaker's failure

            async def slots_back() -> bool:
                return (await admin.stats())["slots"]["used"] == 0

            slots_ok = await wait_until(slots_back, 30)
            stats = await admin.stats()
            return summary(console, tally, stats, slots_ok)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    await asyncio.to_thread(p.wait, 15)
                except subprocess.TimeoutExpired:
                    p.kill()
            await admin.aclose()
            server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, 10)
            await store.aclose()


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def summary(console: Console, tally: Tally, stats: dict, slots_ok: bool) -> int:
    c = stats["counters"]
    lat = stats["latency"]
    t = Table(title="Demo summary", show_header=False)
    t.add_column("what")
    t.add_column("value")
    t.add_row("utterances spoken", str(tally.utterances))
    t.add_row("outcomes expected / received", f"{tally.expected} / {tally.received}")
    for kind, n in sorted(tally.outcomes.items()):
        t.add_row(f"  {kind}", str(n))
    t.add_row("jobs dispatched", str(c.get("dispatched", 0)))
    t.add_row("jobs completed / empty / failed",
              f"{c.get('jobs_completed', 0)} / {c.get('jobs_completed_empty', 0)} / {c.get('jobs_failed', 0)}")
    t.add_row("reassignments", str(c.get("reassigned", 0)))
    t.add_row("nodes lost", str(c.get("nodes_lost", 0)))
    t.add_row("dispatch latency p50/p95/p99",
              " / ".join(_ms(lat["dispatch"][k]) for k in ("p50_ms", "p95_ms", "p99_ms")) + " (bucket bounds)")
    t.add_row("end-to-end latency p50/p95/p99",
              " / ".join(_ms(percentile(tally.latencies_ms, q)) for q in (0.5, 0.95, 0.99)))
    slot_text = "every slot returned" if slots_ok and not stats["slots"]["violations"] else \
        f"SLOTS NOT RETURNED: used={stats['slots']['used']} {stats['slots']['violations']}"
    t.add_row("slot check", slot_text)
    console.print(t)
    ok = slots_ok and not stats["slots"]["violations"] and tally.received == tally.expected
    console.print("[bold green]demo OK[/]" if ok else "[bold red]demo FAILED[/]")
    return 0 if ok else 1


def demo_command(
    duration: float = typer.Option(60.0, help="How long the speakers talk (seconds)."),
    port: int = typer.Option(0, help="Scheduler port (0: a free one)."),
    speed: float = typer.Option(1.0, help="Speakers send audio at this multiple of real time."),
    sim_speed: float = typer.Option(2.0, help="Simulated nodes' speed-up of their latency model."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Run the whole system for about a minute and print a summary (exit 0 when every slot came back)."""
    random.seed(seed)
    setup_logging(os.environ.get("DRAGOMAN_LOG_LEVEL", "warning"))
    code = asyncio.run(run_demo(duration, port or free_port(), speed, sim_speed, Console()))
    raise typer.Exit(code)
