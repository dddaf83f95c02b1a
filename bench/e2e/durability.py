"""The cost of the durability option: Dragoman's closed loop on a Sentinel set, WAIT for 0 vs 1 replica.

``python -m bench.e2e.durability [--quick]``. One ``dragoman.embedded.EmbeddedSentinelSet`` (a
primary, a replica, three Sentinels); the scheduler gets its ``redis+sentinel://`` URL and
``DRAGOMAN_REDIS_MIN_REPLICAS_ACK`` = 0 (the default: a transition returns once the primary has
it) or 1 (each transition also waits, with WAIT, until the replica has it). Everything else is
the end-to-end Dragoman round of ``bench.e2e.systems`` (zero-time nodes, 50 utterances in flight,
closed loop only), in alternating rounds (ack=0, ack=1, ack=0, ...); figures are medians, and the
cost is reported as the ratio ack=1 / ack=0 of jobs/s, of the scheduler's CPU per job and of the
primary's commands per job. CPU of both data servers is read from /proc, commandstats from the
primary.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import redis

from bench import cli
from bench.e2e.meter import aggregate
from bench.e2e.procs import Proc, loadavg
from bench.e2e.runner import FULL, QUICK, Profile, alternate, new_logdir
from bench.e2e.systems import Context, DragomanSpec, log, run_dragoman

VARIANTS = {f"ack{n}": DragomanSpec(env=(("DRAGOMAN_REDIS_MIN_REPLICAS_ACK", str(n)),), phases=("closed",))
            for n in (0, 1)}


async def _run(profile: Profile, logdir: Path) -> dict[str, Any]:
    from dragoman.embedded import EmbeddedSentinelSet

    t0 = time.perf_counter()
    log("starting an embedded Sentinel set (primary, replica, 3 Sentinels) ...")
    with EmbeddedSentinelSet("dragoman-bench") as ha:
        host, port = ha.primary_address()
        primary, replica = ha.primary, ha.replica
        assert primary.proc is not None and replica.proc is not None
        admin = redis.Redis(host=host, port=port, decode_responses=True)
        ctx = Context(profile, ha.url, primary.proc.pid, logdir, admin_url=f"redis://{host}:{port}/0",
                      extra_pids={"replica": replica.proc.pid})

        async def run_one(name: str, rnd: int) -> dict[str, Any]:
            return await run_dragoman(ctx, rnd, VARIANTS[name], name=f"sentinel-{name}")

        results, errors = await alternate(list(VARIANTS), profile.rounds, run_one, admin.flushall)
        repl = admin.info("replication")
        admin.close()
        ctx.close()
    out: dict[str, Any] = {"profile": dataclasses.asdict(profile), "url": "redis+sentinel://…/dragoman-bench",
                           "replicas_connected": repl.get("connected_slaves"), "variants": {}, "errors": errors,
                           "raw": results, "loadavg": loadavg()}
    for name, rounds in results.items():
        if rounds:
            out["variants"][name] = aggregate(rounds)
    a0, a1 = out["variants"].get("ack0"), out["variants"].get("ack1")
    if a0 and a1:
        c0, c1 = a0["closed"], a1["closed"]
        out["ratio"] = {
            "jobs_per_s": c1["rate"] / c0["rate"],
            "scheduler_cpu_per_job": c1["cpu_us_per_job"]["scheduler"] / c0["cpu_us_per_job"]["scheduler"],
            "redis_cmds_per_job": c1["redis_calls_per_job"] / c0["redis_calls_per_job"],
            "p50_ms": c1["p50_ms"] / c0["p50_ms"]}
        out["ratio_rounds"] = [x["rate"] / y["rate"] for x, y in
                               zip(c1["per_round"], c0["per_round"], strict=False) if y["rate"]]
    out["elapsed_s"] = time.perf_counter() - t0
    return out


def run(quick: bool = False, logdir: Path | None = None, **overrides: Any) -> dict[str, Any]:
    prof = dataclasses.replace(QUICK if quick else FULL, **overrides)
    logdir = logdir or new_logdir("durability")
    try:
        return asyncio.run(_run(prof, logdir))
    finally:
        Proc.kill_all_now()


def _f(x: float | None, nd: int = 0) -> str:
    return "-" if x is None or x != x else f"{x:,.{nd}f}"


def summary(res: dict[str, Any]) -> str:
    lines = [f"Durability: Dragoman closed loop on a Sentinel set ({res['profile']['rounds']} alternating rounds)"]
    for name, a in res["variants"].items():
        c = a["closed"]
        lines.append(f"  {name}: {c['rate']:,.0f} jobs/s, p50 {c['p50_ms']:.1f} ms, scheduler "
                     f"{c['cpu_us_per_job'].get('scheduler', float('nan')):.0f} µs/job, primary "
                     f"{c['redis_calls_per_job']:.1f} cmds/job (WAIT {c['redis_calls_by_command'].get('wait', 0):.1f})")
    if "ratio" in res:
        r = res["ratio"]
        lines.append(f"  ack=1 / ack=0: jobs/s {r['jobs_per_s']:.2f}x (rounds: "
                     f"{', '.join(f'{x:.2f}' for x in res['ratio_rounds'])}), scheduler CPU/job "
                     f"{r['scheduler_cpu_per_job']:.2f}x, Redis cmds/job {r['redis_cmds_per_job']:.2f}x, p50 "
                     f"{r['p50_ms']:.2f}x")
    for name, errs in res["errors"].items():
        for e in errs:
            lines.append(f"  {name} failed {e}")
    return "\n".join(lines)


def markdown(res: dict[str, Any]) -> str:
    L = ["## The cost of durability: WAIT for a replica", "",
         "Dragoman's closed loop (50 utterances in flight, zero-time nodes, as above) with the scheduler on an "
         "embedded Sentinel set (`dragoman.embedded.EmbeddedSentinelSet`: one primary, one replica, three "
         "Sentinels; URL `redis+sentinel://…`), with `DRAGOMAN_REDIS_MIN_REPLICAS_ACK=0` (default) and `=1` (every "
         f"transition waits until the replica has it), alternating, {res['profile']['rounds']} rounds, medians; "
         f"replicas connected to the primary at the end: {res.get('replicas_connected', '?')}.", "",
         "| min_replicas_ack | closed jobs/s | p50 ms | p99 ms | scheduler µs/job | primary cmds/job | WAIT/job | "
         "primary CPU µs/job | replica CPU µs/job | limit |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, a in res["variants"].items():
        c = a["closed"]
        L.append(f"| {name.removeprefix('ack')} | {_f(c['rate'])} | {_f(c['p50_ms'], 1)} | {_f(c['p99_ms'], 1)} | "
                 f"{_f(c['cpu_us_per_job'].get('scheduler'))} | {_f(c['redis_calls_per_job'], 1)} | "
                 f"{c['redis_calls_by_command'].get('wait', 0):.1f} | {_f(c['cpu_us_per_job'].get('redis'))} | "
                 f"{_f(c['cpu_us_per_job'].get('replica'))} | {'; '.join(c['limit']['saturated']) or 'nothing saturated'} |")
    if "ratio" in res:
        r = res["ratio"]
        L += ["", f"**ack=1 / ack=0: {r['jobs_per_s']:.2f}x the jobs/s** (round by round: "
              f"{', '.join(f'{x:.2f}' for x in res['ratio_rounds'])}); scheduler CPU per job "
              f"{r['scheduler_cpu_per_job']:.2f}x; primary commands per job {r['redis_cmds_per_job']:.2f}x; "
              f"p50 {r['p50_ms']:.2f}x."]
    errs = [f"- {n}: {e}" for n, es in res["errors"].items() for e in es]
    if errs:
        L += ["", "Failed rounds:", ""] + errs
    return "\n".join(L + [""])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.e2e.durability", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one short round of each")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    res = run(args.quick, **({"rounds": args.rounds} if args.rounds else {}))
    return cli.report(res, summary, markdown, args.json, args.markdown)


if __name__ == "__main__":
    sys.exit(main())
