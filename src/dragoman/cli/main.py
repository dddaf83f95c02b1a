"""``dragoman``: serve the scheduler, run nodes and speakers, watch the cluster, run the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog
import typer

from dragoman.config import load_settings, unknown_env
from dragoman.errors import ConfigError
from dragoman.logging import setup_logging

app = typer.Typer(help="Dragoman: a lockless, Redis-backed scheduler for speech-translation networks.",
                  no_args_is_help=True, add_completion=False)


def settings_from(config: Path | None, **flags: Any):  # noqa: ANN201
    try:
        return load_settings(config, overrides={k: v for k, v in flags.items() if v is not None})
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


@app.command()
def serve(
    host: str = typer.Option(None, help="Address to listen on (default 127.0.0.1)."),
    port: int = typer.Option(None, help="Port to listen on (default 8700)."),
    redis_url: str = typer.Option(None, "--redis-url", envvar="DRAGOMAN_REDIS_URL",
                                  help="Redis/Valkey URL; without it an embedded server is started."),
    cluster: bool = typer.Option(False, help="The Redis URL points at a Redis Cluster."),
    config: Path = typer.Option(None, "--config", help="TOML settings file."),
    log_level: str = typer.Option(None, help="debug, info, warning."),
    workers: int = typer.Option(None, "--workers", min=1, help=(
        "Scheduler processes behind the one port (SO_REUSEPORT); default 1. Up to one per core.")),
) -> None:
    """Run a scheduler process (any number may share one Redis)."""
    from dragoman.server import serve as run
    from dragoman.store.connect import parse_redis_url

    settings = settings_from(config, host=host, port=port, redis_url=redis_url, log_level=log_level,
                             workers=workers)
    if settings.redis_url:  # from a flag, the environment or the file: a bad URL is refused at once
        try:
            parse_redis_url(settings.redis_url, cluster=cluster)
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint="--redis-url") from None
    setup_logging(settings.log_level)
    for warning in unknown_env():
        structlog.get_logger("dragoman.config").warning(warning)
    run(settings, cluster=cluster)


@app.command("redis")
def redis_command(
    port: int = typer.Option(6390, help="Port for the embedded server (not with --sentinel)."),
    sentinel: bool = typer.Option(False, "--sentinel", help=(
        "Start a highly available set instead: one primary, one replica and three Sentinels on free "
        "loopback ports; prints the redis+sentinel:// URL to give the schedulers.")),
    service: str = typer.Option("dragoman", help="The Sentinel service name (with --sentinel)."),
) -> None:
    """Run only the embedded Valkey server, or a local Sentinel set (for several scheduler processes on
    one machine, and for trying failover). Runs until Ctrl-C or SIGTERM."""
    import contextlib
    import signal
    import threading

    from dragoman.embedded import EmbeddedSentinelSet, EmbeddedServer

    if sentinel:
        ha = EmbeddedSentinelSet(service)
        typer.echo(f"starting a Valkey Sentinel set for service {service!r} ...")
        ctx: contextlib.AbstractContextManager[object] = ha
    else:
        ctx = EmbeddedServer(port=port)
    with ctx as running:
        if isinstance(running, EmbeddedSentinelSet):
            primary, replica = running.primary, running.replica
            typer.echo(f"  primary   {primary.address[0]}:{primary.port}")
            typer.echo(f"  replica   {replica.address[0]}:{replica.port}")
            typer.echo(f"  sentinels {', '.join(f'{h}:{p}' for h, p in running.sentinel_addresses)}")
            typer.echo(f"  logs      {running.workdir}")
            typer.echo(f"redis URL: {running.url}   (Ctrl-C to stop)")
        else:
            assert isinstance(running, EmbeddedServer)
            typer.echo(f"embedded Valkey at {running.url} (Ctrl-C to stop)")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


def _register_optional() -> None:
    """Commands that live in their own modules."""
    import contextlib

    with contextlib.suppress(ImportError):
        from dragoman.cli import node

        app.command("node")(node.node_command)
    from dragoman.cli import demo, speak, status

    app.command("speak")(speak.speak_command)
    app.command("status")(status.status_command)
    app.command("demo")(demo.demo_command)


_register_optional()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
