"""``dragoman status``: the cluster state as tables in the terminal."""

from __future__ import annotations

import asyncio

import httpx
import typer
from rich.console import Console

from dragoman.cli.views import cluster_view
from dragoman.client.admin import AdminClient


async def fetch(url: str):  # noqa: ANN201
    admin = AdminClient(url)
    try:
        return await admin.nodes(), await admin.pools(), await admin.stats()
    finally:
        await admin.aclose()


def status_command(url: str = typer.Option("http://127.0.0.1:8700", "--url", help="The scheduler's HTTP address.")) -> None:
    """Show nodes, pools, job counters and failures."""
    try:
        nodes, pools, stats = asyncio.run(fetch(url))
    except httpx.HTTPError as exc:
        Console(stderr=True).print(f"[red]cannot reach the scheduler at {url}: {exc}[/]")
        raise typer.Exit(2) from None
    Console().print(cluster_view(nodes, pools, stats))
