"""The sliding-window limiter: exact at its bound, and it forgets keys that went quiet."""

from __future__ import annotations

from stockade.ratelimit import SlidingWindowLimiter


def test_the_limit_is_exact_per_key_and_says_how_long_to_wait() -> None:
    limiter = SlidingWindowLimiter(2, window_s=1.0)
    assert limiter.allow("a", now=10.0) and limiter.allow("a", now=10.5)
    assert not limiter.allow("a", now=10.9)
    assert abs(limiter.wait_s("a", now=10.9) - 0.1) < 1e-9
    assert limiter.allow("b", now=10.9)  # another key has its own window
    assert limiter.allow("a", now=11.0)  # the first event left the window


def test_keys_that_went_quiet_are_forgotten() -> None:
    # An HTTP client can name a new agent_id per request: the limiter must not keep them all.
    limiter = SlidingWindowLimiter(5, window_s=1.0)
    for i in range(10_000):
        limiter.allow(f"agent-{i}", now=100.0 + i * 0.001)
    assert len(limiter) > 900
    limiter.allow("late", now=200.0)
    assert len(limiter) == 1
