"""``python -m bench.e2e [--quick] [--json OUT] [--markdown OUT]``: see ``bench/e2e/__init__.py``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import cli
from bench.e2e.report import markdown, summary
from bench.e2e.runner import ALL_SYSTEMS, EXPERIMENTS, KNOWN_SYSTEMS, PROFILES, SCALING, run_comparison


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.e2e",
                                 description="Dragoman end to end vs BullMQ, arq, Celery, SAQ on one Redis.")
    ap.add_argument("--quick", action="store_true", help="Dragoman, BullMQ, arq10; one short round (CI smoke)")
    ap.add_argument("--json", type=Path, help="write every figure as JSON here")
    ap.add_argument("--markdown", type=Path, help="write a Markdown section here")
    ap.add_argument("--systems", help=f"comma-separated, from {','.join(ALL_SYSTEMS)} (the default) and the "
                    f"{','.join(SCALING)} and the experiment(s) {','.join(EXPERIMENTS)}")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--warmup", type=float)
    ap.add_argument("--window", type=float)
    ap.add_argument("--inflight", type=int)
    ap.add_argument("--rate", type=float)
    ap.add_argument("--sessions", type=int)
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--no-install", action="store_true", help="skip peers that are not installed yet")
    ap.add_argument("--profile-phase", choices=("closed", "open"), default=None,
                    help="the phase the profile round samples (implies --profile; default closed)")
    ap.add_argument("--profile", action="store_true",
                    help="an extra Dragoman round with py-spy on the scheduler: its CPU by component (full: always)")
    args = ap.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("rounds", "warmup", "window", "inflight", "rate", "sessions", "nodes")
                 if getattr(args, k) is not None}
    if args.systems:
        systems = tuple(dict.fromkeys(s.strip() for s in args.systems.split(",") if s.strip()))
        bad = set(systems) - set(KNOWN_SYSTEMS)
        if bad:
            ap.error(f"unknown system(s): {', '.join(sorted(bad))}")
        overrides["systems"] = systems
    if args.no_install:
        overrides["install"] = False
    if args.profile:
        overrides["profile_scheduler"] = True
    if args.profile_phase:
        overrides["profile_scheduler"] = True
        overrides["profile_phase"] = args.profile_phase
    res = run_comparison(PROFILES["quick" if args.quick else "full"], **overrides)
    return cli.report(res, summary, markdown, args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
