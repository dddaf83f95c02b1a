"""``python -m bench.baseline``: Redis work per job, this tree against an earlier commit, side by side
in one run (``make bench``'s section ``baseline``).

Redis work per job is compared with the code as it was before the hot-path work (``BASE_REF``),
measured now, on this machine, in the same run: figures from another day say little here (this
machine drifts 2-3x between days).

How: a ``git worktree`` of the earlier commit; then rounds that alternate between the two trees
(the order flips every round). In each round each tree's own code runs the store level's pair loop
(``bench.run.Bench.pair``: 16 coroutines, each a session dispatching its next utterance's job and
completing it, 50 nodes x 4 slots) in a process of its own, against one Valkey this run started and
flushes before each tree. After a warm-up, a window of INFO commandstats and of the server's CPU
gives, per dispatch+complete pair:

* the commands the scripts issue (every command but the script calls themselves),
* the server's execution time of the script calls (``usec`` of FCALL, or of EVALSHA before it),
* the server's CPU time (valkey-server's, from /proc: socket reading and writing included).

Then the same alternation end to end: each tree's own ``python -m bench.e2e --systems dragoman``
(its scheduler process, node and session load generators through both WebSockets, a Valkey of its
own), one round per tree per round, read from its JSON: per job, the commands (those the scripts
issue included), the server's execution time of the script calls and of every command, and
valkey-server's CPU, in the closed loop (50 in flight) and the open loop (200 jobs/s).

Last, where valgrind is installed, the work itself, free of this machine's noise: the same pair loop
in each tree against a valkey-server run under ``valgrind --tool=callgrind``, which counts the
instructions the server executes (the same count for the same binary and calls, whatever else the
machine is doing). Counting is zeroed after a warm-up and read after ``INSTR_PAIRS`` pairs.

Both trees run with this tree's virtualenv and the same server binary; only the code differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dragoman.embedded import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
# The commit before the hot-path work of issue 11 ("Rooms across scheduler processes, ...").
BASE_REF = "03bc8cc"
NOT_FROM_SCRIPTS = {"fcall", "evalsha", "eval", "info", "config", "flushall", "function", "script", "ping",
                    "client", "hello"}

# Runs inside one tree (its own src/ and bench/ first on sys.path); prints one JSON line.
DRIVER = r"""
import asyncio, json, os, sys, time, types
from bench.run import Bench, FULL

def cpu_s(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

async def main(url, pid, warmup_s, window_s, nodes, slots, concurrency):
    b = Bench(types.SimpleNamespace(url=url, proc=types.SimpleNamespace(pid=pid)), FULL)
    await b.fresh_db()
    await b.register_nodes(nodes, slots)
    state = {"n": 0, "stop": False, "error": None}

    async def session(w):
        k = 0
        try:
            while not state["stop"]:
                await b.pair(f"sess-{w}", k)
                k += 1
                state["n"] += 1
        except Exception as exc:
            state["error"] = exc
            state["stop"] = True

    tasks = [asyncio.create_task(session(w)) for w in range(concurrency)]
    await asyncio.sleep(warmup_s)
    await b.admin.config_resetstat()
    n0, c0, t0 = state["n"], cpu_s(pid), time.perf_counter()
    await asyncio.sleep(window_s)
    stats = await b.admin.info("commandstats")
    n1, c1, t1 = state["n"], cpu_s(pid), time.perf_counter()
    state["stop"] = True
    await asyncio.gather(*tasks)
    if state["error"]:
        raise state["error"]
    print(json.dumps({"pairs": n1 - n0, "seconds": t1 - t0, "cpu_s": c1 - c0,
                      "commandstats": {k: {"calls": int(v["calls"]), "usec": int(v["usec"])} for k, v in stats.items()}}))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), *map(float, sys.argv[3:5]), *map(int, sys.argv[5:8])))
"""


# Runs inside one tree: the pair loop against a server under callgrind; prints instructions per pair.
INSTR_DRIVER = r"""
import asyncio, glob, json, subprocess, sys, time, types
from bench.run import Bench, FULL

url, pid, outdir, n, warm = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])

