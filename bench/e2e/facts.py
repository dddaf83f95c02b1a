"""Facts about the run for the report: the machine, the versions of everything measured, the commit,
and whether ``dragoman serve`` has the ``--workers`` flag yet."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.peers import install as peer_install

ROOT = Path(__file__).resolve().parents[2]


def _cmd_out(argv: list[str], timeout: float = 20) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(systems: tuple[str, ...], installed: dict[str, Any]) -> dict[str, str]:
    import importlib.metadata as md

    v: dict[str, str] = {"python": platform.python_version()}
    for pkg in ("dragoman", "websockets", "uvicorn", "redis", "msgspec", "uvloop"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    v["node"] = _cmd_out(["node", "--version"])
    v["commit"] = _cmd_out(["git", "rev-parse", "--short", "HEAD"])
    for pkg, dists in (("arq", ("arq", "redis")), ("celery", ("celery", "kombu", "redis")), ("saq", ("saq", "redis"))):
        if pkg in installed and installed[pkg].get("ok"):
            code = f"import importlib.metadata as m;print(' '.join(m.version(d) for d in {dists!r}))"
            got = _cmd_out([str(peer_install.venv_python(pkg)), "-c", code]).split()
            for d, ver in zip(dists, got, strict=False):
                v[f"{pkg}:{d}" if d != pkg else pkg] = ver
    if "bullmq" in installed and installed["bullmq"].get("ok"):
        for d in ("bullmq", "ioredis"):
            try:
                v[d] = json.loads((peer_install.node_modules() / d / "package.json").read_text())["version"]
            except (OSError, ValueError, KeyError):
                pass
    return v


def commit() -> str:
    """The short commit of the tree being measured, marked when it has uncommitted changes."""
    sha = _cmd_out(["git", "rev-parse", "--short", "HEAD"]) or "unknown"
    dirty = _cmd_out(["git", "status", "--porcelain", "--untracked-files=no"])
    return sha + (" (+ uncommitted changes)" if dirty else "")


def dragoman_argv() -> list[str]:
    """The ``dragoman`` command of the interpreter running the bench (its venv's entry point)."""
    found = shutil.which("dragoman", path=str(Path(sys.executable).parent))
    return [found] if found else [sys.executable, "-m", "dragoman.cli.main"]


def serve_has_workers() -> bool:
    """Whether ``dragoman serve`` takes ``--workers N`` (several processes behind one port)."""
    out = _cmd_out([*dragoman_argv(), "serve", "--help"], timeout=60)
    return "--workers" in out


def nofile_limits() -> tuple[int, int]:
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)


def memory_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024 / 1024
    except (OSError, ValueError):
        pass
    return float("nan")


def machine() -> dict[str, Any]:
    import os

    soft, hard = nofile_limits()
    return {"cpu_count": os.cpu_count(), "cpu_model": cpu_model(), "memory_gb": round(memory_gb(), 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "nofile_soft": soft, "nofile_hard": hard}
