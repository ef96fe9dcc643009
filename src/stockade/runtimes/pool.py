"""Shared by runtimes: a warm pool of pre-built isolates, and a background reaper.

The pool refills only after a used isolate has been torn down, so building
the next one never competes for the CPU with the run the last one served.
"""

from __future__ import annotations

import abc
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from ..policy import Policy, default_policy
from .base import AgentSandbox, Runtime

S = TypeVar("S", bound=AgentSandbox)


class Reaper:
    """Tears one-shot isolates down in the background, so results return at once.

    ``defer`` runs other housekeeping on the same thread, in order.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[AgentSandbox | None, Callable[[], None] | None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, sandbox: AgentSandbox, after: Callable[[], None] | None = None) -> None:
        sandbox.kill()  # nothing of it runs on, even before the teardown completes
        self._enqueue(sandbox, after)

    def defer(self, work: Callable[[], None]) -> None:
        self._enqueue(None, work)

    def _enqueue(self, sandbox: AgentSandbox | None, after: Callable[[], None] | None) -> None:
        self._queue.put((sandbox, after))
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="stockade-reaper", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            sandbox, after = self._queue.get()
            try:
                if sandbox is not None:
                    sandbox.close()
                if after is not None:
                    after()
            except Exception:  # noqa: BLE001, S110 - teardown is best effort per isolate; next one goes on
                pass
            finally:
                self._queue.task_done()

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.002)


class WarmPool(Generic[S]):
    """Pre-built isolates of the default policy's shape, refilled by a background thread.

    ``build`` makes one warm isolate of the default policy; ``shape`` says which
    parts of a policy are fixed when an isolate is built (the rest is applied at
    hand-over by ``adopt``), so only policies of the default shape are served.
    """

    def __init__(
        self,
        build: Callable[[], S],
        shape: Callable[[Policy], tuple[Any, ...]],
        adopt: Callable[[S, Policy], None],
        size: int,
    ) -> None:
        self._build = build
        self._shape = shape
        self._adopt = adopt
        self.size = size
        self.shape = shape(default_policy())
        self._ready: list[S] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.last_error: str | None = None

    def start(self) -> None:
        with self._cond:
            if self._thread is None and not self._stopped:
                self._thread = threading.Thread(target=self._fill, name="stockade-pool", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def take(self, policy: Policy) -> S | None:
        if self._shape(policy) != self.shape:
            return None
        self.start()
        with self._cond:
            # No refill here: building an isolate now would compete for the CPU
            # with the run this one is taken for. ``kick`` refills after it.
            sandbox = self._ready.pop() if self._ready else None
        if sandbox is None:
            return None
        started = time.monotonic()
        self._adopt(sandbox, policy)
        sandbox.cold_start_ms = (time.monotonic() - started) * 1000
        return sandbox

    def kick(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def wait_full(self, timeout: float) -> bool:
        self.start()
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._ready) < self.size and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return len(self._ready) >= self.size

    def _fill(self) -> None:
        backoff = 0.5
        while True:
            with self._cond:
                while not self._stopped and len(self._ready) >= self.size:
                    self._cond.wait()
                if self._stopped:
                    return
            try:
                sandbox = self._build()
                sandbox.baseline = sandbox.usage(peak=False)
            except Exception as exc:  # noqa: BLE001 - keep the pool alive; callers fall back to cold starts
                self.last_error = str(exc)
                with self._cond:
                    self._cond.wait(backoff)  # a stop() ends the wait early
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            with self._cond:
                if self._stopped:
                    sandbox.close()
                    return
                self._ready.append(sandbox)
                self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            ready, self._ready = self._ready, []
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

    def acquire(self, policy: Policy) -> S:
        """A fresh isolate for a one-shot run: from the warm pool when its shape fits."""
        return self.take_warm(policy) or self.start(policy)

    def dispose(self, sandbox: AgentSandbox) -> None:
        """Close a one-shot isolate off the caller's critical path, then refill the pool."""
        self._reaper.put(sandbox, after=self._pool.kick if self._pool is not None else None)

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
