"""``RayIsolate``: one isolate on a Ray node, held for its caller by that node's ``StockadeNode`` actor.

Its runs stream back as a Ray streaming generator (output, then the result);
its files go through the object store, bounded by the placement's
``max_file_bytes``. A node that goes away ends its runs with
``termination_reason="lost"`` naming the node, and its later calls raise
``SandboxLostError``. The controller's callback form comes from ``remote.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ..errors import CallTooLargeError, SandboxError, SandboxLostError
from ..limits import argv_list, check_call_size, stdin_bytes
from ..result import ExecResult, validate
from ..runtimes.spawned import Process, listed_processes
from ..runtimes.violations import Leftovers
from .ray_node import OUTPUT, RESULT
from .remote import RemoteRuns

if TYPE_CHECKING:
    from ..policy import Policy
    from ..runtimes.verdict import OutputCallback
    from .ray import RayPlacement
    from .ray_reservations import Reservation

log = logging.getLogger("stockade.placement")
_CALL_WAIT_S = 60.0  # what a blocking call to a node waits beyond the agent's own timeout


def _cause(exc: Exception) -> Exception:
    """The node's own exception (a stockade error, an OSError) rather than Ray's wrapper of it,
    whose text is the remote traceback with the node's pids, addresses and paths."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, Exception):
        return exc.cause
    return exc


