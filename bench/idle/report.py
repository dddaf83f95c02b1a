"""The idle-socket scale figures as text and as a section of docs/benchmarks.md."""

from __future__ import annotations

from typing import Any

TARGET_KB_PER_SOCKET = 20
TARGET_US_PER_HEARTBEAT = 100


def _ms(r: dict[str, Any] | None, key: str) -> str:
    if not r or r.get("n", 0) == 0:
        return "-"
    return f"{r[key]:.1f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _metrics(res: dict[str, Any]) -> str:
    m = res.get("metrics_after") or {}
    if not m:
        return "GET /metrics not tried"
    if not m.get("ok"):
        return f"GET /metrics after the sockets left failed or timed out ({m['seconds']:.0f} s)"
    return (f"GET /metrics after the sockets left took {m['seconds']:.1f} s (it lists every node from Redis): "
            + ", ".join(f"{k} {v:g}" for k, v in m.items() if k not in ("seconds", "ok")))


def summary(res: dict[str, Any]) -> str:
    a, p = res["analysis"], res["profile"]
    nr, sr = a["node_reply_ms"], a["session_reply_ms"]
    return "\n".join([
        f"Idle sockets ({p['name']}): one scheduler, {p['nodes']:,} node + {p['sessions']:,} session sockets, "
        f"heartbeats every {p['heartbeat_s']:g} s (commit {res['env']['commit']})",
        f"  RSS MB: empty {a['rss_mb']['empty']:.0f}, sessions open {a['rss_mb']['sessions']:.0f}, all open "
        f"{a['rss_mb']['all_open']:.0f}, after the steady window {a['rss_mb']['steady_end']:.0f}, after every socket "
        f"left {a['rss_mb']['after_close']:.0f}",
        f"  per socket: {a['kb_per_socket']:.1f} kB (node {a['kb_per_node_socket']:.1f}, session "
        f"{a['kb_per_session_socket']:.1f}; target <= {TARGET_KB_PER_SOCKET}: "
        f"{_verdict(a['kb_per_socket'] <= TARGET_KB_PER_SOCKET)}); kept after they left "
        f"{a['kb_kept_per_socket_after_close']:.1f} kB/socket",
        f"  CPU: {a['heartbeats_per_s']:.0f} heartbeats/s cost {a['steady_cores']:.3f} cores; idle (sockets open, "
        f"nothing sent) {a['idle_cores']:.3f} cores; empty process {a['empty_cores']:.3f} cores",
        f"  CPU per heartbeat: {a['cpu_us_per_heartbeat']:.0f} µs net of idle ({a['cpu_us_per_heartbeat_gross']:.0f} µs "
        f"gross; target <= {TARGET_US_PER_HEARTBEAT}: {_verdict(a['cpu_us_per_heartbeat'] <= TARGET_US_PER_HEARTBEAT)}); "
        f"Redis {a['redis_cmds_per_heartbeat']:.1f} cmds, {a['redis_usec_per_heartbeat']:.0f} µs per heartbeat",
        _floor_line(res),
        f"  heartbeat replies: node p50 {_ms(nr, 'p50')} / p99 {_ms(nr, 'p99')} / max {_ms(nr, 'max')} ms; session "
        f"p50 {_ms(sr, 'p50')} / p99 {_ms(sr, 'p99')} ms; unanswered {a['unanswered']}, sockets closed by the "
        f"scheduler {a['closed_by_scheduler']}",
        f"  sockets open in the steady window {a['sockets_open_steady']:,} of {p['nodes'] + p['sessions']:,}; whole run: "
        f"registrations refused {a['registrations_failed']}, sockets closed by the scheduler "
        f"{a['closed_by_scheduler_whole_run']}, error frames {a['error_frames_whole_run']}"
        + (f" (first: {a['first_error']})" if a["first_error"] else ""),
        f"  nodes registered in {res['nodes_register_s']:.1f} s; scheduler fds open {res['fds_open']:,}; "
        f"{_metrics(res)}",
        "  scheduler log: " + (", ".join(f"{k} x{v}" for k, v in res.get("scheduler_log", {}).items()) or "clean"),
        f"  generators: {', '.join(f'{k} {v:.2f} cores' for k, v in a['generator_cores'].items())}; other CPU "
        f"{a['other_cores_steady']:.2f} cores; open files (soft/hard): runner {res['nofile_runner']}, scheduler "
        f"{res['nofile_scheduler']}",
    ])


