"""The awaited SDK: ``AsyncSandbox`` (a held sandbox on any placement) and ``arun``/``arun_code``.

The same calls as the blocking ``Sandbox`` and ``run``/``run_code`` (sdk.py), awaited on the
caller's event loop: a held sandbox's calls queue in one turn, with no thread of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .errors import SandboxClosedError
from .limits import argv_list, publish_specs
from .policy import Policy, policy_of
from .result import ExecResult
from .runtimes.manager import RuntimeManager, default_manager
from .runtimes.publish import parse_publish
from .runtimes.spawned import AsyncProcess, in_turn, spawned_or_killed
from .runtimes.verdict import OutputCallback
from .sdk import _RUN_CODE_KEYWORDS, _RUN_KEYWORDS, run, run_code

if TYPE_CHECKING:
    from .placement.base import Isolate, Placement
    from .transfer import TransferSummary
    from .transfer_unpack import Links
    from .watch import AsyncFileWatch

_ASYNC_SANDBOX_KEYWORDS = ("manager", "placement", "publish")


class AsyncSandbox:
    """A sandbox you hold, awaited: ``async with AsyncSandbox(policy) as sb: await sb.run_code(...)``.

    It holds one ``Isolate`` of a placement (placement/base.py): this host's by
    default (``manager``: the runtimes' own), or any other, a Ray cluster's for one
    (``placement=open_placement({"type": "ray", ...})``). Its calls are awaited on
    your event loop, with no thread; its start and close wait for the placement.
    """

    def __init__(
        self,
        policy: Policy | dict[str, Any] | None = None,
        *,
        manager: RuntimeManager | None = None,
        placement: Placement | None = None,
        publish: Sequence[int | str] = (),
        timeout: float | None = None,
        **policy_fields: Any,
    ) -> None:
        if manager is not None and placement is not None:
            raise ValueError("AsyncSandbox: give manager (this host's runtimes) or placement, not both")
        self.policy = policy_of("AsyncSandbox", policy, policy_fields, timeout, _ASYNC_SANDBOX_KEYWORDS)
        if placement is None:
            from .placement.local import shared_local  # here: the one-shot run()/run_code() need no placement

            placement = shared_local(manager or default_manager())
        self._placement = placement
        self._isolate: Isolate | None = None
        self._closed = False  # aclose() ran: no start again, and calls say so
        # One request at a time reaches the agent: calls gathered on one sandbox queue here.
        self._turn = asyncio.Lock()
        self._publish = publish_specs(publish)
        self.published: dict[int, tuple[str, int]] = {}  # as Sandbox.published

    async def start(self) -> AsyncSandbox:
        if self._closed:
            raise SandboxClosedError("the sandbox is closed")
        if self._isolate is None:
            self._isolate = await self._placement.acquire(self.policy)
            try:
                for spec in self._publish:
                    await self.publish(spec)
            except BaseException:
                await self.aclose()
                raise
        return self

    async def publish(self, spec: int | str) -> tuple[str, int]:
        """``Sandbox.publish``: a host loopback port forwarded to the isolate's (refused where the
        placement put it on another host). One relayed through the agent (gVisor, a microVM)
        takes its turns in this sandbox's queue, on this loop."""
        turn = (asyncio.get_running_loop(), self._turn)
        address = await asyncio.to_thread(self._held().publish, spec, turn=turn)
        self.published[parse_publish(spec)[2]] = address
        return address

    async def spawn(
        self, argv: list[str], *, stdin: bytes | str = b"", env: dict[str, str] | None = None, cwd: str | None = None
    ) -> AsyncProcess:
        """``Sandbox.spawn``, awaited: a process beside this sandbox's other calls, whose methods
        are awaited too (docs/processes-and-ports.md)."""
        held, turn = self._held(), self._turn
        spawning = in_turn(turn, functools.partial(held.spawn, argv, stdin=stdin, env=env, cwd=cwd))
        process = await spawned_or_killed(spawning, lambda p: in_turn(turn, p.kill, "SIGKILL"))
        return AsyncProcess(process, turn)

    async def processes(self) -> list[dict[str, Any]]:
        """``Sandbox.processes``, awaited."""
        return await in_turn(self._turn, self._held().processes)

    async def watch(self, path: str, *, recursive: bool = False, events: Iterable[str] | None = None) -> AsyncFileWatch:
        """``Sandbox.watch``, awaited: an ``AsyncFileWatch`` (``async for event in w``)."""
        from .watch import AsyncFileWatch

        return await AsyncFileWatch.start(lambda argv, source: self.spawn(argv, stdin=source), path, recursive, events)

    @property
    def runtime(self) -> str:
        """The runtime this sandbox was started on (``process``, ``gvisor``, ``microvm``)."""
        return self._held().runtime_name

    @property
    def node(self) -> str:
        """Where it runs: ``local``, or the placement's node (a Ray node's id)."""
        return self._held().node

    @property
    def scratch_dir(self) -> str:
        """A writable directory inside the sandbox (``/tmp`` in every isolating runtime)."""
        return self._held().scratch_dir

    @contextlib.asynccontextmanager
    async def _next_turn(self) -> AsyncIterator[Isolate]:
        """This sandbox's turn, once a call given up before it has ended: a caller that stopped
        waiting (``asyncio.wait_for`` timed out) leaves its run to finish in the isolate, and the
        next call queues behind it rather than being refused as "in progress"."""
        async with self._turn:
            isolate = self._held()
            await isolate.settled()
            yield isolate

    def _held(self) -> Isolate:
        if self._closed:
            raise SandboxClosedError("the sandbox is closed")
        if self._isolate is None:
            raise RuntimeError("AsyncSandbox is not started: use 'async with' or 'await sb.start()'")
        return self._isolate

    async def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """``Sandbox.exec``, awaited."""
        command = argv_list(argv)
        async with self._next_turn() as isolate:
            return await isolate.aexec(command, stdin=stdin, env=env, cwd=cwd, timeout=timeout, on_output=on_output)

    async def run_code(
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
        """``Sandbox.run_code``, awaited."""
        async with self._next_turn() as isolate:
            return await isolate.arun_code(
                code, language, stdin=stdin, env=env, timeout=timeout, on_output=on_output, session=session
            )

    async def interrupt(self, *, session: str | None = None) -> bool:
        """Interrupt the run in progress, beside it (SIGINT; a cell keeps its interpreter's
        state). False when nothing runs (``session``: when no cell of that interpreter runs), or
        where the placement has no interrupt."""
        return await self._held().ainterrupt(session)

    async def close_interpreter(self, session: str) -> bool:
        """End ``session``'s interpreter (``Interpreter.restart``)."""
        async with self._next_turn() as isolate:
            return await isolate.aclose_interpreter(session)

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        async with self._next_turn() as isolate:
            await isolate.awrite_file(path, data, mode)

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        async with self._next_turn() as isolate:
            return await isolate.aread_file(path, max_bytes)

    async def list_dir(self, path: str) -> list[dict[str, Any]]:
        async with self._next_turn() as isolate:
            return await isolate.alist_dir(path)

    async def upload(
        self, local_path: str | os.PathLike[str], remote_dir: str, *, max_bytes: int | None = None
    ) -> TransferSummary:
        """``Sandbox.upload``: the host's tar work in a thread, each piece a call of this sandbox's."""
        from .transfer import aupload

        return await aupload(self, local_path, remote_dir, max_bytes=max_bytes)

    async def download(
        self,
        remote_path: str,
        local_dir: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        max_files: int | None = None,
        overwrite: bool = False,
        executable: bool = False,
        links: Links = "refuse",
        vcs: bool = False,
    ) -> TransferSummary:
        """``Sandbox.download``: the host's tar work and checks in a thread."""
        from .transfer import adownload

        return await adownload(
            self,
            remote_path,
            local_dir,
            max_bytes=max_bytes,
            max_files=max_files,
            overwrite=overwrite,
            executable=executable,
            links=links,
            vcs=vcs,
        )

    async def aclose(self) -> None:
        """Release the isolate (idempotent)."""
        self._closed = True
        isolate, self._isolate = self._isolate, None
        if isolate is not None:
            await self._placement.release(isolate)

    async def __aenter__(self) -> AsyncSandbox:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def arun(argv: list[str], policy: Policy | dict[str, Any] | None = None, **kwargs: Any) -> ExecResult:
    """``run`` in a thread: the same keywords (checked here, so that a mistake names ``arun``)."""
    _as_call("arun", policy, kwargs, _RUN_KEYWORDS)
    return await asyncio.to_thread(run, argv, policy, **kwargs)


async def arun_code(
    code: str, language: str = "python", policy: Policy | dict[str, Any] | None = None, **kwargs: Any
) -> ExecResult:
    """``run_code`` in a thread: the same keywords (checked here, so that a mistake names ``arun_code``)."""
    _as_call("arun_code", policy, kwargs, _RUN_CODE_KEYWORDS)
    return await asyncio.to_thread(run_code, code, language, policy, **kwargs)


def _as_call(call: str, policy: Policy | dict[str, Any] | None, kwargs: dict[str, Any], own: tuple[str, ...]) -> None:
    """What the blocking call would refuse of ``kwargs``, refused here: its error names ``call``."""
    fields = {k: v for k, v in kwargs.items() if k not in own and k != "timeout"}
    policy_of(call, policy, fields, kwargs.get("timeout"), own)
