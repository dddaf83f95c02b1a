"""``python -m bench``: every benchmark of the project in one run, one page (``make bench``), or the
short comparison that CI prints (``make bench-quick``).

    .venv/bin/python -m bench --out docs/benchmarks.md     # make bench: ~20 minutes on 2 cores
    .venv/bin/python -m bench --quick                      # make bench-quick: under a minute, prints
    .venv/bin/python -m bench --sections e2e,idle --out /tmp/page.md

Sections (``--sections``, default all; ``--quick`` runs ``e2e`` only, on its short profile):

* ``e2e``: Dragoman end to end vs BullMQ, arq (10 ms and default), Celery, SAQ on one Valkey,
  alternating rounds, with the scheduler's CPU per job and its py-spy profile, Redis work per job,
  the limit of each system, and ``dragoman serve --workers 1/2`` (``bench.e2e``);
* ``durability``: the same closed loop on a Sentinel set, ``redis_min_replicas_ack`` 0 vs 1
  (``bench.e2e.durability``);
* ``idle``: one scheduler holding 10,000 node and 1,000 session sockets (``bench.idle``;
  ``--quick`` there: 1,000 + 100);
* ``store``: the transition scripts alone through the Store API (``bench.run``);
* ``baseline``: Redis work per job, this code against the code before the hot-path work, side by
  side in one run (``bench.baseline``; needs the git history).

The peers are installed first into bench-only folders (``bench.peers.install``: ``.bench/`` or
``$DRAGOMAN_BENCH_HOME``) from PyPI and npm; one that cannot be installed is skipped and said so.
Speed is never asserted: the exit status is 1 only when the harness itself failed (an exception,
or no Dragoman figure at all), so CI sees a broken benchmark but never a slow machine.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
import traceback
from pathlib import Path
from typing import Any

SECTIONS = ("e2e", "durability", "idle", "store", "baseline")


def _run_section(name: str, quick: bool, install: bool) -> dict[str, Any]:
    if name == "e2e":
        from bench.e2e.runner import run_comparison

        return run_comparison("quick" if quick else "full", install=install)
    if name == "durability":
        from bench.e2e import durability

        return durability.run(quick)
    if name == "idle":
        from bench.idle import runner

        return runner.run("quick" if quick else "full")
    if name == "baseline":
        from bench import baseline

        return baseline.run()
    from bench import run as store

    return store.measure(store.QUICK if quick else store.FULL, *store.default_loop())


def _summary(name: str, res: dict[str, Any]) -> str:
    if name == "e2e":
        from bench.e2e.report import summary
    elif name == "durability":
        from bench.e2e.durability import summary
    elif name == "idle":
        from bench.idle.report import summary
    elif name == "baseline":
        from bench.baseline import summary
    else:
        from bench.run import summary
    return summary(res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the short end-to-end comparison only (CI)")
    ap.add_argument("--sections", help=f"comma-separated, from {','.join(SECTIONS)} (default: all; --quick: e2e)")
    ap.add_argument("--out", type=Path, help="write the Markdown page here (e.g. docs/benchmarks.md)")
    ap.add_argument("--json", type=Path, help="write every figure as JSON here")
    ap.add_argument("--no-install", action="store_true", help="skip peers that are not installed yet")
    args = ap.parse_args(argv)
    sections = tuple(s.strip() for s in (args.sections or ("e2e" if args.quick else ",".join(SECTIONS))).split(","))
    bad = set(sections) - set(SECTIONS)
    if bad:
        ap.error(f"unknown section(s): {', '.join(sorted(bad))}")
    command = "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    results: dict[str, Any] = {"command": command.strip(), "quick": args.quick, "sections": {}, "failed": {}}
    for name in sections:
        print(f"== {name} ==", file=sys.stderr, flush=True)
        try:
            res = _run_section(name, args.quick, not args.no_install)
        except Exception as exc:  # noqa: BLE001 - one section's failure is reported, the others still run
            traceback.print_exc()
            results["failed"][name] = repr(exc)[:1000]
            continue
        results["sections"][name] = res
        print(_summary(name, res), flush=True)
    results["elapsed_s"] = time.perf_counter() - t0
    print(f"(bench took {results['elapsed_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    if args.out:
        from bench.report import page

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(page(results))
        print(f"wrote {args.out}")
    return _status(results)


def _status(results: dict[str, Any]) -> int:
    """1 when the harness failed; peers missing or slow figures are warnings only."""
    for name, why in results["failed"].items():
        print(f"ERROR: the {name} benchmark failed: {why}", file=sys.stderr)
    e2e = results["sections"].get("e2e")
    if e2e is not None:
        for system, why in e2e.get("skipped", {}).items():
            print(f"WARNING: {system} was not measured: {why}", file=sys.stderr)
        if "dragoman" not in e2e.get("systems", {}):
            print("ERROR: no Dragoman figure: every Dragoman round failed (see above)", file=sys.stderr)
            return 1
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
