"""The ``local`` placement: isolates on this host, from its RuntimeManager and warm pools.

Its isolates are the runtimes' own ``AgentSandbox``es: a warm one is handed
over in the loop turn that asks (``take_warm``), a cold one is started in a
thread of the placement's own (a microVM's boot blocks for seconds), and a
one-shot isolate is torn down on its runtime's reaper thread (``dispose``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, cast

from .config import LocalPlacementConfig

if TYPE_CHECKING:
    from ..policy import Policy
    from ..runtimes.manager import RuntimeManager
    from ..runtimes.sandbox import AgentSandbox
    from .base import Isolate

log = logging.getLogger("stockade.placement")

# How long the answer to ``runtimes`` is reused before the runtimes are checked again: a check
# starts a real isolate of each runtime (a VM boot for microVM).
RUNTIMES_FRESH_S = 60.0
DEFAULT_THREADS = 16


_shared: weakref.WeakKeyDictionary[RuntimeManager, LocalPlacement] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def shared_local(manager: RuntimeManager) -> LocalPlacement:
    """The local placement over ``manager`` that the SDK's sandboxes share (it leaves the
    manager to its owner: closing it is the manager's ``close``)."""
    with _shared_lock:
        placement = _shared.get(manager)
        if placement is None:
            placement = _shared[manager] = LocalPlacement(LocalPlacementConfig(), manager)
        return placement


class LocalPlacement:
    name = "local"
    remote = False

    def __init__(
        self, config: LocalPlacementConfig, manager: RuntimeManager | None = None, threads: int = DEFAULT_THREADS
    ) -> None:
        from ..runtimes.manager import RuntimeManager

        self.config = config
        self._own_manager = manager is None
        self.manager = manager or RuntimeManager(pool_size=config.pool_size)
        # Starts and closes block (a VM boots for seconds): at most ``threads`` at once, off the loop.
        self._threads = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="stockade-local")
        self._runtimes_lock = asyncio.Lock()
        self._runtimes_seen: tuple[float, list[dict[str, Any]]] | None = None  # when, what ``runtimes`` found

    async def _off_loop(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    async def connect(self) -> dict[str, Any]:
        """Start the default runtime now (its zygote, its pool, the sweep of what a previous
        daemon killed with SIGKILL left behind: its groups, and gVisor's and microVMs' directories
        whatever the default runtime); raises when it cannot start here."""
        from ..policy import default_policy
        from ..sdk import warm_up

        await self._off_loop(_sweep_dead_hosts_dirs)
        await self._off_loop(lambda: warm_up(manager=self.manager))
        self.manager.select(default_policy())  # unavailable here: said now
        return self.describe()

    async def check(self) -> dict[str, Any]:
        return self.describe()

    def describe(self) -> dict[str, Any]:
        return {"type": "local", "reachable": True, "runtimes": self.manager.started()}

    async def runtimes(self) -> list[dict[str, Any]]:
        """Every runtime and whether it works here, from a check at most RUNTIMES_FRESH_S old
        (callers that come during a check wait for that one)."""
        async with self._runtimes_lock:
            if self._runtimes_seen is None or time.monotonic() - self._runtimes_seen[0] > RUNTIMES_FRESH_S:
                found = [asdict(a) for a in await self._off_loop(self.manager.doctor)]
                log.info("checked the runtimes: %s", ", ".join(f"{a['name']}={a['available']}" for a in found))
                self._runtimes_seen = (time.monotonic(), found)
            return self._runtimes_seen[1]

    def pool_statistics(self) -> dict[str, dict[str, int]]:
        return self.manager.pool_statistics()

    def runtime_for(self, policy: Policy) -> str:
        return self.manager.select(policy).name

    def take_warm(self, policy: Policy) -> Isolate | None:
        return self.manager.select(policy).take_warm(policy)

    async def acquire(self, policy: Policy) -> Isolate:
        runtime = self.manager.select(policy)
        sandbox: Isolate | None = runtime.take_warm(policy)
        if sandbox is not None:
            return sandbox
        start = asyncio.get_running_loop().run_in_executor(self._threads, runtime.start, policy)
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            # Its caller went away (a client gone) while it started: closed once it has, not left behind.
            start.add_done_callback(self._close_unwanted)
            raise

    def _close_unwanted(self, start: asyncio.Future[AgentSandbox]) -> None:
        if not start.cancelled() and start.exception() is None:
            with contextlib.suppress(RuntimeError):  # the threads are shut down: manager.close ends it
                self._threads.submit(start.result().close)

    async def release(self, isolate: Isolate) -> None:
        sandbox = cast("AgentSandbox", isolate)
        if sandbox.closed:
            return
        await self._off_loop(sandbox.close)
        # The warm pool builds the isolate taken for this one once it is gone (pool.py): not
        # before, where the build would compete for the CPU with the calls it served.
        self.manager.get(sandbox.runtime_name).refill()

    def dispose(self, isolate: Isolate) -> None:
        sandbox = cast("AgentSandbox", isolate)
        self.manager.get(sandbox.runtime_name).dispose(sandbox)

    async def aclose(self) -> None:
        if self._own_manager:
            await self._off_loop(self.manager.close)
        self._threads.shutdown(wait=False, cancel_futures=True)


def _sweep_dead_hosts_dirs() -> None:
    """The gVisor bundles and microVM run directories of a daemon killed with SIGKILL: removed as
    this one starts, not at its first gVisor or microVM start, which may never come."""
    from ..runtimes.gvisor import BUNDLE_PREFIX
    from ..runtimes.hosted import sweep_dead_hosts_dirs
    from ..runtimes.microvm.runtime import RUN_PREFIX

    for prefix in (BUNDLE_PREFIX, RUN_PREFIX):
        sweep_dead_hosts_dirs(prefix)
