"""The daemon's placed isolates (daemon/placed.py) end as its own do: a cancelled run is answered
``killed`` and its isolate released, a held sandbox closed during a call ends it, a run whose
caller goes away is let go. Driven through a ``local`` placement of the fake runtime, no Ray."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.placement.base import Isolate
from stockade.placement.config import LocalPlacementConfig
from stockade.placement.local import LocalPlacement
from stockade.policy import Policy
from stockade.protocol.models import CancelRequest, ExecuteRequest, SandboxCreate, SandboxExec, SandboxRef, unix_caller
from stockade.runtimes.manager import RuntimeManager

FAKE = {"policy": {"runtime": "fake", "timeout_seconds": 60}}


class Counting(LocalPlacement):
    """A local placement that counts what it hands out and takes back."""

    def __init__(self) -> None:
        super().__init__(LocalPlacementConfig(), manager=RuntimeManager(pool_size=0))
        self.acquired = 0
        self.released = 0

    async def acquire(self, policy: Policy) -> Isolate:
        self.acquired += 1
        return await super().acquire(policy)

    async def release(self, isolate: Isolate) -> None:
        self.released += 1
        await super().release(isolate)


async def _until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def _controller(placement: Counting) -> Controller:
    controller = Controller(DaemonConfig(max_sandboxes=2, pool_size=0))
    controller.placement = placement  # as `stockade serve --placement ray` sets it, with this host's isolates
    return controller


def test_a_cancelled_placed_run_is_answered_killed_and_its_isolate_released() -> None:
    placement = Counting()

    async def scenario() -> None:
        controller = _controller(placement)
        try:
            caller = unix_caller(0)
            run = asyncio.create_task(controller.execute(ExecuteRequest(command=["sleep", "30"], **FAKE), caller))
            await _until(lambda: any(r.sandbox is not None for r in controller.running.values()), "no run started")
            await asyncio.sleep(0.3)  # the command is running on its isolate
            (execution_id,) = controller.running
            controller.cancel(CancelRequest(execution_id=execution_id), caller)
            result = await asyncio.wait_for(run, 20)
            assert result.termination_reason == "killed" and "execute.cancel" in (result.error or "")
            assert result.execution_id == execution_id
            await _until(lambda: placement.released == placement.acquired == 1, "the isolate was not released")
            assert controller.slots.free == 2 and controller.running == {}
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())


def test_a_held_placed_sandbox_closed_during_a_call_ends_it_and_a_gone_caller_is_let_go() -> None:
    placement = Counting()

    async def scenario() -> None:
        controller = _controller(placement)
        try:
            caller = unix_caller(0)
            created = await controller.create(SandboxCreate(**FAKE), caller)
            ref = {"sandbox_id": created.sandbox_id}
            ok = await controller.sandbox_run(SandboxExec(command=["echo", "held"], **ref), caller)
            assert ok.stdout == "held\n"
            # A caller that goes away: its await is cancelled; the sandbox takes the next call.
            gone = asyncio.create_task(controller.sandbox_run(SandboxExec(command=["sleep", "0.5"], **ref), caller))
            await asyncio.sleep(0.2)
            gone.cancel()
            await asyncio.gather(gone, return_exceptions=True)
            await asyncio.sleep(0.6)
            assert (await controller.sandbox_run(SandboxExec(command=["true"], **ref), caller)).success
            # Closed while a call runs: the call is answered killed, the isolate released.
            call = asyncio.create_task(controller.sandbox_run(SandboxExec(command=["sleep", "30"], **ref), caller))
            await asyncio.sleep(0.3)
            await asyncio.wait_for(controller.close_sandbox(SandboxRef(**ref), caller), 20)
            result = await asyncio.wait_for(call, 20)
            assert result.termination_reason == "killed" and "sandbox.close" in (result.error or "")
            await _until(lambda: placement.released == placement.acquired == 1, "the isolate was not released")
            assert controller.held == {} and controller.slots.free == 2
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())
