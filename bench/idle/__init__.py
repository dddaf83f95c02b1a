"""Idle-connection scale: what one scheduler process pays to hold many quiet sockets.

    .venv/bin/python -m bench.idle            # full: 10,000 node sockets + 1,000 session sockets
    .venv/bin/python -m bench.idle --quick    # 1,000 + 100, about 40 s

One ``dragoman serve`` on its own Valkey; the sockets come from separate, lean load-generator
processes (``bench.idle.gen``: the raw ``websockets`` client, thousands of sockets per process),
shaped like the existing worker (``node_register``, then ``node_heartbeat`` every 15 s) and web
client (``session_init``, then ``client_heartbeat`` every 15 s). Reported (``bench.idle.runner``
says how): the scheduler's RSS before, with the sockets open and after they left, per socket; CPU
per heartbeat; idle CPU (every socket open, nothing sent); heartbeat reply times (p50/p99); the
Redis work per heartbeat; whether every node stayed alive. ``report`` turns it into text and a
section of docs/benchmarks.md.
"""
