"""Shared by runtimes: a warm pool of pre-built isolates, and a background reaper.

The pool refills only after a used isolate has been torn down, so building
the next one never competes for the CPU with the run the last one served.
"""

from __future__ import annotations

import abc
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from ..policy import Policy, default_policy
from .base import Runtime
from .reaper import Reaper
from .sandbox import AgentSandbox

S = TypeVar("S", bound=AgentSandbox)


POOL_SHAPES_DEFAULT = 4
MISSES_TO_KEEP = 2  # a shape asked for this many times without being served joins the pool
MISSES_REMEMBERED = 64
BUILD_FAILURES_TO_DROP = 3


def pool_shapes_setting(default: int = POOL_SHAPES_DEFAULT) -> int:
    """``STOCKADE_POOL_SHAPES``: how many policy shapes the pool keeps isolates of (>= 1)."""
    from ..settings import current

    configured = current().pool_shapes
    return configured if configured is not None else default


@dataclass
class _Shape(Generic[S]):
    policy: Policy  # the first policy of this shape seen: what its isolates are built from
    ready: list[S] = field(default_factory=list)
    failures: int = 0


class WarmPool(Generic[S]):
    """Pre-built isolates of the policy shapes in use, refilled by a background thread.

    ``shape`` says which parts of a policy are fixed when an isolate is built
    (network, shared paths, scratch size, ...); the rest is applied at hand-over
    by ``adopt``. The default policy's shape is always kept. Another shape joins
    once it has been asked for twice without being served (so one-off shapes
    cost nothing), up to ``max_shapes``; the least recently served goes first.
    A shape whose isolates fail to build three times in a row is dropped.
    ``build(policy)`` makes one isolate of that policy's shape; ``size`` is per shape.
    The filler builds only when asked (``start``, ``kick``, a shape joining) and
    stops at a ``take``: the runtime kicks it once the isolate taken is torn down.
    """

    def __init__(
        self,
        build: Callable[[Policy], S],
        shape: Callable[[Policy], tuple[Any, ...]],
        adopt: Callable[[S, Policy], None],
        size: int,
        max_shapes: int | None = None,
    ) -> None:
        self._build = build
        self._shape = shape
        self._adopt = adopt
        self.size = size
        self.max_shapes = max_shapes if max_shapes is not None else pool_shapes_setting()
        default = default_policy()
        self.default_shape = shape(default)
        self._shapes: OrderedDict[tuple[Any, ...], _Shape[S]] = OrderedDict({self.default_shape: _Shape(default)})
        self._misses: OrderedDict[tuple[Any, ...], int] = OrderedDict()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        # Whether the filler may build: set by a request to fill (start, kick, a new
        # shape), cleared under the lock by a take and by the build that fills the
        # pool. A take therefore never finds the filler free to refill at once:
        # not even one that has yet to look again after filling the pool.
        self._wanted = False
        self.last_error: str | None = None
        self.served = 0  # takes answered with a warm isolate
        self.missed = 0  # takes that found none (the caller built one cold)

    def start(self) -> None:
        """Start the filler if needed, and have it top the pool up now."""
        with self._cond:
            self._start_filler()
            self._want_fill()

    def _start_filler(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._fill, name="stockade-pool", daemon=True)
            self._thread.start()

    def take(self, policy: Policy) -> S | None:
        key = self._shape(policy)
        evicted: list[S] = []
        with self._cond:
            # Started, but not woken: a refill now would compete for the CPU (and the
            # GIL) with the run this isolate is taken for. ``kick`` refills after it.
            self._start_filler()
            entry = self._shapes.get(key)
            if entry is None:
                evicted = self._note_miss(key, policy)
                sandbox = None
            else:
                self._shapes.move_to_end(key)
                sandbox = entry.ready.pop() if entry.ready else None
                if sandbox is not None:
                    self._wanted = False  # the next build waits for ``kick``
            if sandbox is None:
                self.missed += 1
            else:
                self.served += 1
        for old in evicted:
            old.close()
        if sandbox is None:
            return None
        started = time.monotonic()
        try:
            self._adopt(sandbox, policy)
        except BaseException:
            # A limit the host refused: the isolate goes, and nothing ran in it.
            sandbox.close()
            self.kick()
            raise
        sandbox.cold_start_ms = (time.monotonic() - started) * 1000
        return sandbox

    def _note_miss(self, key: tuple[Any, ...], policy: Policy) -> list[S]:
        """Count a miss; keep the shape once it has missed enough. Returns isolates to close."""
        misses = self._misses.pop(key, 0) + 1
        if misses < MISSES_TO_KEEP:
            self._misses[key] = misses
            while len(self._misses) > MISSES_REMEMBERED:
                self._misses.popitem(last=False)
            return []
        if self.max_shapes < 2:
            return []  # only the default shape is kept
        self._shapes[key] = _Shape(policy)
        evicted: list[S] = []
        while len(self._shapes) > self.max_shapes:
            victim = next(k for k in self._shapes if k not in (self.default_shape, key))
            evicted += self._shapes.pop(victim).ready
        self._want_fill()
        return evicted

    def shapes(self) -> list[tuple[Any, ...]]:
        with self._cond:
            return list(self._shapes)

    def statistics(self) -> dict[str, int]:
        """Isolates ready now (all shapes), shapes kept, and takes served warm or missed so far."""
        with self._cond:
            warm = sum(len(entry.ready) for entry in self._shapes.values())
            return {"warm": warm, "shapes": len(self._shapes), "served": self.served, "missed": self.missed}

    def ready(self, policy: Policy | None = None) -> list[S]:
        """The isolates ready for ``policy``'s shape (the default's when None)."""
        key = self._shape(policy) if policy is not None else self.default_shape
        with self._cond:
            entry = self._shapes.get(key)
            return list(entry.ready) if entry is not None else []

    def kick(self) -> None:
        """Have the filler top the pool up (the runtime calls it once a used isolate is torn down)."""
        with self._cond:
            self._want_fill()

    def _want_fill(self) -> None:
        # Called with the lock held. A pool already full is left as it is: a take
        # that follows must not find a request to fill still standing.
        if self._next_to_fill() is not None:
            self._wanted = True
        self._cond.notify_all()

    def wait_full(self, timeout: float) -> bool:
        """Wait until every kept shape has ``size`` isolates ready."""
        self.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._next_to_fill() is not None and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return self._next_to_fill() is None

    def _next_to_fill(self) -> tuple[tuple[Any, ...], Policy] | None:
        for key in reversed(self._shapes):  # the most recently served first
            entry = self._shapes[key]
            if len(entry.ready) < self.size:
                return key, entry.policy
        return None

    def _wanted_target(self) -> tuple[tuple[Any, ...], Policy] | None:
        """What the filler should build next, if it may build (called with the lock held)."""
        if not self._wanted:
            return None
        target = self._next_to_fill()
        if target is None:
            self._wanted = False
        return target

    def _fill(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._stopped and (target := self._wanted_target()) is None:
                    self._cond.wait()
                if self._stopped or target is None:
                    return
            key, policy = target
            try:
                sandbox = self._build(policy)
                sandbox.baseline = sandbox.usage(peak=False)
            except Exception as exc:  # noqa: BLE001 - keep the pool alive; callers fall back to cold starts
                self.last_error = str(exc)
                with self._cond:
                    entry = self._shapes.get(key)
                    if entry is not None and key != self.default_shape:
                        entry.failures += 1
                        if entry.failures >= BUILD_FAILURES_TO_DROP:
                            del self._shapes[key]  # e.g. a shared path that went away
                    self._cond.wait(backoff)  # a stop() ends the wait early
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            with self._cond:
                entry = None if self._stopped else self._shapes.get(key)
                if entry is not None:
                    entry.failures = 0
                    entry.ready.append(sandbox)
                    self._cond.notify_all()
                if self._next_to_fill() is None:
                    self._wanted = False  # full: whatever is taken from now on waits for ``kick``
                stopped = self._stopped
            if entry is None:
                sandbox.close()  # stopped, or its shape was evicted meanwhile
            if stopped:
                return

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            ready = [sb for entry in self._shapes.values() for sb in entry.ready]
            for entry in self._shapes.values():
                entry.ready = []
            self._cond.notify_all()
        for sandbox in ready:
            sandbox.close()
        if self._thread is not None:
            self._thread.join(5)


class PooledRuntime(Runtime, Generic[S]):
    """A runtime with a warm pool and a reaper: hand-over, disposal and waiting, shared.

    Subclasses set ``self._pool`` (or None) and ``self._reaper`` and implement ``start``.
    """

    _pool: WarmPool[S] | None
    _reaper: Reaper

    @abc.abstractmethod
    def start(self, policy: Policy) -> S: ...

    def take_warm(self, policy: Policy) -> S | None:
        """A pre-built isolate for ``policy`` from the pool, or None; never blocks on a build."""
        return self._pool.take(policy) if self._pool is not None else None

    def pool_statistics(self) -> dict[str, int] | None:
        """The warm pool's ``statistics()``; None for a runtime started without one."""
        return self._pool.statistics() if self._pool is not None else None

    def refill(self) -> None:
        if self._pool is not None:
            self._pool.kick()

    def dispose(self, sandbox: AgentSandbox) -> None:
        """Close a one-shot isolate off the caller's critical path, then refill the pool."""
        self._reaper.put(sandbox, after=self.refill)

    def warm_up(self) -> None:
        """Fill the pool now, instead of on first use."""
        if self._pool is not None:
            self._pool.start()

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until the warm pool is full; True if it is."""
        return self._pool.wait_full(timeout) if self._pool is not None else True

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every disposed isolate has been torn down."""
        self._reaper.join(timeout)

    def stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.stop()
        self._reaper.join(10.0)
