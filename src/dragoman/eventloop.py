"""Which event loop the long-running commands (``serve``, ``node``) run on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T], event_loop: str = "uvloop") -> T:
    """Run ``main`` on uvloop (the default: its loop and socket transports cost a fraction of the
    standard library's per event) or, with ``"asyncio"`` (or where uvloop is missing), on asyncio's."""
    if event_loop == "uvloop":
        try:
            import uvloop
        except ImportError:  # not built for this platform
            return asyncio.run(main)
        return uvloop.run(main)
    return asyncio.run(main)
