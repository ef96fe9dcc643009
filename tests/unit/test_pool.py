"""The warm pool's timing: what it builds, and when.

The isolates here are stand-ins that only count how they are used: what is
under test is the pool's own scheduling, not an isolate.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from stockade.errors import SandboxStartError
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


def _in_filler() -> bool:
    return threading.current_thread().name == "stockade-pool"


class WatchedCondition(threading.Condition):
    """The pool's condition, watched from its filler thread.

    ``before_filler_enters`` runs each time the filler comes for the lock (until
    it returns True), before it has it: a test acts there, at the one moment a
    caller's ``take`` could slip in. ``filler_idle`` is set once the filler waits
    for a request to fill after ``armed``: what it did until then is all it did.
    """

    def __init__(self) -> None:
        super().__init__()
        self.before_filler_enters: Callable[[], bool] | None = None
        self.armed = threading.Event()
        self.filler_idle = threading.Event()
        self._inside = False

    def __enter__(self) -> bool:
        hook = self.before_filler_enters
        if hook is not None and _in_filler() and not self._inside:
            self._inside = True  # the hook's own calls into the pool take the lock too
            try:
                if hook():
                    self.before_filler_enters = None
            finally:
                self._inside = False
        return super().__enter__()

    def wait(self, timeout: float | None = None) -> bool:
        if timeout is None and _in_filler() and self.armed.is_set():
            self.filler_idle.set()
        return super().wait(timeout)


def test_a_take_just_after_the_pool_filled_waits_for_kick() -> None:
    # The race behind the flaky test above, provoked every time: the filler has
    # made the pool full and comes back for the lock, and a caller's take gets
    # there first. The filler then sees the pool one short; it must wait for kick.
    pool, built = _pool(size=2)
    watched = WatchedCondition()
    pool._cond = watched
    taken: list[Stand | None] = []

    def take_once_full() -> bool:
        if len(pool.ready()) < 2:
            return False
        taken.append(pool.take(default_policy()))
        watched.armed.set()
        return True

    watched.before_filler_enters = take_once_full
    try:
        pool.start()
        assert watched.filler_idle.wait(10)
        assert len(built) == 2 and len(pool.ready()) == 1
        assert taken == [built[1]]
        pool.kick()
        assert pool.wait_full(10)
        assert len(built) == 3 and len(pool.ready()) == 2
    finally:
        pool.stop()


def test_a_take_while_the_filler_builds_leaves_the_next_build_until_kicked() -> None:
    # Taken while the pool is still being filled: the build under way finishes,
    # the next one waits for kick, as it would after a take from a full pool.
    built: list[Stand] = []
    watched = WatchedCondition()
    taken: list[Stand | None] = []

    def build(policy: Policy) -> Stand:
        if len(built) == 1:  # the second build: a caller takes the first isolate meanwhile
            taken.append(pool.take(default_policy()))
            watched.armed.set()
        built.append(Stand())
        return built[-1]

    pool: WarmPool[Any] = WarmPool(build, shape=lambda p: (), adopt=lambda s, p: None, size=2)
    pool._cond = watched
    try:
        pool.start()
        assert watched.filler_idle.wait(10)
        assert taken == [built[0]]
        assert len(built) == 2 and pool.ready() == [built[1]]
        pool.kick()
        assert pool.wait_full(10)
        assert len(built) == 3
    finally:
        pool.stop()


def test_an_isolate_refused_at_hand_over_is_closed_and_replaced() -> None:
    # adopt applies the caller's limits; one the host refuses ends the take with
    # the error, and the isolate goes instead of staying out of the pool, open.
    built: list[Stand] = []

    def build(policy: Policy) -> Stand:
        built.append(Stand())
        return built[-1]

    def adopt(sandbox: Stand, policy: Policy) -> None:
        if policy.pids_limit == 77:
            raise SandboxStartError("cannot apply pids_limit=77 to the isolate's cgroup")

    pool: WarmPool[Any] = WarmPool(build, shape=lambda p: (), adopt=adopt, size=1)
    try:
        pool.start()
        assert pool.wait_full(10)
        with pytest.raises(SandboxStartError, match="pids_limit=77"):
            pool.take(Policy(pids_limit=77))
        assert built[0].closed
        assert pool.wait_full(10)
        assert len(built) == 2 and pool.ready() == [built[1]]
    finally:
        pool.stop()
