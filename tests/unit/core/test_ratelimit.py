import pytest

from dragoman.core.ratelimit import TokenBucket


def test_burst_then_refill_at_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=3, now_ms=0)
    assert [bucket.allow(0) for _ in range(4)] == [True, True, True, False]
    assert bucket.allow(99) is False  # 0.99 of a token
    assert bucket.allow(100) is True
    assert [bucket.allow(10_000) for _ in range(4)] == [True, True, True, False]  # never above burst


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now_ms=0)
