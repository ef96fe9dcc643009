"""RuntimeManager: knows every runtime, says why one is unavailable, picks one for a policy.

Selection never downgrades silently: a policy that names a runtime or an
isolation level gets exactly that, or a ``RuntimeUnavailableError`` saying
what is missing. The default is the ``process`` runtime; ``none`` (the fake
runtime) is only ever used when asked for by name or level.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import weakref
from typing import TYPE_CHECKING

from ..errors import RuntimeUnavailableError
from ..isolation import LEVELS, RUNTIME_NAMES, rank, trust_map
from ..policy import Policy
from ..settings import current
from .base import Availability, Runtime
from .sandbox import open_isolates

if TYPE_CHECKING:
    from .process.factory import IsolateFactory
    from .process.runtime import ProcessRuntime

LEVEL_TO_RUNTIME = {"none": "fake", "process": "process", "gvisor": "gvisor", "microvm": "microvm"}
DEFAULT_RUNTIME = "process"
ROOT_RUNTIMES = ("gvisor", "microvm")  # runsc and the microVM's jail start as root


class RuntimeManager:
    def __init__(self, pool_size: int | None = None) -> None:
        if pool_size is None:
            from ..settings import current

            pool_size = current().pool_size
        self.pool_size = pool_size
        self._runtimes: dict[str, Runtime] = {}
        self._availability: dict[str, Availability] = {}
        self._lock = threading.Lock()
        _open_managers.add(self)

    def get(self, name: str) -> Runtime:
        with self._lock:
            runtime = self._runtimes.get(name)
            if runtime is not None:
                return runtime
            if name == "process":
                from .process.runtime import ProcessRuntime

                runtime = ProcessRuntime(pool_size=self.pool_size)
            elif name == "fake":
                from .fake import FakeRuntime

                runtime = FakeRuntime()
            elif name == "gvisor":
                from .gvisor import GvisorRuntime

                runtime = GvisorRuntime(pool_size=self.pool_size)
            elif name == "microvm":
                from .microvm.runtime import MicrovmRuntime

                runtime = MicrovmRuntime(pool_size=self.pool_size)
            else:
                raise RuntimeUnavailableError(f"unknown runtime {name!r}; known: {', '.join(RUNTIME_NAMES)}")
            self._runtimes[name] = runtime
            return runtime

    def started(self) -> list[str]:
        """The runtimes this manager has started (asked for), by name."""
        with self._lock:
            return sorted(self._runtimes)

    def pool_statistics(self) -> dict[str, dict[str, int]]:
        """Each started runtime's warm pool, by runtime name (those with a pool)."""
        with self._lock:
            started = dict(self._runtimes)
        found = {}
        for name, runtime in started.items():
            stats = runtime.pool_statistics()
            if stats is not None:
                found[name] = stats
        return found

    def process(self) -> ProcessRuntime:
        """The process runtime, as itself (what only it does: a zygote handed over, root given up)."""
        from .process.runtime import ProcessRuntime

        runtime = self.get("process")
        assert isinstance(runtime, ProcessRuntime)
        return runtime

    def adopt(self, factory: IsolateFactory) -> None:
        """Have the process runtime build from a factory started early (``IsolateFactory.early``)."""
        self.process().adopt(factory)

    def availability(self, name: str) -> Availability:
        runtime = self.get(name)
        if name in ROOT_RUNTIMES and os.geteuid() != 0 and current().daemon_user:
            reason = ("needs root, which this daemon gave up (STOCKADE_DAEMON_USER; STOCKADE_DAEMON_USER=root keeps "
                      "it): only the process runtime runs here")  # fmt: skip
            return Availability(name, False, runtime.isolation, reason)
        try:
            return runtime.detect()
        except OSError as exc:  # detect() says why rather than raise; a host that refuses it a file still answers
            return Availability(name, False, runtime.isolation, f"{exc.strerror or exc}: {exc.filename or ''}".strip())

    def doctor(self) -> list[Availability]:
        return [self.availability(name) for name in RUNTIME_NAMES]

    def select(self, policy: Policy) -> Runtime:
        """The runtime for ``policy``: by name, by level, or by trust: the level its trust maps to, or
        the nearest stronger one available when that one is not (never a weaker one)."""
        minimum = trust_map()[policy.trust] if policy.trust else None
        if policy.runtime or policy.isolation:
            runtime = self.get(policy.runtime or LEVEL_TO_RUNTIME[policy.isolation or DEFAULT_RUNTIME])
            if runtime.name in ROOT_RUNTIMES and os.geteuid() != 0 and current().daemon_user:
                raise RuntimeUnavailableError(f"runtime {runtime.name} {self.availability(runtime.name).reason}")
            with self._lock:
                known = self._availability.get(runtime.name)
            if known is not None and not known.available:
                # Already found unusable here: say why instead of failing the same start again.
                raise RuntimeUnavailableError(f"runtime {runtime.name} is not available on this host: {known.reason}")
            if minimum is not None and rank(runtime.isolation) < rank(minimum):
                raise RuntimeUnavailableError(
                    f"runtime {runtime.name} ({runtime.isolation}) is weaker than trust {policy.trust!r} "
                    f"accepts (at least {minimum})"
                )
            return _check_egress(runtime, policy)
        if minimum is None:
            return _check_egress(self.get(DEFAULT_RUNTIME), policy)
        return self._first_available(policy, minimum, [level for level in LEVELS if rank(level) >= rank(minimum)])

    def strongest(self, policy: Policy) -> Runtime:
        """The strongest runtime that works here and serves ``policy``, at least its trust's level
        (MCP's ``execution_mode: "isolated"``)."""
        minimum = trust_map()[policy.trust] if policy.trust else "process"
        return self._first_available(policy, minimum, [lv for lv in reversed(LEVELS) if rank(lv) >= rank(minimum)])

    def _first_available(self, policy: Policy, minimum: str, levels: list[str]) -> Runtime:
        reasons = []
        for level in levels:
            if level == "none":
                continue
            if policy.network_policy == "allowlist" and not self.get(LEVEL_TO_RUNTIME[level]).egress_proxy:
                reasons.append(f"{level}: does not offer network_policy 'allowlist'")
                continue
            avail = self.cached_availability(LEVEL_TO_RUNTIME[level])
            if avail.available:
                return self.get(avail.name)
            reasons.append(f"{level}: {avail.reason}")
        raise RuntimeUnavailableError(
            f"trust {policy.trust!r} needs isolation {minimum} or stronger, and none is available here ("
            + "; ".join(reasons)
            + "). stockade never falls back to a weaker level."
        )

    def cached_availability(self, name: str) -> Availability:
        """``availability`` once per manager: detecting a runtime starts a real isolate."""
        with self._lock:
            cached = self._availability.get(name)
        if cached is None:
            cached = self.availability(name)
            with self._lock:
                self._availability[name] = cached
        return cached

    def close(self) -> None:
        with self._lock:
            runtimes, self._runtimes = list(self._runtimes.values()), {}
        for runtime in runtimes:
            runtime.close()


