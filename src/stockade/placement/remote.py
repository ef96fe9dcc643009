"""``RemoteRuns``: the ``Isolate`` surface of an isolate driven through coroutines (on another node).

An isolate of a remote placement answers ``aexec``/``arun_code`` as awaitable
calls (a Ray actor's stream, for one). The daemon's controller drives every
isolate in callback form (``start_run`` on the event loop), ends one with
``cancel``/``kill`` and waits with ``settled``; this mixin gives those over a
task that awaits the call. What such an isolate does not offer (a background
process unless the isolate starts them, as a Ray node's does; a published port)
is refused with an error that names its placement and node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from ..errors import InvalidRequestError
from ..result import ExecResult

if TYPE_CHECKING:
    from ..policy import Policy
    from ..runtimes.publish import AsyncTurn
    from ..runtimes.spawned import Process
    from ..runtimes.verdict import OutputCallback
    from .base import Isolate


class RemoteCall:
    """A run started by ``RemoteRuns.start_run``: ``abort`` stops waiting for it, unanswered
    (the task awaiting it is cancelled, which ends the run on its node)."""

    def __init__(self, task: asyncio.Task[ExecResult]) -> None:
        self._task = task
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self._task.cancel()


class RemoteRuns:
    """Mixed into a remote isolate that has the ``Isolate``'s async calls and ``_release()``."""

    # What the isolate provides.
    placement_name: str
    node: str
    runtime_name: str
    policy: Policy

    if TYPE_CHECKING:

        async def _release(self) -> None: ...

    one_shot = False
    _cancelled: str | None = None
    _task: asyncio.Task[ExecResult] | None = None
    _ending: asyncio.Task[None] | None = None

    offers = "exec, run_code (sessions included), file reads, writes and listings"  # what _refuse names

    def _refuse(self, what: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"{what} is not offered by an isolate of the {self.placement_name} placement (node {self.node}): "
            f"it takes {self.offers}"
        )

    def start_run(
        self,
        method: str,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None,
        done: Callable[[ExecResult | Exception], None],
        execution_id: str | None = None,
    ) -> RemoteCall:
        """As ``AgentSandbox.start_run``: ``done`` is called once, after this returns, unless aborted."""
        if self._cancelled is not None:
            raise InvalidRequestError(f"this sandbox was ended: {self._cancelled}")
        if self._task is not None and not self._task.done():
            raise InvalidRequestError("another call is running in this sandbox")
        coroutine = self._remote_run(method, params, stdin, env, timeout, on_output)
        started = time.monotonic()
        task = self._task = asyncio.get_running_loop().create_task(coroutine)
        call = RemoteCall(task)

        def settled(task: asyncio.Task[ExecResult]) -> None:
            if call.aborted:
                return
            if not task.cancelled() and (error := task.exception()) is not None:
                done(error if isinstance(error, Exception) else RuntimeError(str(error)))
                return
            result = self._killed(started) if task.cancelled() else task.result()
            done(result if execution_id is None else dataclasses.replace(result, execution_id=execution_id))

        task.add_done_callback(settled)
        return call

    async def arun_request(
        self,
        method: str,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        outcome: asyncio.Future[ExecResult | Exception] = asyncio.get_running_loop().create_future()
        call = self.start_run(method, params, stdin, env, timeout, on_output, outcome.set_result)
        try:
            answer = await outcome
        except asyncio.CancelledError:  # its caller went away: stop waiting for the run
            call.abort()
            raise
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def _remote_run(
        self,
        method: str,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None,
    ) -> ExecResult:
        isolate = cast("Isolate", self)  # the class this is mixed into has the Isolate's calls
        if method == "exec":
            return await isolate.aexec(
                params["argv"], stdin=stdin, env=env, cwd=params.get("cwd"), timeout=timeout, on_output=on_output
            )
        if method == "run_code":
            return await isolate.arun_code(
                params["code"], params.get("language", "python"), stdin=stdin, env=env, timeout=timeout,
                on_output=on_output,
            )  # fmt: skip
        if method == "run_cell":  # a cell of a stateful interpreter, kept by the agent on the node
            return await isolate.arun_code(
                params["code"], env=env, timeout=timeout, on_output=on_output, session=params["session"]
            )
        raise self._refuse(method)

    def _killed(self, started: float) -> ExecResult:
        return ExecResult(
            success=False,
            termination_reason="killed",
            error=self._cancelled or "the run was ended",
            execution_time_seconds=round(time.monotonic() - started, 6),
            runtime_used=self.runtime_name,
            policy_digest=self.policy.digest,
        )

    def cancel(self, why: str) -> None:
        if self._cancelled is None:
            self._cancelled = why
        if self._task is not None:
            self._task.cancel()
        self.kill()

    async def settled(self) -> None:
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task])

    async def ainterrupt(self, session: str | None = None) -> bool:
        return False  # unless the isolate says otherwise: no interrupt short of its end (cancel)

    def kill(self) -> None:
        """Release the isolate on its node, in the background (idempotent; on the event loop)."""
        if self._ending is None:
            self._ending = asyncio.get_running_loop().create_task(self._release())

    async def aclose(self) -> None:
        self.kill()
        assert self._ending is not None
        await asyncio.shield(self._ending)

    def spawn(
        self, argv: list[str], *, stdin: bytes | str = b"", env: dict[str, str] | None = None, cwd: str | None = None
    ) -> Process:
        raise self._refuse("a background process")

    def processes(self) -> list[dict[str, Any]]:
        raise self._refuse("a background process")

    def publish(self, spec: int | str, *, turn: AsyncTurn | None = None) -> tuple[str, int]:
        raise self._refuse("a published port")
