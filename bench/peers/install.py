"""Install the peers for the end-to-end comparison into bench-only folders (never project dependencies).

    python -m bench.peers.install [--force] [PEER ...]      # PEER: arq celery saq bullmq (default all)

* ``.bench/venv-arq``, ``.bench/venv-celery``, ``.bench/venv-saq``: one virtualenv per Python peer
  (same interpreter as the one running this), pinned below. One each because they cannot share one:
  arq 0.28 wants redis-py < 6, Celery 5.7 (kombu 5.7) wants redis-py >= 6.4;
* ``.bench/node``: an npm prefix with BullMQ and ioredis.

Both folders are under ``.bench/`` at the repository root (ignored by git), or under
``$DRAGOMAN_BENCH_HOME`` when set. Idempotent: each folder has a
stamp file holding the pinned requirements; when it matches, nothing is installed again. Every step
that fails is reported (``InstallResult.error``) and never raises, so a benchmark can skip that peer.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# DRAGOMAN_BENCH_HOME moves the installs (and the run logs) elsewhere, e.g. a cache folder that
# outlives a CI clone.
BENCH_HOME = Path(os.environ.get("DRAGOMAN_BENCH_HOME") or ROOT / ".bench").resolve()
NODE_DIR = BENCH_HOME / "node"

# Current releases when this harness was written (`pip index versions NAME`, `npm view NAME version`).
# Each with the hiredis parser, as redis-py is usually deployed (Dragoman's Store uses it too).
PY_PEERS: dict[str, tuple[str, ...]] = {
    "arq": ("arq==0.28.0",),  # depends on redis[hiredis]
    "celery": ("celery[redis]==5.7.0", "hiredis"),
    "saq": ("saq[hiredis]==0.26.4", "typing_extensions"),  # saq imports typing_extensions, does not require it
    # not a peer: the sampling profiler for the scheduler's CPU breakdown (python -m bench.e2e --profile)
    "pyspy": ("py-spy==0.4.3",),
}
NPM_PACKAGES = ("bullmq@6.7.6", "ioredis@6.1.0")
_STAMP = ".installed.json"


@dataclasses.dataclass
class InstallResult:
    name: str
    ok: bool
    path: str
    error: str = ""
    skipped: bool = False  # already installed



def venv_dir(peer: str) -> Path:
    return BENCH_HOME / f"venv-{peer}"


def venv_python(peer: str) -> Path:
    return venv_dir(peer) / "bin" / "python"


def node_modules() -> Path:
    return NODE_DIR / "node_modules"


def _stamp_ok(folder: Path, want: object) -> bool:
    try:
        return json.loads((folder / _STAMP).read_text()) == want
    except (OSError, ValueError):
        return False


def _run(cmd: list[str], timeout: float) -> str:
    """Run an install command; returns '' on success, else the last lines of its output."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cmd[0]}: {exc}"
    if out.returncode != 0:
        tail = (out.stdout + out.stderr).strip().splitlines()[-6:]
        return f"{' '.join(cmd[:4])} ... exited {out.returncode}: " + " | ".join(tail)
    return ""


def install_python(peer: str, force: bool = False, timeout: float = 600) -> InstallResult:
    folder, python = venv_dir(peer), venv_python(peer)
    want = {"python": sys.version.split()[0], "requirements": list(PY_PEERS[peer])}
    if not force and python.exists() and _stamp_ok(folder, want):
        return InstallResult(peer, True, str(folder), skipped=True)
    try:
        if force and folder.exists():
            shutil.rmtree(folder)
        if not python.exists():
            venv.EnvBuilder(with_pip=True, clear=False).create(folder)
    except Exception as exc:  # noqa: BLE001 - reported, the peer is skipped
        return InstallResult(peer, False, str(folder), error=f"venv: {exc}")
    err = _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PY_PEERS[peer]],
               timeout)
    if err:
        return InstallResult(peer, False, str(folder), error=err)
    (folder / _STAMP).write_text(json.dumps(want))
    return InstallResult(peer, True, str(folder))


def install_node(force: bool = False, timeout: float = 600) -> InstallResult:
    want = {"packages": list(NPM_PACKAGES)}
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        return InstallResult("bullmq", False, str(NODE_DIR), error="node/npm not on PATH")
    if not force and (node_modules() / "bullmq").is_dir() and _stamp_ok(NODE_DIR, want):
        return InstallResult("bullmq", True, str(NODE_DIR), skipped=True)
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    pkg = NODE_DIR / "package.json"
    if not pkg.exists():
        pkg.write_text(json.dumps({"name": "dragoman-bench-peers", "private": True, "version": "0.0.0"}))
    err = _run([npm, "install", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--loglevel=error",
                *NPM_PACKAGES], timeout)
    if err:
        return InstallResult("bullmq", False, str(NODE_DIR), error=err)
    (NODE_DIR / _STAMP).write_text(json.dumps(want))
    return InstallResult("bullmq", True, str(NODE_DIR))


def is_installed(peer: str) -> bool:
    """Installed by this module before (stamp present), whatever the pinned versions."""
    folder = NODE_DIR if peer == "bullmq" else venv_dir(peer)
    return (folder / _STAMP).exists()


def install(peers: list[str] | tuple[str, ...] = ("arq", "celery", "saq", "bullmq"), force: bool = False
            ) -> dict[str, InstallResult]:
    """Install what the named peers need (``arq``, ``celery``, ``saq``, ``bullmq``)."""
    out: dict[str, InstallResult] = {}
    for peer in peers:
        out[peer] = install_node(force) if peer == "bullmq" else install_python(peer, force)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.peers.install", description=__doc__.split("\n\n")[0])
    ap.add_argument("peers", nargs="*", metavar="PEER", help="arq, celery, saq, bullmq, pyspy (default: all)")
    ap.add_argument("--force", action="store_true", help="reinstall even when the stamp matches")
    args = ap.parse_args(argv)
    unknown = set(args.peers) - {*PY_PEERS, "bullmq"}
    if unknown:
        ap.error(f"unknown peer(s): {', '.join(sorted(unknown))}")
    results = install(args.peers or [*PY_PEERS, "bullmq"], force=args.force)
    for r in results.values():
        state = "already installed" if r.skipped else ("installed" if r.ok else "FAILED: " + r.error)
        print(f"{r.name:13s} {r.path}: {state}")
    return 0 if all(r.ok for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