def dump_total():
    before = set(glob.glob(outdir + "/cg.out*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for path in set(glob.glob(outdir + "/cg.out*")) - before:
            with open(path) as f:
                for line in f:
                    if line.startswith(("totals:", "summary:")):
                        return int(line.split()[1])
        time.sleep(0.1)  # callgrind writes the dump file on its own schedule: no event to await
    raise RuntimeError("callgrind wrote no dump")

async def main():
    b = Bench(types.SimpleNamespace(url=url, proc=types.SimpleNamespace(pid=pid)), FULL)
    await b.fresh_db()
    await b.register_nodes(50, 4, parallel=4)

    async def run(count, tag):
        async def session(w):
            for k in range(count // 16):
                await b.pair(f"{tag}-{w}", k)
        await asyncio.gather(*(session(w) for w in range(16)))

    await run(warm, "warm")
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    await run(n, "m")
    print(json.dumps({"pairs": n, "instructions": dump_total()}))

asyncio.run(main())
"""
INSTR_PAIRS = 1600  # counted, after a warm-up of a fifth as many


def _tree_env(tree: Path) -> dict[str, str]:
    """The environment that runs ``tree``'s own code (its src/ and bench/ first on sys.path)."""
    return dict(os.environ, PYTHONPATH=f"{tree / 'src'}{os.pathsep}{tree}")


def _run_driver(tree: Path, driver: str, args: list[Any], timeout: float, what: str) -> dict[str, Any]:
    """Run ``driver`` (a DRIVER-like script) with ``tree``'s own code first on sys.path; its last line of
    output, as JSON."""
    env = _tree_env(tree)
    run = subprocess.run([sys.executable, "-c", driver, *map(str, args)], env=env, cwd=tree, capture_output=True,
                         text=True, timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"{what} failed in {tree}: {run.stderr.strip()[-2000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _instructions(tree: Path, workdir: Path, pairs: int) -> float | None:
    """Server instructions per dispatch+complete pair of ``tree``'s code (None without valgrind)."""
    if pairs <= 0 or shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        return None
    from dragoman.embedded import _ping, _wait_until, find_server_binary, free_port

    out = workdir / f"callgrind-{tree.name}"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}/cg.out.%p",
                               find_server_binary(), "--port", str(port), "--save", "", "--appendonly", "no"],
                              cwd=out, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_until("valkey-server under callgrind", lambda: _ping(port), timeout=60)
        got = _run_driver(tree, INSTR_DRIVER, [f"redis://127.0.0.1:{port}/0", server.pid, out, pairs,
                                              max(16, pairs // 5)], 600, "the instruction count")
        return float(got["instructions"]) / got["pairs"]
    finally:
        server.terminate()
        server.wait(timeout=60)


def window_figures(raw: dict[str, Any]) -> dict[str, float]:
    """One window's figures per dispatch+complete pair."""
    pairs = raw["pairs"]
    cs = {k.removeprefix("cmdstat_"): v for k, v in raw["commandstats"].items()}
    script = cs.get("fcall") or cs.get("evalsha") or {"calls": 0, "usec": 0}
    from_scripts = sum(v["calls"] for k, v in cs.items() if k not in NOT_FROM_SCRIPTS)
    return {"pairs_per_s": pairs / raw["seconds"],
            "commands_per_pair": from_scripts / pairs,
            "script_calls_per_pair": script["calls"] / pairs,
            "script_us_per_pair": script["usec"] / pairs,
            "server_cpu_us_per_pair": raw["cpu_s"] / pairs * 1e6}


E2E_FIGURES = (("redis_calls_per_job", "Redis commands (scripts' included)"),
               ("scripts_us", "server µs executing the scripts"),
               ("all_commands_us", "server µs, every command (a script's own commands counted twice)"),
               ("redis_cpu_us", "server CPU µs (valkey-server, /proc)"),
               ("rate", "jobs/s"))


def e2e_figures(loop: dict[str, Any]) -> dict[str, float]:
    """One bench.e2e loop's (closed or open) per-job Redis figures."""
    ex = loop.get("redis_exec_us_per_job", {})
    return {"redis_calls_per_job": loop["redis_calls_per_job"], "scripts_us": ex.get("scripts", float("nan")),
            "all_commands_us": ex.get("all_commands", float("nan")),
            "redis_cpu_us": loop["cpu_us_per_job"]["redis"], "rate": loop["rate"]}


def _run_e2e(tree: Path, out: Path) -> dict[str, dict[str, float]]:
    env = _tree_env(tree)
    run = subprocess.run([sys.executable, "-m", "bench.e2e", "--systems", "dragoman", "--rounds", "1", "--no-install",
                          "--json", str(out)], env=env, cwd=tree, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 or not out.exists():
        raise RuntimeError(f"bench.e2e failed in {tree}: {run.stderr.strip()[-2000:]}")
    d = json.loads(out.read_text())["systems"]["dragoman"]
    return {loop: e2e_figures(d[loop]) for loop in ("closed", "open") if loop in d}


def _run_tree(tree: Path, server: EmbeddedServer, warmup_s: float, window_s: float) -> dict[str, float]:
    assert server.proc is not None
    return window_figures(_run_driver(tree, DRIVER, [server.url, server.proc.pid, warmup_s, window_s, 50, 4, 16], 120,
                                      "the pair loop"))


def _alternating(trees: dict[str, Path], rounds: int) -> list[tuple[int, str]]:
    """(round, tree) in running order: the order of the trees flips every round."""
    names = list(trees)
    return [(r, name) for r in range(rounds) for name in (names if r % 2 == 0 else names[::-1])]


def run(rounds: int = 5, ref: str = BASE_REF, warmup_s: float = 1.0, window_s: float = 3.0,
        e2e_rounds: int = 3, instr_pairs: int = INSTR_PAIRS) -> dict[str, Any]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        raise RuntimeError("needs a git checkout (the earlier commit is read from its history)")
    base_dir = Path(tempfile.mkdtemp(prefix="dragoman-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--quiet", str(base_dir), ref],
                   check=True, capture_output=True, text=True)
    base_commit = subprocess.run(["git", "-C", str(base_dir), "log", "-1", "--format=%h %s"],
                                 check=True, capture_output=True, text=True).stdout.strip()
    trees = {"before": base_dir, "now": ROOT}
    per: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    e2e: dict[str, list[dict[str, dict[str, float]]]] = {name: [] for name in trees}
    try:
        with EmbeddedServer() as server:
            for r, name in _alternating(trees, rounds):
                per[name].append(_run_tree(trees[name], server, warmup_s, window_s))
                print(f"baseline round {r + 1}: {name} {per[name][-1]}", file=sys.stderr, flush=True)
        for r, name in _alternating(trees, e2e_rounds):
            e2e[name].append(_run_e2e(trees[name], base_dir.parent / f"e2e-{name}-{r}.json"))
            print(f"baseline e2e round {r + 1}: {name} {e2e[name][-1]}", file=sys.stderr, flush=True)
        instructions = {name: _instructions(tree, base_dir.parent, instr_pairs) for name, tree in trees.items()}
        print(f"baseline instructions per pair: {instructions}", file=sys.stderr, flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_dir)], check=False,
                       capture_output=True)
        shutil.rmtree(base_dir.parent, ignore_errors=True)
    med = {name: {k: statistics.median(w[k] for w in ws) for k in ws[0]} for name, ws in per.items()}
    ratio = {k: med["now"][k] / med["before"][k] for k in med["now"] if med["before"][k]}
    rounds_ratio = {k: [n[k] / b[k] for n, b in zip(per["now"], per["before"], strict=True) if b[k]]
                    for k in med["now"]}
    e2e_med: dict[str, dict[str, dict[str, float]]] = {}
    for name, rs in e2e.items():
        for loop in ("closed", "open"):
            got = [x[loop] for x in rs if loop in x]
            if got:
                e2e_med.setdefault(name, {})[loop] = {k: statistics.median(g[k] for g in got) for k in got[0]}
    return {"ref": ref, "base_commit": base_commit, "rounds": rounds, "window_s": window_s,
            "windows": per, "median": med, "ratio": ratio, "rounds_ratio": rounds_ratio,
            "e2e_rounds": e2e_rounds, "e2e": e2e, "e2e_median": e2e_med, "instructions": instructions,
            "instr_pairs": instr_pairs}


ROWS = (("commands_per_pair", "Redis commands the scripts issue", "{:.1f}"),
        ("script_us_per_pair", "server µs executing the scripts (commandstats)", "{:.1f}"),
        ("server_cpu_us_per_pair", "server CPU µs (valkey-server, /proc)", "{:.1f}"),
        ("script_calls_per_pair", "script calls", "{:.1f}"),
        ("pairs_per_s", "pairs/s reached (16 coroutines, one client process)", "{:,.0f}"))


def summary(res: dict[str, Any]) -> str:
    r, ins = res["ratio"], res.get("instructions") or {}
    line = (f"Redis work per job vs {res['base_commit'].split()[0]} (same run, {res['rounds']} rounds): commands "
            f"{r['commands_per_pair']:.2f}x, script server µs {r['script_us_per_pair']:.2f}x, "
            f"server CPU {r['server_cpu_us_per_pair']:.2f}x")
    if ins.get("now") and ins.get("before"):
        line += f", server instructions {ins['now'] / ins['before']:.2f}x (callgrind)"
    return line


def markdown(res: dict[str, Any]) -> str:
    med, ratio, rr = res["median"], res["ratio"], res["rounds_ratio"]
    L = ["## Redis work per job, against the code before the hot-path work (same run)", "",
         f"`python -m bench.baseline` (run by `make bench`): the store level's pair loop (each dispatch+complete "
         f"is one job; 16 coroutines, 50 nodes × 4 slots) run by this commit's code and by `{res['base_commit']}`'s "
         f"(a `git worktree`), alternating, {res['rounds']} rounds of one {res['window_s']:.0f} s window each, one "
         "Valkey for both (flushed before each). Figures per job, medians over the rounds; the ratio is now ÷ "
         "before.", "",
         "| per job | before | now | now ÷ before | round by round |", "|---|---:|---:|---:|---|"]
    for key, label, fmt in ROWS:
        L.append(f"| {label} | {fmt.format(med['before'][key])} | {fmt.format(med['now'][key])} | "
                 f"**{ratio[key]:.2f}x** | {', '.join(f'{x:.2f}' for x in rr[key])} |")
    ins = res.get("instructions") or {}
    if ins.get("now") and ins.get("before"):
        L.append(f"| server instructions (callgrind: {res['instr_pairs']:,} pairs after a warm-up; the same count on any "
                 f"day) | {ins['before']:,.0f} | {ins['now']:,.0f} | **{ins['now'] / ins['before']:.2f}x** | one "
                 "count each |")
    else:
        L.append("| server instructions (callgrind) | | | not measured (valgrind not installed, or no pairs asked) | |")
    em = res.get("e2e_median") or {}
    if "before" in em and "now" in em:
        L += ["", f"End to end (`python -m bench.e2e --systems dragoman --rounds 1` in each tree, alternating, "
              f"{res['e2e_rounds']} rounds; medians): per job",
              "", "| per job | loop | before | now | now ÷ before |", "|---|---|---:|---:|---:|"]
        for loop in ("closed", "open"):
            b, n = em["before"].get(loop), em["now"].get(loop)
            if not b or not n:
                continue
            for key, label in E2E_FIGURES:
                fmt = "{:,.0f}" if key == "rate" else "{:.1f}"
                L.append(f"| {label} | {loop} | {fmt.format(b[key])} | {fmt.format(n[key])} | "
                         f"**{n[key] / b[key]:.2f}x** |")
    L += ["", "The server's CPU includes reading and writing the sockets, which the scripts' execution time does "
          "not; this tree's client also pipelines the calls made in one turn of the event loop (the earlier one "
          "made one write per call), so part of the CPU difference is fewer socket reads and writes. The commands "
          "are counted by INFO commandstats around the window: the earlier commit's own page said 19 + 14 per job, "
          "from a run made before 7802238 had cut them; its code issues what the table shows.", ""]
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.baseline", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default=BASE_REF, help=f"the earlier commit (default {BASE_REF})")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window", type=float, default=3.0, help="seconds per window")
    ap.add_argument("--e2e-rounds", type=int, default=3, help="end-to-end rounds per tree (0: none)")
    ap.add_argument("--instr-pairs", type=int, default=INSTR_PAIRS,
                    help="pairs counted under callgrind per tree (0: no instruction count)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    res = run(args.rounds, args.ref, window_s=args.window, e2e_rounds=args.e2e_rounds, instr_pairs=args.instr_pairs)
    print(markdown(res))
    print(summary(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
