"""Isolates of a remote placement (``placement/remote.py``) end as this host's do under the daemon:
a cancelled run is answered ``killed`` and its isolate released, a held sandbox closed during a
call ends it, a run whose caller goes away is let go, and what they do not offer is refused by
name. Driven without Ray: a placement whose isolates are this host's fake-runtime sandboxes,
reached only through coroutines, as a Ray node's are."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.errors import InvalidRequestError
from stockade.placement.base import Isolate
from stockade.placement.config import LocalPlacementConfig
from stockade.placement.local import LocalPlacement
from stockade.placement.remote import RemoteRuns
from stockade.policy import Policy
from stockade.protocol.models import (
    CancelRequest,
    ExecuteRequest,
    InterruptRequest,
    SandboxCreate,
    SandboxExec,
    SandboxRef,
    SandboxSpawn,
    unix_caller,
)
from stockade.result import ExecResult
from stockade.runtimes.sandbox import AgentSandbox

FAKE = {"policy": {"runtime": "fake", "timeout_seconds": 60}}


class Far(RemoteRuns):
    """A sandbox of this host reached only through coroutines, as a remote node's isolate is."""

    placement_name = "far"

    def __init__(self, placement: Remote, sandbox: AgentSandbox) -> None:
        self._placement = placement
        self._sandbox = sandbox
        self.node = "far-node"
        self.runtime_name = sandbox.runtime_name
        self.scratch_dir = sandbox.scratch_dir
        self.policy = sandbox.policy
        self.released = False

    async def aexec(self, argv: list[str], **kwargs: Any) -> ExecResult:
        return await self._sandbox.aexec(argv, **kwargs)

    async def arun_code(self, code: str, language: str = "python", **kwargs: Any) -> ExecResult:
        return await self._sandbox.arun_code(code, language, **kwargs)

    async def aclose_interpreter(self, session: str) -> bool:
        return await self._sandbox.aclose_interpreter(session)

    async def awrite_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self._sandbox.awrite_file(path, data, mode)

    async def aread_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return await self._sandbox.aread_file(path, max_bytes)

    async def alist_dir(self, path: str) -> list[dict[str, Any]]:
        return await self._sandbox.alist_dir(path)

    async def _release(self) -> None:
        await self._placement.release(self)


class Remote(LocalPlacement):
    """A remote placement of this host's fake runtime, counting what it hands out and takes back."""

    name = "far"
    remote = True

    def __init__(self) -> None:
        # Its own manager, closed with it by the controller's shutdown: no isolate outlives the test.
        super().__init__(LocalPlacementConfig(pool_size=0))
        self.acquired = 0
        self.released = 0

    def take_warm(self, policy: Policy) -> Isolate | None:
        return None

    async def acquire(self, policy: Policy) -> Isolate:
        sandbox = await super().acquire(policy)
        assert isinstance(sandbox, AgentSandbox)
        self.acquired += 1
        return Far(self, sandbox)

    async def release(self, isolate: Isolate) -> None:
        assert isinstance(isolate, Far)
        if not isolate.released:
            isolate.released = True
            self.released += 1
            await super().release(isolate._sandbox)

    def dispose(self, isolate: Isolate) -> None:
        isolate.kill()


async def _until(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


def _controller(placement: Remote) -> Controller:
    return Controller(DaemonConfig(max_sandboxes=2, pool_size=0, allow_unisolated=True), placement=placement)


def test_a_cancelled_remote_run_is_answered_killed_and_its_isolate_released() -> None:
    placement = Remote()

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


def test_a_held_remote_sandbox_closed_during_a_call_ends_it_and_a_gone_caller_is_let_go() -> None:
    placement = Remote()

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


def test_what_a_remote_isolate_does_not_offer_is_refused_by_name() -> None:
    placement = Remote()

    async def scenario() -> None:
        controller = _controller(placement)
        try:
            caller = unix_caller(0)
            created = await controller.create(SandboxCreate(**FAKE), caller)
            ref = {"sandbox_id": created.sandbox_id}
            with pytest.raises(
                InvalidRequestError, match="a background process is not offered by an isolate of the far"
            ):
                await controller.spawn(SandboxSpawn(command=["sleep", "1"], **ref), caller)
            assert (await controller.interrupt(InterruptRequest(**ref), caller)).interrupted is False
            result = await controller.execute(ExecuteRequest(command=["echo", "one-shot"], **FAKE), caller)
            assert (result.stdout, result.runtime_used) == ("one-shot\n", "fake")
            await controller.close_sandbox(SandboxRef(**ref), caller)
            await _until(lambda: placement.released == placement.acquired == 2, "an isolate was not released")
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())