def lost_node(exc: BaseException) -> bool:
    """Whether ``exc`` is Ray saying the node (or the actor on it) is gone, or cannot be reached
    (``ActorUnavailableError``: it may yet answer). Not a fetch that was only slow."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.ObjectFetchTimedOutError):
        return False
    return isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.NodeDiedError | ray.exceptions.ObjectLostError)


def actor_died(exc: BaseException) -> bool:
    """Whether ``exc`` is Ray saying the actor is dead for good (no restarts: killed, out of
    memory, crashed), whether or not its node lives on."""
    import ray.exceptions

    return isinstance(exc, ray.exceptions.ActorDiedError)


class RayIsolate(RemoteRuns):
    """An isolate on a Ray node, held by that node's ``StockadeNode`` actor."""

    placement_name = "ray"
    offers = "exec, run_code (sessions included), file reads, writes and listings, and background processes"

    def __init__(
        self,
        placement: RayPlacement,
        node: NodeHandle,
        info: dict[str, Any],
        policy: Policy,
        reservation: Reservation,
    ) -> None:
        self._placement = placement
        self._node = node
        self.reservation = reservation  # its room on the node, booked in Ray
        self.id: str = info["id"]
        self.runtime_name: str = info["runtime"]
        self.scratch_dir: str = info["scratch_dir"]
        self.node: str = node.node_id
        self.policy = policy
        self.lost: str | None = None
        self.closed = False
        self._runs = 0  # runs in flight (one, but a given-up one may still be ending)

    def _check(self) -> None:
        if self.lost is not None:
            raise SandboxLostError(self.lost)
        if self.closed:
            raise SandboxLostError(f"isolate {self.id} was released")

    def _mark_lost(self, exc: BaseException) -> str:
        first = self.lost is None
        self.lost = (
            f"the Ray node {self._node.node_id} ({self._node.address}) that held isolate {self.id} was lost "
            f"({type(exc).__name__})"
        )
        self._node.suspect = True
        self._node.dead = self._node.dead or actor_died(exc)
        if first:
            self._placement.lost(self)
        return self.lost

    async def _run(self, kind: str, call: dict[str, Any], on_output: OutputCallback | None) -> ExecResult:
        """A run on the node: streamed when its caller takes the output as it comes, else one call
        and one reply (a stream costs the node a report to the caller per item)."""
        self._check()
        started = time.monotonic()
        pending: Coroutine[Any, Any, ExecResult | None]
        if on_output is None:
            pending = self._replied(self._node.actor.result_of.remote(self.id, kind, call))
        else:
            stream = self._node.actor.run.options(num_returns="streaming").remote(self.id, kind, call)
            pending = self._streamed(stream, on_output)
        self._runs += 1
        try:
            result = await pending
        except Exception as exc:  # noqa: BLE001 - a lost node is a result; anything else, the node's own error
            if not lost_node(exc):
                raise _cause(exc) from None
            return self._lost_result(exc, started)
        finally:
            self._runs -= 1
        if result is None:
            raise SandboxLostError(self._mark_lost(RuntimeError("the node's stream ended without a result")))
        return result

    @staticmethod
    async def _streamed(stream: Any, on_output: OutputCallback) -> ExecResult | None:
        """The output passed on as it comes, then the result (None: the stream ended without one)."""
        async for ref in stream:
            item = await ref
            if item[0] == OUTPUT:
                on_output(item[1], item[2])
            elif item[0] == RESULT:
                return validate(ExecResult, item[1], json_text=True)
        return None

    @staticmethod
    async def _replied(ref: Any) -> ExecResult:
        """The one reply. A caller that goes away cancels the call: a run not yet begun on its node
        is dropped; one under way is left to end there, as a stream's is."""
        import ray

        try:
            return validate(ExecResult, await ref, json_text=True)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # a node gone meanwhile: nothing left to cancel
                ray.cancel(ref)
            raise

    def _lost_result(self, exc: BaseException, started: float) -> ExecResult:
        return ExecResult(
            success=False,
            termination_reason="lost",
            error=self._mark_lost(exc),
            execution_time_seconds=time.monotonic() - started,
            runtime_used=self.runtime_name,
            policy_digest=self.policy.digest,
        )

    async def aexec(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        call = {"argv": argv_list(argv), "stdin": stdin, "env": env, "cwd": cwd, "timeout": timeout}
        return await self._run("exec", call, on_output)

    async def arun_code(
        self,
        code: str,
        language: str = "python",
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        session: str | None = None,
    ) -> ExecResult:
        call = {"code": code, "language": language, "stdin": stdin, "env": env, "timeout": timeout, "session": session}
        return await self._run("run_code", call, on_output)

    async def aclose_interpreter(self, session: str) -> bool:
        return bool(await self._call("close_interpreter", session))

    async def ainterrupt(self, session: str | None = None) -> bool:
        """SIGINT to the run in flight on its node (the node actor takes calls beside the run's
        stream); False when none is, or the node is gone."""
        if not self._runs or self.lost is not None or self.closed:
            return False
        try:
            return bool(await self._call("interrupt", session))
        except SandboxLostError:
            return False

    async def atake_report(self) -> Leftovers:
        """What the isolate did since its last run's report, as its node took it."""
        taken = await self._call("take_report")
        if not isinstance(taken, Leftovers):
            raise SandboxError(f"node {self._node.node_id} answered take_report with {type(taken).__name__}")
        return taken

    async def _call(self, method: str, *args: Any) -> Any:
        self._check()
        try:
            return await getattr(self._node.actor, method).remote(self.id, *args)
        except Exception as exc:  # noqa: BLE001 - re-raised: as lost, or as the node's own error
            if lost_node(exc):
                raise SandboxLostError(self._mark_lost(exc)) from None
            raise _cause(exc) from None

    def spawn(
        self, argv: list[str], *, stdin: bytes | str = b"", env: dict[str, str] | None = None, cwd: str | None = None
    ) -> Process:
        """A background process on the isolate's node (blocking: from a thread, as on one host).
        Its calls (``Process.read``, ``wait``, ...) are this isolate's ``proc_call``."""
        raw = bytes(stdin_bytes(stdin))
        check_call_size("stdin", raw)
        said = self._wait_for("spawn", argv_list(argv), raw, env, cwd, wait=_CALL_WAIT_S)
        return Process(self, str(said["handle"]), int(said["pid"]), list(argv))

    def processes(self) -> list[dict[str, Any]]:
        """Its background processes, as the node's agent lists them (blocking: from a thread)."""
        return listed_processes(self)

    def proc_call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """A background process's call, answered by the node's agent (blocking: from a thread)."""
        return dict(self._wait_for("proc_call", method, params, timeout, wait=timeout + _CALL_WAIT_S))

    def _wait_for(self, method: str, *args: Any, wait: float) -> Any:
        """A node actor's call, waited for on this thread (never the event loop's: Ray's own wait)."""
        import ray
        import ray.exceptions

        self._check()
        ref = getattr(self._node.actor, method).remote(self.id, *args)
        try:
            return ray.get(ref, timeout=wait)
        except ray.exceptions.GetTimeoutError:
            with contextlib.suppress(Exception):  # a spawn answered late would start what nobody knows of
                ray.cancel(ref)
            raise SandboxError(
                f"{method}: node {self._node.node_id} did not answer within {wait:g} s for isolate {self.id}"
            ) from None
        except Exception as exc:  # noqa: BLE001 - re-raised: as lost, or as the node's own error
            if lost_node(exc):
                raise SandboxLostError(self._mark_lost(exc)) from None
            raise _cause(exc) from None

    async def awrite_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        raw = data.encode() if isinstance(data, str) else bytes(data)
        limit = self._placement.config.max_file_bytes
        if len(raw) > limit:
            raise CallTooLargeError(f"write_file: {len(raw)} bytes, more than the placement's max_file_bytes {limit}")
        await self._call("write_file", path, raw, mode)  # large bytes travel through the object store

    async def aread_file(self, path: str, max_bytes: int | None = None) -> bytes:
        limit = self._placement.config.max_file_bytes
        if max_bytes is not None and max_bytes <= limit:
            return bytes(await self._call("read_file", path, max_bytes))
        data = bytes(await self._call("read_file", path, limit + 1))  # one byte more says "larger"
        if len(data) > limit:
            raise CallTooLargeError(
                f"read_file: {path} is larger than the placement's max_file_bytes {limit}: read it with max_bytes"
            )
        return data

    async def alist_dir(self, path: str) -> list[dict[str, Any]]:
        return list(await self._call("list_dir", path))

    def kill(self) -> None:
        super().kill()
        assert self._ending is not None
        self._placement.track(self._ending)  # aclose waits for it

    async def _release(self) -> None:
        try:
            await self._placement.release(self)
        except Exception:
            log.exception("releasing isolate %s on node %s failed", self.id, self.node)


class NodeHandle:
    """A node of the cluster as the placement knows it: its id, address and ``StockadeNode`` actor."""

    def __init__(self, node_id: str, address: str, actor: Any) -> None:
        self.node_id = node_id
        self.address = address
        self.actor = actor
        self.suspect = False
        # Its actor died for good: the placement's next look at the cluster starts another on the node
        # if the node lives (a node actor killed by the kernel's OOM killer must not take the node away).
        self.dead = False
