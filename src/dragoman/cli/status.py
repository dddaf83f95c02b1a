"""``dragoman status``: the cluster state as tables in the terminal."""

from __future__ import annotations

import asyncio

import httpx
import typer
from rich.console import Console

from dragoman.cli.views import cluster_view
from dragoman.client.admin import AdminClient


async def fetch(url: str, token: str | None = None):  # noqa: ANN201
    admin = AdminClient(url, token=token)
    try:
        return await admin.nodes(), await admin.pools(), await admin.stats()
    finally:
        await admin.aclose()


def status_command(
    url: str = typer.Option("http://127.0.0.1:8700", "--url", help="The scheduler's HTTP address."),
    token: str = typer.Option(None, "--token", envvar="DRAGOMAN_TOKEN",
                              help="Operator token (one of the scheduler's operator_tokens), sent as "
                                   "'Authorization: Bearer <token>'. Needed when the scheduler has any credentials."),
) -> None:
    """Show nodes, pools, job counters and failures."""
    try:
        nodes, pools, stats = asyncio.run(fetch(url, token))
    except httpx.HTTPStatusError as exc:
        why = "give an operator token (--token or DRAGOMAN_TOKEN)" if exc.response.status_code == 401 else ""
        Console(stderr=True).print(f"[red]the scheduler at {url} answered {exc.response.status_code}. {why}[/]")
        raise typer.Exit(2) from None
    except httpx.HTTPError as exc:
        Console(stderr=True).print(f"[red]cannot reach the scheduler at {url}: {exc}[/]")
        raise typer.Exit(2) from None
    Console().print(cluster_view(nodes, pools, stats))
