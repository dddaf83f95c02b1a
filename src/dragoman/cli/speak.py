"""``dragoman speak``: stream a WAV file as a live client would and print results as they arrive."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from dragoman.client import SessionClient
from dragoman.client.speech import follow_outcomes, outcome_index, send_utterances, split_on_silence
from dragoman.core.audio import read_wav_pcm16
from dragoman.wire import MissingResult, TranslationResult


async def stream_file(url: str, path: Path, src: str, tgts: list[str], fmt: str, speed: float | None,
                      api_key: str | None, console: Console) -> int:
    pcm, rate = read_wav_pcm16(path)
    pieces = split_on_silence(pcm, rate)
    sent_final: dict[int, float] = {}
    failures = 0

    def show(msg: Any) -> None:
        nonlocal failures
        idx = outcome_index(msg)
        lag = time.monotonic() - sent_final.get(idx, time.monotonic())
        if isinstance(msg, TranslationResult):
            console.print(f"[green]#{idx} {msg.tgt_lang}[/] {escape(repr(msg.text_asr))} -> "
                          f"{escape(repr(msg.text_translated))} [dim](latency {lag * 1000:.0f} ms)[/]")
        elif isinstance(msg, MissingResult):
            console.print(f"[yellow]#{idx} {msg.tgt_lang or ''}[/] missing: {msg.reason}")
        else:
            failures += 1
            console.print(f"[red]#{idx} error {msg.code}[/]: {escape(msg.message)}")

    async with SessionClient.connect(url, src_lang=src, tgt_langs=tgts, audio_format=fmt, sample_rate=rate,
                                     api_key=api_key) as client:
        console.print(f"[bold]session[/] {client.session_id}: {len(pieces)} utterance(s), {len(pcm) // (rate // 500)} ms "
                      f"of audio, {fmt}, targets {','.join(tgts)}")
        started = time.monotonic()
        printer = asyncio.create_task(follow_outcomes(client, show))
        await send_utterances(client, pieces, rate, fmt, speed,
                              on_final=lambda i: sent_final.__setitem__(i, time.monotonic()))
        await client.close(timeout=120)
        await printer
        console.print(f"[bold]done[/] in {time.monotonic() - started:.1f}s")
    return failures


def speak_command(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="A WAV file (16-bit PCM)."),
    src: str = typer.Option(..., "--src", help="Source language, or 'auto'."),
    tgt: str = typer.Option(..., "--tgt", help="Target languages, comma separated."),
    url: str = typer.Option("ws://127.0.0.1:8700/ws/session", "--url", help="The scheduler's session endpoint."),
    realtime: bool = typer.Option(False, "--realtime", help="Send audio at real-time pace."),
    speed: float = typer.Option(None, "--speed", help="Send at this multiple of real time (e.g. 4)."),
    fmt: str = typer.Option("pcm16", "--format", help="pcm16 or opus (Plan A framing)."),
    api_key: str = typer.Option(None, "--api-key", envvar="DRAGOMAN_API_KEY"),
) -> None:
    """Stream a WAV file as a live client and print each result with its latency."""
    if fmt not in ("pcm16", "opus"):
        raise typer.BadParameter("--format must be pcm16 or opus")
    tgts = [t.strip() for t in tgt.split(",") if t.strip()]
    pace = 1.0 if realtime else speed
    failures = asyncio.run(stream_file(url, file, src, tgts, fmt, pace, api_key, Console()))
    raise typer.Exit(1 if failures else 0)
