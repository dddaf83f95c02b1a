"""``python -m chaos [--quick] [--faults a,b,...] [--out docs/reliability.md] [--json path]``

Runs the faults one by one, each on a fresh topology, prints the table, writes the page. Exit code 1
when any fault fails its criteria (lost, duplicates, leaked slots, non-terminal jobs, misrouted or
forged results delivered, a process exiting unasked), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path

from .faults import FAULTS, QUICK
from .report import command_line, page, terminal_table
from .run import FaultResult, Load, run_fault


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help=f"short phases, 500 fuzz frames; default faults: {','.join(QUICK)}")
    parser.add_argument("--faults", default="", help="comma-separated fault names (default: all, or the quick set)")
    parser.add_argument("--out", type=Path, help="write the Markdown page here")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/chaos"),
                        help="per-fault logs and Valkey data (default artifacts/chaos)")
    parser.add_argument("--list", action="store_true", help="list the faults and exit")
    args = parser.parse_args(argv)
    if args.list:
        for f in FAULTS.values():
            print(f"{f.name:22} {f.title}")
        return 0
    names = [n.strip() for n in args.faults.split(",") if n.strip()] or list(QUICK if args.quick else FAULTS)
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        parser.error(f"unknown fault(s) {', '.join(unknown)}; --list shows them")
    load = Load.quick() if args.quick else Load()
    results = asyncio.run(run_all(names, args.quick, args.workdir, load))
    total = sum(r.seconds for r in results)
    print()
    print(terminal_table(results))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page(results, quick=args.quick, command=command_line(), load=load, total_s=total))
        print(f"\nwrote {args.out}")
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1, default=str))
    return 0 if all(r.passed for r in results) else 1


async def run_all(names: list[str], quick: bool, workdir: Path, load: Load) -> list[FaultResult]:
    results = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name}: {FAULTS[name].title}", flush=True)
        started = time.monotonic()
        r = await run_fault(name, quick=quick, workdir=workdir, load=load,
                            log=lambda s: print(s, flush=True))
        verdict = "pass" if r.passed else "FAIL: " + "; ".join(r.problems)
        print(f"  -> sent {r.sent}, translated {r.translated}, lost {r.lost}, dup {r.duplicates}, "
              f"leaked {r.leaked}, non-terminal {r.non_terminal}, failed {r.failed}: {verdict} "
              f"({time.monotonic() - started:.0f} s)", flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    sys.exit(main())
