"""The controller gives back what a run or a sandbox held when its caller goes away early."""

from __future__ import annotations

import asyncio
import threading
import time

from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.policy import Policy
from stockade.protocol.models import ExecuteRequest, SandboxCreate, unix_caller
from stockade.runtimes.fake import FakeRuntime, FakeSandbox
from stockade.runtimes.manager import RuntimeManager


class SlowRuntime(FakeRuntime):
    """The fake runtime, each start taking a while: a caller can go away meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.started: list[FakeSandbox] = []
        self.lock = threading.Lock()

    def start(self, policy: Policy) -> FakeSandbox:
        time.sleep(0.3)
        sandbox = super().start(policy)
        with self.lock:
            self.started.append(sandbox)
        return sandbox


class OneRuntime(RuntimeManager):
    def __init__(self, runtime: SlowRuntime) -> None:
        super().__init__(pool_size=0)
        self.runtime = runtime

    def select(self, policy: Policy) -> SlowRuntime:
        return self.runtime


def test_a_create_whose_caller_goes_away_closes_the_sandbox_it_started() -> None:
    runtime = SlowRuntime()

    async def scenario() -> None:
        config = DaemonConfig(max_sandboxes=2, pool_size=0, allow_unisolated=True)  # the fake runtime
        controller = Controller(config, manager=OneRuntime(runtime))
        try:
            task = asyncio.create_task(controller.create(SandboxCreate(), unix_caller(0)))
            await asyncio.sleep(0.05)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert controller.slots.free == 2 and controller.held == {}
            deadline = time.monotonic() + 10
            while not (runtime.started and all(sb.closed for sb in runtime.started)):
                assert time.monotonic() < deadline, "the started sandbox was never closed"
                await asyncio.sleep(0.05)
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())


def test_a_cold_run_abandoned_before_it_began_gives_its_slot_back() -> None:
    runtime = SlowRuntime()

    async def scenario() -> None:
        config = DaemonConfig(max_sandboxes=1, pool_size=0, allow_unisolated=True)  # the fake runtime
        controller = Controller(config, manager=OneRuntime(runtime))
        try:
            answers: list[object] = []
            abandon = controller.execute_now(ExecuteRequest(command=["true"]), unix_caller(0), answers.append)
            assert abandon is not None and controller.slots.free == 0
            abandon()  # before its task's first step
            await asyncio.sleep(0.05)
            assert controller.running == {} and controller.slots.free == 1 and answers == []
            assert await controller.wait_idle(1.0)
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())
