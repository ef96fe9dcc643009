"""A run the daemon started is told to its listeners (the audit log, metrics, the dashboard) with
what its isolate's report holds, whatever became of its answer: a caller that hung up, an agent
that answered an error. Each hid the calls the host refused the code (its escape attempts)."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import time
from typing import Any

import pytest

from stockade.agent import wire
from stockade.daemon.config import DaemonConfig
from stockade.daemon.controller import Controller
from stockade.policy import Policy
from stockade.protocol.models import Caller, ExecuteRequest, SandboxCreate, SandboxExec, SandboxRef, unix_caller
from stockade.result import ExecResult, SecurityViolation
from stockade.runtimes.base import Availability, Runtime
from stockade.runtimes.manager import RuntimeManager
from stockade.runtimes.sandbox import AgentSandbox
from stockade.runtimes.violations import Leftovers


class Scripted(AgentSandbox):
    runtime_name = "scripted"

    def kill(self) -> None:
        pass

    def _release(self) -> None:
        pass


class ScriptedRuntime(Runtime):
    """An isolate whose agent, for each run, has the host count a refused ``unshare`` (as the
    process runtime's seccomp supervisor does, from its own thread), then answers as ``answer``
    says: ``"verdict"`` once ``release`` is set, ``"error"``, or ``"never"``."""

    name, isolation = "scripted", "none"

    def __init__(self, answer: str, output: bool = False) -> None:
        super().__init__()
        self.answer, self.output = answer, output  # output: each run writes a line before its answer
        self.release = threading.Event()  # a "verdict" waits for it: its caller goes first
        if answer != "verdict":
            self.release.set()

    def detect(self) -> Availability:
        return Availability(self.name, True, self.isolation, "test")

    def start(self, policy: Policy) -> Scripted:
        host, guest = socket.socketpair()
        sandbox = Scripted(policy, host, 1.0)

        def agent() -> None:
            with guest:
                while True:
                    try:
                        request = json.loads(wire.read_frame(guest))
                    except Exception:  # the host closed its end
                        return
                    reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
                    if request.get("method") not in ("exec", "run_code"):
                        guest.sendall(wire.encode_message({**reply, "result": {}}))
                        continue
                    refused = SecurityViolation(
                        violation_type="blocked_syscall", syscall="unshare", severity="CRITICAL"
                    )
                    sandbox._count_violation("unshare", True, lambda v=refused: v)
                    if self.answer == "never":
                        continue  # the code goes on until it is ended
                    if self.output:
                        line = {"stream": "stdout", "data": base64.b64encode(b"hi\n").decode()}
                        guest.sendall(wire.encode_message(wire.notification("output", line)))
                    self.release.wait(30)
                    if self.answer == "error":
                        reply["error"] = {"code": -32603, "message": "oops"}
                    else:
                        reply["result"] = {"exit_code": 0, "stdout": "", "stderr": ""}
                    guest.sendall(wire.encode_message(reply))

        threading.Thread(target=agent, daemon=True).start()
        return sandbox


class One(RuntimeManager):
    def __init__(self, runtime: Runtime) -> None:
        super().__init__(pool_size=0)
        self.runtime = runtime

    def select(self, policy: Policy) -> Runtime:
        return self.runtime

    def get(self, name: str) -> Runtime:
        return self.runtime


class Told:
    """A listener: each execution it is told of, and what each held sandbox's end reported."""

    def __init__(self) -> None:
        self.executions: list[ExecResult] = []
        self.leftovers: list[Leftovers | None] = []

    def execution(self, caller: Caller, agent_id: str | None, result: ExecResult, *args: Any) -> None:
        self.executions.append(result)

    def sandbox_event(self, *args: Any, **fields: Any) -> None:
        pass

    def sandbox_ended(self, *args: Any) -> None:
        self.leftovers.append(args[-1])


def _controller(runtime: Runtime) -> tuple[Controller, Told]:
    controller = Controller(DaemonConfig(max_sandboxes=2, pool_size=0), manager=One(runtime))
    told = Told()
    controller.listeners.append(told)  # type: ignore[arg-type]  # the calls it is told of, nothing more
    return controller, told


async def _counted(controller: Controller) -> None:
    """Until the run's isolate has had the host count its refused call."""
    deadline = time.monotonic() + 15
    while not any(r.sandbox is not None and r.sandbox.violation_log.names() for r in controller.running.values()):
        assert time.monotonic() < deadline, "the run's refused call was never counted"
        await asyncio.sleep(0.02)


async def _told(told: Told, n: int = 1) -> list[ExecResult]:
    deadline = time.monotonic() + 15
    while len(told.executions) < n:
        assert time.monotonic() < deadline, f"told of {len(told.executions)} executions, not {n}"
        await asyncio.sleep(0.02)
    return told.executions


def test_a_one_shot_run_answered_with_an_error_is_told_with_its_violations() -> None:
    # An agent the code took over answered an error instead of its verdict: the run was told nowhere.
    async def scenario() -> None:
        controller, told = _controller(ScriptedRuntime("error"))
        try:
            with pytest.raises(Exception, match="oops"):
                await controller.execute(ExecuteRequest(command=["true"]), unix_caller(0))
            (result,) = await _told(told)
            assert result.termination_reason == "error" and "oops" in (result.error or "")
            assert result.violation_counts == {"unshare": 1}
            assert [v.syscall for v in result.security_violations] == ["unshare"]
            assert await controller.wait_idle(5)
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())