def _check_egress(runtime: Runtime, policy: Policy) -> Runtime:
    if policy.network_policy == "allowlist" and not runtime.egress_proxy:
        raise RuntimeUnavailableError(
            f"runtime {runtime.name} does not offer network_policy 'allowlist' (its egress proxy): the process "
            "runtime does"
        )
    return runtime


_default: RuntimeManager | None = None
_default_lock = threading.Lock()
# Every manager not yet closed (the default one included): closed when the interpreter exits.
_open_managers: weakref.WeakSet[RuntimeManager] = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    """What the process still holds when it exits ends with it: every sandbox still open, then
    every manager's runtimes (warm pools, spares, zygotes), so no isolate, group or bundle
    outlives it, and no pool's filler (a daemon thread) is left halfway through a build."""
    for sandbox in list(open_isolates):
        with contextlib.suppress(Exception):
            sandbox.close()
    for manager in list(_open_managers):
        with contextlib.suppress(Exception):
            manager.close()


def _forget_in_child() -> None:
    # A forked child owns none of its parent's sandboxes or managers: its exit must not end them.
    open_isolates.clear()
    _open_managers.clear()


os.register_at_fork(after_in_child=_forget_in_child)


def default_manager() -> RuntimeManager:
    global _default
    with _default_lock:
        if _default is None:
            _default = RuntimeManager()
        return _default
