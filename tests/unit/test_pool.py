"""The warm pool's timing: what it builds, and when.

The isolates here are stand-ins that only count how they are used: what is
under test is the pool's own scheduling, not an isolate.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from stockade.policy import Policy, default_policy
from stockade.runtimes.base import IsolateUsage
from stockade.runtimes.pool import WarmPool


class Stand:
    """Just what the pool touches of an isolate."""

    def __init__(self) -> None:
        self.baseline: IsolateUsage | None = None
        self.cold_start_ms = 0.0
        self.closed = False

    def usage(self, peak: bool = True) -> IsolateUsage:
        return IsolateUsage()

    def close(self) -> None:
        self.closed = True


def _pool(size: int) -> tuple[WarmPool[Any], list[Stand]]:
    built: list[Stand] = []
    lock = threading.Lock()

    def build(policy: Policy) -> Stand:
        with lock:
            built.append(Stand())
            return built[-1]

    pool: WarmPool[Any] = WarmPool(build, shape=lambda p: (), adopt=lambda s, p: None, size=size)
    return pool, built


def test_taking_an_isolate_leaves_the_refill_until_kicked() -> None:
    # A refill started at hand-over would compete for the CPU (and the GIL) with
    # the run the isolate was taken for; it must wait for ``kick``, which the
    # runtime calls once the used isolate has been torn down.
    pool, built = _pool(size=2)
    try:
        pool.start()
        assert pool.wait_full(10)
        assert len(built) == 2
        taken = pool.take(default_policy())
        assert taken is built[-1]
        time.sleep(0.3)  # ample time for a refill that should not happen
        assert len(built) == 2 and len(pool.ready()) == 1
        pool.kick()
        assert pool.wait_full(10)
        assert len(built) == 3 and len(pool.ready()) == 2
    finally:
        pool.stop()
    assert all(sb.closed for sb in built if sb is not taken)


def test_the_first_take_starts_the_filler_without_blocking() -> None:
    pool, built = _pool(size=1)
    try:
        assert pool.take(default_policy()) is None  # nothing built yet: the caller builds its own
        pool.kick()
        assert pool.wait_full(10) and len(built) == 1
    finally:
        pool.stop()
