"""A token bucket for per-connection rate limits. Pure: the caller passes the time."""

from __future__ import annotations


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; it starts full."""

    def __init__(self, rate: float, burst: float, now_ms: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate} and {burst}")
        self.rate, self.burst = rate, burst
        self.tokens, self.at_ms = burst, now_ms

    def allow(self, now_ms: int) -> bool:
        """Take a token if one is there."""
        self.tokens = min(self.burst, self.tokens + max(0, now_ms - self.at_ms) * self.rate / 1000)
        self.at_ms = now_ms
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
