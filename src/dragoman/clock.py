"""The two clocks the I/O shells read (the pure cores take the time as an argument; scripts use
Redis's own TIME, I7): monotonic for timers and rates, wall for timestamps sent to peers."""

from __future__ import annotations

import time


def monotonic_ms() -> int:
    return int(time.monotonic() * 1000)


def wall_ms() -> int:
    return int(time.time() * 1000)


def wall_offset_ms() -> int:
    """wall - monotonic now: add it to a monotonic time to get a wall time."""
    return wall_ms() - monotonic_ms()
