"""The daemon's isolates on a placement other than this host (``stockade serve --placement ray``).

The controller drives isolates through the surface of a local ``AgentSandbox``
(``start_run`` with callbacks on the loop, awaited file calls, ``cancel``,
``kill``, and ``close`` from its thread pool). ``PlacedRuntime`` and ``PlacedSandbox``
give a ``Placement``'s async ``Isolate`` that surface, so one-shot runs and held
sandboxes, by the Unix socket or by HTTP, take the same paths, slots, audit and
metrics in cluster mode as on one host. What an isolate of a placement does not
offer (an interrupt short of ending it, a background process, a published
port) is refused with an error that names the placement.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError
from ..result import ExecResult
from ..runtimes.loop_call import settle_outcome

if TYPE_CHECKING:
    from ..placement.base import Isolate, Placement
    from ..policy import Policy
    from ..runtimes.verdict import OutputCallback

log = logging.getLogger("stockade.daemon")


class PlacedCall:
    """A run started by ``PlacedSandbox.start_run``: ``abort`` stops waiting for it, unanswered."""

    def __init__(self, task: asyncio.Task[ExecResult]) -> None:
        self._task = task
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        self._task.cancel()


class PlacedSandbox:
    """One isolate of a placement, as the controller and its held sandboxes drive one."""

    def __init__(self, placement: Placement, isolate: Isolate, policy: Policy, loop: asyncio.AbstractEventLoop) -> None:
        self._placement = placement
        self.isolate = isolate
        self.policy = policy
        self._loop = loop
        self.runtime_name = isolate.runtime
        self.node = isolate.node
        self.one_shot = False
        self._cancelled: str | None = None
        self._task: asyncio.Task[ExecResult] | None = None
        self._release: asyncio.Task[None] | None = None

    def _refuse(self, what: str) -> InvalidRequestError:
        return InvalidRequestError(
            f"{what} is not offered by the daemon's {self._placement.name} placement (node {self.node}): "
            "a placed sandbox takes exec, run_code (sessions included), file reads and writes and listings"
        )

    # -- runs, on the event loop ---------------------------------------------------------------

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
    ) -> PlacedCall:
        """As ``AgentSandbox.start_run``: ``done`` is called once, after this returns, unless aborted."""
        if self._cancelled is not None:
            raise InvalidRequestError(f"this sandbox was ended: {self._cancelled}")
        if self._task is not None and not self._task.done():
            raise InvalidRequestError("another call is running in this sandbox")
        coroutine = self._run(method, params, stdin, env, timeout, on_output)
        started = time.monotonic()
        task = self._task = self._loop.create_task(coroutine)
        call = PlacedCall(task)

        def settled(task: asyncio.Task[ExecResult]) -> None:
            if call.aborted:
                return
            if task.cancelled():
                killed = self._killed(started)
                done(killed if execution_id is None else killed.model_copy(update={"execution_id": execution_id}))
                return
            error = task.exception()
            if error is not None:
                done(error if isinstance(error, Exception) else RuntimeError(str(error)))
                return
            result = task.result()
            done(result if execution_id is None else result.model_copy(update={"execution_id": execution_id}))

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
        outcome: asyncio.Future[ExecResult] = self._loop.create_future()
        call = self.start_run(
            method, params, stdin, env, timeout, on_output, functools.partial(settle_outcome, outcome)
        )
        try:
            return await outcome
        except asyncio.CancelledError:  # its caller went away: stop waiting for the run
            call.abort()
            raise

    async def _run(
        self,
        method: str,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None,
    ) -> ExecResult:
        if method == "exec":
            return await self.isolate.exec(
                params["argv"], stdin=stdin, env=env, cwd=params.get("cwd"), timeout=timeout, on_output=on_output
            )
        if method == "run_code":
            return await self.isolate.run_code(
                params["code"], params.get("language", "python"), stdin=stdin, env=env, timeout=timeout,
                on_output=on_output,
            )  # fmt: skip
        if method == "run_cell":  # a cell of a stateful interpreter, kept by the agent on the node
            return await self.isolate.run_code(
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
        """End the isolate for its caller: a run in progress is answered ``killed``, ``why`` its error."""
        if self._cancelled is None:
            self._cancelled = why
        if self._task is not None:
            self._task.cancel()
        self.kill()

    async def settled(self) -> None:
        """Return once no run is in flight (a run given up is cancelled on its node)."""
        if self._task is not None and not self._task.done():
            await asyncio.wait([self._task])

    def interrupt(self) -> bool:
        return False  # an isolate of a placement has no interrupt short of its end (cancel)

    def kill(self) -> None:
        """End the isolate now (released on its node). Idempotent; called on the event loop."""
        if self._release is None:
            self._release = self._loop.create_task(self._released())

    async def _released(self) -> None:
        try:
            await self._placement.release(self.isolate)
        except Exception:
            log.exception("releasing isolate on node %s failed", self.node)

    # -- file and session calls, awaited on the loop ------------------------------------------

    async def awrite_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self.isolate.write_file(path, data, mode)

    async def aread_file(self, path: str, max_bytes: int | None = None) -> bytes:
        return await self.isolate.read_file(path, max_bytes)

    async def alist_dir(self, path: str) -> list[dict[str, Any]]:
        return await self.isolate.list_dir(path)

    async def aclose_interpreter(self, session: str) -> bool:
        return await self.isolate.close_interpreter(session)

    def spawn(self, *args: Any, **kwargs: Any) -> Any:
        raise self._refuse("a background process")

    def close(self) -> None:
        """Release the isolate and wait for it (idempotent)."""

        async def closed() -> None:
            self.kill()
            assert self._release is not None
            await asyncio.shield(self._release)

        asyncio.run_coroutine_threadsafe(closed(), self._loop).result()  # from the controller's thread pool


class PlacedRuntime:
    """What the controller asks for an isolate: a placement's ``acquire``, from its thread pool."""

    def __init__(self, placement: Placement, loop: asyncio.AbstractEventLoop) -> None:
        self.placement = placement
        self.name = placement.name
        self._loop = loop

    def take_warm(self, policy: Policy) -> None:
        return None  # a placement's warm pools are its nodes': a claim is always awaited

    def start(self, policy: Policy) -> PlacedSandbox:
        isolate = asyncio.run_coroutine_threadsafe(self.placement.acquire(policy), self._loop).result()
        return PlacedSandbox(self.placement, isolate, policy, self._loop)

    def dispose(self, sandbox: Any) -> None:  # the controller's one-shot teardown, for its isolates
        assert isinstance(sandbox, PlacedSandbox)
        sandbox.kill()


async def connect(placement: Placement) -> dict[str, Any]:
    """Reach the placement at the daemon's start (a cluster starts its node actors): what it found.

    An unreachable cluster is reported, not raised: the daemon still starts,
    says so in its log and in ``/health``, and tries again on the next request.
    """
    try:
        return await placement.connect()
    except Exception as exc:  # noqa: BLE001 - told, and told again by describe()
        log.warning("placement %s: %s", placement.name, exc)
    return placement.describe()
