"""The embedded server: a real Valkey that never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from dragoman.embedded import _ping

STARTER = """
import sys, time
from dragoman.embedded import EmbeddedServer
s = EmbeddedServer().start()
print(s.port, flush=True)
time.sleep(600)
"""


def test_server_dies_with_a_killed_parent() -> None:
    parent = subprocess.Popen([sys.executable, "-c", STARTER], stdout=subprocess.PIPE, text=True)
    port = int(parent.stdout.readline())
    assert _ping(port)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 10
    while _ping(port) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _ping(port), "the embedded server outlived its parent"


def test_start_and_stop(redis_server) -> None:
    assert _ping(redis_server.port)
