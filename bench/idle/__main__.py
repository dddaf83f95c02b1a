"""``python -m bench.idle [--quick] [--json OUT] [--markdown OUT]``: see ``bench/idle/__init__.py``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import cli
from bench.idle.report import markdown, summary
from bench.idle.runner import run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.idle", description="One scheduler holding many idle sockets.")
    ap.add_argument("--quick", action="store_true", help="1,000 node + 100 session sockets")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--pyspy", type=Path, help="sample the scheduler over the steady window; raw stacks to this file")
    args = ap.parse_args(argv)
    res = run("quick" if args.quick else "full", pyspy=args.pyspy)
    return cli.report(res, summary, markdown, args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
