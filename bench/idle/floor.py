"""The floor under the CPU per heartbeat, measured in the same run: a bare uvloop server whose
protocol ignores what it reads, holding as many sockets, each sent one ~200-byte masked text frame
per heartbeat period (spread evenly, from one client process). What one frame costs it is what
reading a frame costs on this machine (the event loop's wake-up, the system calls, one Python call)
before any WebSocket, JSON or Redis work.

    python -m bench.idle.floor SOCKETS PERIOD_S WINDOW_S    # prints the JSON result
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import uvloop

from bench.e2e.procs import proc_times, raise_nofile

FRAME = b"\x81\xfe\x00\xc8" + b"mask" + bytes(200)  # (a masked text frame, 200 bytes of payload)


class _Ignore(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


async def _serve(sock: socket.socket) -> None:
    server = await asyncio.get_running_loop().create_server(_Ignore, sock=sock)
    async with server:
        await server.serve_forever()


async def _send(port: int, sockets: int, period_s: float) -> None:
    loop = asyncio.get_running_loop()
    links = [(await loop.create_connection(asyncio.Protocol, "127.0.0.1", port))[0] for _ in range(sockets)]
    print("connected", flush=True)
    gap, start, i = period_s / sockets, loop.time(), 0
    while True:  # (the generator's own pacing: a frame every period / sockets seconds)
        due = start + i * gap
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        links[i % sockets].write(FRAME)
        i += 1




def measure(sockets: int, period_s: float, window_s: float) -> dict[str, Any]:
    """The bare server's CPU over ``window_s`` while ``sockets`` sockets each send a frame every
    ``period_s``: cores and µs per frame."""
    raise_nofile()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    me = [sys.executable, "-m", "bench.idle.floor"]
    server = subprocess.Popen([*me, "serve"], pass_fds=[sock.fileno()], env=dict(os.environ, FLOOR_FD=str(sock.fileno())))
    sock.close()
    client = subprocess.Popen([*me, "send", str(port), str(sockets), str(period_s)], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        if client.stdout.readline().strip() != "connected":
            raise RuntimeError("the floor's client did not connect")
        time.sleep(min(period_s, 5.0))  # (every socket has sent once: the pacing is steady)
        c0, t0 = sum(proc_times(server.pid)), time.monotonic()
        time.sleep(window_s)
        c1, t1 = sum(proc_times(server.pid)), time.monotonic()
    finally:
        client.kill()
        server.kill()
        client.wait()
        server.wait()
    frames = sockets / period_s * (t1 - t0)
    return {"sockets": sockets, "frames_per_s": frames / (t1 - t0), "cores": (c1 - c0) / (t1 - t0),
            "us_per_frame": (c1 - c0) / frames * 1e6, "window_s": round(t1 - t0, 1)}


def main(argv: list[str]) -> None:
    raise_nofile()
    if argv[0] == "serve":
        fd = int(os.environ["FLOOR_FD"])
        uvloop.run(_serve(socket.socket(fileno=fd)))
    elif argv[0] == "send":
        uvloop.run(_send(int(argv[1]), int(argv[2]), float(argv[3])))
    else:
        print(json.dumps(measure(int(argv[0]), float(argv[1]), float(argv[2]))))


if __name__ == "__main__":
    main(sys.argv[1:])
