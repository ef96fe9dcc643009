"""The daemon's one-shot runs (``execute``): a slot, a warm isolate or one built now, the run, the
isolate's end; and what is told of a run that has no result (its caller gone, the agent's error).

A mixin of ``Controller`` (controller.py), as the held sandboxes are (held.py): it drives each
run on the event loop in callback form, so that a warm isolate's answer goes out in the loop
turn the agent gives it, with no task woken on the way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import NotFoundError, RunCancelledError
from ..placement import Isolate, Placement
from ..protocol.models import Caller, Cancelled, CancelRequest, ExecuteRequest
from ..result import ExecResult, TerminationReason, new_id
from ..runtimes.agent_requests import code_params, exec_params
from ..runtimes.verdict import OutputCallback
from ..runtimes.violations import Leftovers, ViolationReport
from .held import LEFTOVERS_WAIT_S
from .held_calls import MAX_ERROR_CHARS, settle_once
from .parts import ControllerCalls
from .slots import Slots

log = logging.getLogger("stockade.daemon")

# A one-shot isolate is killed as soon as its answer is written (nothing of it
# runs on), but its teardown (cgroups, then the pool's next isolate) waits this
# long: on a small host it otherwise competes for the CPU with the client that
# was just answered, which measured 0.2-0.4 ms slower to wake and read it.
TEARDOWN_DELAY_S = 0.005


@dataclass(slots=True)
class Running:
    execution_id: str
    runtime: str
    caller: Caller
    agent_id: str | None
    started: float = field(default_factory=time.monotonic)
    sandbox: Isolate | None = None  # None while its isolate is still being started
    cancelled: str | None = None  # why, once ``execute.cancel`` ended it


class OneShotRuns(ControllerCalls):
    """The one-shot runs of a ``Controller``, and its methods that start, end and tell them."""

    # What the controller provides (controller.py).
    placement: Placement
    slots: Slots
    working_runtimes: set[str]
    running: dict[str, Running]
    _teardowns: dict[Isolate, asyncio.TimerHandle]
    _recording: set[asyncio.Task[None]]
    _cold_starts: set[asyncio.Task[None]]

    def _dispose_after_answer(self, sandbox: Isolate) -> None:
        """Kill ``sandbox`` right after its answer is written; tear it down a little later.

        Both are callbacks on the loop, so both run after the answer being
        written in this loop turn (by the handler, or by the callback that read
        the agent's answer) has gone out.
        """
        loop = asyncio.get_running_loop()
        loop.call_soon(sandbox.kill)

        def teardown() -> None:
            self._teardowns.pop(sandbox, None)
            self.placement.dispose(sandbox)

        self._teardowns[sandbox] = loop.call_later(TEARDOWN_DELAY_S, teardown)

    def _teardown_now(self) -> None:
        """Hand every isolate still waiting for its teardown to the placement now (at shutdown)."""
        while self._teardowns:
            sandbox, timer = self._teardowns.popitem()
            timer.cancel()
            self.placement.dispose(sandbox)

    def execute_now(
        self, request: ExecuteRequest, caller: Caller, done: Callable[[ExecResult | Exception], None]
    ) -> Callable[[], None] | None:
        """``execute``, without waiting in line, when a slot is free right now.

        Returns None when none is (the caller awaits ``execute``, which queues).
        Otherwise the run has started and the function returned abandons it (for
        a caller that goes away first; ``done`` is then not called). With a warm
        isolate, ``done`` gets the result in the loop turn the agent answers, so
        the answer goes out with no task woken on the way; without one, a task
        builds an isolate and runs it, holding the slot taken here (the pool is
        asked once: a second ask would count a second miss).
        """
        request.check_sizes()
        runtime = self.runtime_for(request.policy)
        if not self.slots.take_now(caller.owner):
            return None  # the awaited path says why, or waits for a slot
        try:
            sandbox = self.placement.take_warm(request.policy)
        except BaseException:  # a limit the host refused at hand-over: the slot goes back
            self.slots.release(caller.owner)
            raise
        running = self._started(runtime, caller, request.agent_id, sandbox)
        if sandbox is not None:
            return self._launch(request, running, sandbox, done)

        async def cold() -> None:
            try:
                result = await self._run_in_slot(request, running, None)
            except asyncio.CancelledError:
                return  # abandoned: nobody to tell
            except Exception as exc:  # noqa: BLE001 - handed to the caller, as an awaited run would raise it
                done(exc)
                return
            done(result)

        task = asyncio.get_running_loop().create_task(cold())
        self._cold_starts.add(task)  # a task nobody awaits must be referenced until it ends

        def settled(task: asyncio.Task[None]) -> None:
            self._cold_starts.discard(task)
            # Cancelled before its first step, the task never ran the code that gives the slot back.
            if self.running.get(running.execution_id) is running and running.sandbox is None:
                self._ended(running.execution_id)

        task.add_done_callback(settled)

        def abandon() -> None:
            task.cancel()

        return abandon

    async def execute(
        self, request: ExecuteRequest, caller: Caller, on_output: OutputCallback | None = None
    ) -> ExecResult:
        """One ``execute``: a slot (waiting in the queue if need be), a warm isolate or a
        cold one, the run, the isolate's end."""
        request.check_sizes()
        runtime = self.runtime_for(request.policy)
        await self._take_slot(caller)
        try:
            # A warm isolate is handed over on the event loop itself; only building
            # one on demand waits (in a thread, or on another node).
            sandbox = self.placement.take_warm(request.policy)
        except BaseException:
            self.slots.release(caller.owner)
            raise
        running = self._started(runtime, caller, request.agent_id, sandbox)
        return await self._run_in_slot(request, running, on_output)

    async def _run_in_slot(
        self, request: ExecuteRequest, running: Running, on_output: OutputCallback | None
    ) -> ExecResult:
        """The run counted in as ``running`` (its slot taken), on its warm isolate or on one
        acquired now, to its result; whatever happens, its slot and isolate are given back."""
        sandbox = running.sandbox
        if sandbox is None:
            try:
                sandbox = running.sandbox = await self.placement.acquire(request.policy)
            except BaseException:
                self._ended(running.execution_id)
                raise
        if running.cancelled is not None:  # while its isolate was being started
            why = f"{running.cancelled} before it started"
            # Told to the listeners as any run ended by its caller is (the audit log had no record of it).
            self._record_unanswered(running, sandbox, request, "killed", why)
            self._ended(running.execution_id)
            raise RunCancelledError(why)
        outcome: asyncio.Future[ExecResult | Exception] = asyncio.get_running_loop().create_future()
        abandon = self._launch(request, running, sandbox, outcome.set_result, on_output)
        try:
            answer = await outcome
        except BaseException:  # the caller went away: the run ends with it
            abandon()
            raise
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _launch(
        self,
        request: ExecuteRequest,
        running: Running,
        sandbox: Isolate,
        done: Callable[[ExecResult | Exception], None],
        on_output: OutputCallback | None = None,
    ) -> Callable[[], None]:
        """Start ``request`` on ``sandbox`` (a one-shot isolate): the one path every
        ``execute`` takes. ``done`` gets the outcome in the loop turn the agent
        answers; the isolate is killed right after and torn down a little later.
        Returns what abandons the run."""
        sandbox.one_shot = True
        self.working_runtimes.add(sandbox.runtime_name)
        execution_id = running.execution_id

        answered = reporting = False

        def bookkeeping() -> None:
            if reporting:  # disposed of once its report is taken (_record_unanswered)
                asyncio.get_running_loop().call_soon(sandbox.kill)
            else:
                self._dispose_after_answer(sandbox)
            self._ended(execution_id)

        def deliver(outcome: ExecResult | Exception) -> None:
            nonlocal answered, reporting
            answered = True
            if isinstance(outcome, ExecResult):
                self._observe(running.caller, running.agent_id, outcome)
            else:  # no result (the agent's error, no such program): the run is told all the same
                reporting = True
                said = f"{type(outcome).__name__}: {outcome}"[:MAX_ERROR_CHARS]
                self._record_unanswered(running, sandbox, request, "error", said)
            done(outcome)

        finish = settle_once(deliver, bookkeeping)
        if request.command is not None:
            method, params = "exec", exec_params(request.command)
        else:
            method, params = "run_code", code_params(request.code or "", request.language)
        try:
            call = sandbox.start_run(method, params, request.stdin_bytes(), None, None, on_output, finish, execution_id)
        except BaseException:
            finish(None)
            raise

        def abandon() -> None:
            nonlocal reporting
            call.abort()
            if not answered:
                # The code ran, and its caller is gone: no answer, but the run is still
                # told to the listeners (the audit log, metrics), as ended by that.
                reporting = True
                why = "its caller went away before the answer; the run was ended"
                self._record_unanswered(running, sandbox, request, "killed", why)
            finish(None)

        return abandon

    def _record_unanswered(
        self, running: Running, sandbox: Isolate, request: ExecuteRequest, reason: TerminationReason, error: str
    ) -> None:
        """Tell the listeners of a one-shot run that has no result (given up by its caller, or
        answered with an error), with what its isolate's report holds: the calls it was refused
        and its egress, which no result carries (a caller that hung up at once would otherwise
        hide every escape attempt its code made). The isolate is disposed of once it is taken."""

        async def record() -> None:
            try:
                leftovers: Leftovers | None = await asyncio.wait_for(sandbox.atake_report(), LEFTOVERS_WAIT_S)
            except Exception as exc:  # noqa: BLE001 - said in the log; the run is recorded all the same
                log.info("execution %s: its isolate's report could not be taken: %s", running.execution_id, exc)
                leftovers = None
            finally:
                self._dispose_after_answer(sandbox)
            self._observe(running.caller, running.agent_id, _unanswered(running, sandbox, request, reason, error,
                                                                        leftovers))  # fmt: skip

        task = asyncio.get_running_loop().create_task(record())
        self._recording.add(task)  # referenced until it ends; the shutdown waits for it
        task.add_done_callback(self._recording.discard)

    def _started(self, runtime: str, caller: Caller, agent_id: str | None, sandbox: Isolate | None = None) -> Running:
        """Count a running execute in, under an id drawn now: ``status`` shows it while the
        run is going and the ExecResult carries it, so a caller can match the two."""
        self._track(+1)
        running = Running(new_id(), runtime, caller, agent_id, sandbox=sandbox)
        self.running[running.execution_id] = running
        return running

    def cancel(self, request: CancelRequest, caller: Caller) -> Cancelled:
        """``execute.cancel``: end a running execute (its owner's, or any for an admin).

        A run under way ends at once (its isolate is killed) and is answered as
        ``killed``; one whose isolate is still starting is answered with a
        ``cancelled`` error instead, and its isolate is ended as soon as it exists.
        """
        execution_id = request.execution_id
        running = self.running.get(execution_id)
        if running is None or not caller.may_touch(running.caller.owner):  # another's is reported as missing
            raise NotFoundError(f"no running execution {execution_id!r}")
        if running.cancelled is None:
            running.cancelled = f"cancelled by {caller.owner} (execute.cancel)"
            log.info("execution %s of %s cancelled by %s", execution_id, running.caller.owner, caller.owner)
            if running.sandbox is not None:
                running.sandbox.cancel(running.cancelled)
        return Cancelled(execution_id=execution_id)

    def _ended(self, execution_id: str) -> None:
        self.slots.release(self.running.pop(execution_id).caller.owner)
        self._track(-1)


def _unanswered(
    running: Running,
    sandbox: Isolate,
    request: ExecuteRequest,
    reason: TerminationReason,
    error: str,
    leftovers: Leftovers | None,
) -> ExecResult:
    """What is known of a run that has no result: how it ended, and what its isolate's report
    holds (None: it could not be taken, which the error says)."""
    if leftovers is None:
        leftovers, error = Leftovers(ViolationReport()), f"{error} (its isolate's report could not be taken)"
    report = leftovers.report
    return ExecResult(
        execution_id=running.execution_id,
        success=False,
        termination_reason=reason,
        error=error,
        execution_time_seconds=round(time.monotonic() - running.started, 6),
        runtime_used=sandbox.runtime_name,
        policy_digest=request.policy.digest,
        security_violations=report.records,
        violation_counts=report.counts,
        violations_dropped=report.dropped,
        egress_requests=leftovers.egress,
        egress_requests_dropped=leftovers.egress_dropped,
    )