@pytest.mark.parametrize("path", ["execute", "execute_now"])
def test_a_one_shot_run_whose_caller_hung_up_is_told_with_its_violations(path: str) -> None:
    # Told as "killed" with no violations: a client that hung up once its code had made its
    # escape attempts hid every one of them from the audit log and the escape-attempt metric.
    async def scenario() -> None:
        controller, told = _controller(ScriptedRuntime("never"))
        try:
            if path == "execute":
                task = asyncio.create_task(controller.execute(ExecuteRequest(command=["true"]), unix_caller(0)))
            else:
                answers: list[object] = []
                abandon = controller.execute_now(ExecuteRequest(command=["true"]), unix_caller(0), answers.append)
                assert abandon is not None
            await _counted(controller)  # the agent has had the run, and the host counted its refused call
            if path == "execute":
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            else:
                abandon()
            (result,) = await _told(told)
            assert result.termination_reason == "killed" and "went away" in (result.error or "")
            assert result.violation_counts == {"unshare": 1}, result
            assert await controller.wait_idle(5) and controller.slots.free == 2
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())


def test_a_held_sandboxs_run_whose_caller_hung_up_is_told_when_it_ends() -> None:
    # The run was left to finish in the isolate (a kept sandbox stays in step with its agent), and
    # its result dropped untold: the sandbox's end then said it had run nothing.
    async def scenario() -> None:
        runtime = ScriptedRuntime("verdict")
        controller, told = _controller(runtime)
        caller = unix_caller(0)
        try:
            created = await controller.create(SandboxCreate(), caller)
            held = controller.held[created.sandbox_id].sandbox
            run = SandboxExec(sandbox_id=created.sandbox_id, command=["true"])
            task = asyncio.create_task(controller.sandbox_run(run, caller))
            deadline = time.monotonic() + 15
            while not held.violation_log.names():  # type: ignore[attr-defined]  # an AgentSandbox here
                assert time.monotonic() < deadline, "the run never reached its agent"
                await asyncio.sleep(0.02)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert told.executions == []  # not yet: the run goes on
            runtime.release.set()
            (result,) = await _told(told)
            assert result.termination_reason == "completed" and result.violation_counts == {"unshare": 1}
            assert controller.held[created.sandbox_id].runs == 1
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())


def test_a_held_sandboxs_run_answered_with_an_error_is_told() -> None:
    async def scenario() -> None:
        controller, told = _controller(ScriptedRuntime("error"))
        caller = unix_caller(0)
        try:
            created = await controller.create(SandboxCreate(), caller)
            run = SandboxExec(sandbox_id=created.sandbox_id, command=["true"])
            with pytest.raises(Exception, match="oops"):
                await controller.sandbox_run(run, caller)
            (result,) = await _told(told)
            assert result.termination_reason == "error" and "oops" in (result.error or "")
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())


def test_the_refused_calls_of_runs_whose_output_callback_failed_are_in_the_sandboxs_report() -> None:
    # A run whose caller's output callback raised had its result, and so its refused calls, dropped;
    # kept instead as unclaimed, it was overwritten by the next run's before any report took it.
    def broken(stream: str, data: bytes) -> None:
        raise RuntimeError("the client went away")

    async def scenario() -> None:
        runtime = ScriptedRuntime("verdict", output=True)
        runtime.release.set()  # each run answers at once
        controller, told = _controller(runtime)
        caller = unix_caller(0)
        try:
            created = await controller.create(SandboxCreate(), caller)
            run = SandboxExec(sandbox_id=created.sandbox_id, command=["true"])
            for _ in range(2):
                with pytest.raises(RuntimeError, match="went away"):
                    await controller.sandbox_run(run, caller, broken)
            result = await controller.sandbox_run(run, caller)
            assert result.violation_counts == {"unshare": 1}
            await controller.close_sandbox(SandboxRef(sandbox_id=created.sandbox_id), caller)
            assert [r.termination_reason for r in told.executions] == ["error", "error", "completed"]
            (leftovers,) = told.leftovers
            assert leftovers is not None and leftovers.report.counts == {"unshare": 2}, leftovers
        finally:
            await controller.shutdown(0.0)

    asyncio.run(scenario())