def markdown(res: dict[str, Any]) -> str:
    a, p, env = res["analysis"], res["profile"], res["env"]
    nr, sr = a["node_reply_ms"], a["session_reply_ms"]
    L = ["## Idle connections at scale", "",
         f"One `dragoman serve` process (default settings; `max_sessions_per_key` raised to {p['sessions'] + 10:,} so "
         f"that many key-less sessions may open) on its own Valkey holds **{p['nodes']:,} node sockets** "
         f"(`node_register`, then `node_heartbeat` every {p['heartbeat_s']:g} s, as the existing worker) and "
         f"**{p['sessions']:,} idle session sockets** (`session_init`, then `client_heartbeat` every "
         f"{p['heartbeat_s']:g} s, as the web client), from {p['node_procs'] + 1} separate load-generator processes "
         "(`bench/idle/gen.py`: the raw `websockets` client, thousands of sockets per process). Heartbeats are spread "
         f"evenly over the period. Protocol v1 does not answer a node heartbeat, so every {p.get('ping_every', 1)}th "
         "is followed by a WebSocket ping on the same socket (the instrument's own frames, counted in the CPU "
         "figures, stay a fraction of the heartbeats'): the *node reply* is heartbeat sent -> pong (the scheduler "
         "reads a socket's frames in order); the *session reply* is `client_heartbeat` -> `server_heartbeat`. CPU from /proc/<pid>/stat; "
         f"*idle* = a {p['quiet_s']:g} s window with every socket open and the heartbeats paused (the scheduler's "
         "own WebSocket pings, every 20 s by default to an idle socket that sent nothing since the last look, and its timers); CPU per heartbeat = (steady-window "
         f"CPU - idle cores x its {p['steady_s']:g} s) / heartbeats. Open files: the runner and every child raise "
         f"their soft RLIMIT_NOFILE to the hard limit (`ulimit -n` here: {env['nofile_soft']:,} soft / "
         f"{env['nofile_hard']:,} hard; scheduler {res['nofile_scheduler']}).", "",
         "| | measured | target |", "|---|---:|---|",
         f"| scheduler RSS: empty -> sessions open -> all open | {a['rss_mb']['empty']:.0f} -> "
         f"{a['rss_mb']['sessions']:.0f} -> {a['rss_mb']['all_open']:.0f} MB | |",
         f"| memory per socket (all) | **{a['kb_per_socket']:.1f} kB** | <= {TARGET_KB_PER_SOCKET} kB "
         f"({_verdict(a['kb_per_socket'] <= TARGET_KB_PER_SOCKET)}) |",
         f"| per node socket / per session socket | {a['kb_per_node_socket']:.1f} / {a['kb_per_session_socket']:.1f} kB | |",
         f"| RSS after every socket left (kept per socket) | {a['rss_mb']['after_close']:.0f} MB "
         f"({a['kb_kept_per_socket_after_close']:.1f} kB) | |",
         f"| heartbeats/s in the steady window | {a['heartbeats_per_s']:.0f} | |",
         f"| scheduler CPU, steady (heartbeats) | {a['steady_cores']:.3f} cores | |",
         f"| scheduler CPU, idle (sockets open, nothing sent) | **{a['idle_cores']:.3f} cores** | |",
         f"| scheduler CPU, no socket at all | {a['empty_cores']:.3f} cores | |",
         f"| CPU per heartbeat, net of idle (gross) | **{a['cpu_us_per_heartbeat']:.0f} µs** "
         f"({a['cpu_us_per_heartbeat_gross']:.0f} µs) | <= {TARGET_US_PER_HEARTBEAT} µs "
         f"({_verdict(a['cpu_us_per_heartbeat'] <= TARGET_US_PER_HEARTBEAT)}) |",
         f"| the floor: a bare uvloop server reading as many frames/s from as many sockets, its protocol "
         f"ignoring them (`bench/idle/floor.py`): CPU per frame | {_floor_us(res)} | |",
         f"| Redis per heartbeat, net of idle: commands, server µs (commandstats) | "
         f"{a['redis_cmds_per_heartbeat']:.1f}, {a['redis_usec_per_heartbeat']:.0f} µs | |",
         f"| Redis commands/s while idle | {a['redis_cmds_per_s_idle']:.0f} | |",
         f"| node heartbeat reply p50 / p99 / max | {_ms(nr, 'p50')} / **{_ms(nr, 'p99')}** / {_ms(nr, 'max')} ms "
         f"({(nr or {}).get('n', 0):,} replies) | answered |",
         f"| session heartbeat reply p50 / p99 / max | {_ms(sr, 'p50')} / {_ms(sr, 'p99')} / {_ms(sr, 'max')} ms | |",
         f"| heartbeats unanswered; sockets closed by the scheduler | {a['unanswered']}; {a['closed_by_scheduler']} | 0 |",
         f"| nodes registered (all {p['nodes']:,}) in | {res['nodes_register_s']:.1f} s | |",
         f"| sockets open in the steady window | {a['sockets_open_steady']:,} of {p['nodes'] + p['sessions']:,} | all |",
         f"| whole run: registrations refused; sockets closed by the scheduler; error frames | "
         f"{a['registrations_failed']}; {a['closed_by_scheduler_whole_run']}; {a['error_frames_whole_run']} | 0 |"
         + (f"\n| first error frame | {a['first_error']} | |" if a["first_error"] else ""),
         f"| load generators' CPU (steady) | {', '.join(f'{k} {v:.2f}' for k, v in a['generator_cores'].items())} "
         "cores | |", "",
         _metrics(res) + ".", "", "What the scheduler logged during the run (warnings, errors, Redis calls retried, nodes registered "
         "again after being reaped): " + (", ".join(f"{k} x{v:,}" for k, v in res.get("scheduler_log", {}).items())
                                          or "nothing") + ".", ""]
    return "\n".join(L)


def _floor_us(res: dict[str, Any]) -> str:
    f = res.get("floor")
    return f"{f['us_per_frame']:.0f} µs ({f['frames_per_s']:.0f} frames/s, {f['cores']:.3f} cores)" if f else "-"


def _floor_line(res: dict[str, Any]) -> str:
    return f"  floor (a bare uvloop server reading as many frames/s, ignoring them): {_floor_us(res)} per frame"
