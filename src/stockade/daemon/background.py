"""The daemon's side of background processes in held sandboxes (``sandbox.spawn``, ``sandbox.process_*``).

Each call takes the sandbox's turn as any call does, briefly: the process
runs in the isolate beside later calls, and its agent keeps its output
(runtimes/spawned.py). The daemon remembers each process's last known
state, so that ``status`` lists them without asking the agent.
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import NotFoundError
from ..protocol.models import (
    Caller,
    ProcessInfo,
    ProcessKill,
    ProcessList,
    ProcessOutput,
    ProcessRef,
    ProcessWait,
    ProcessWrite,
    SandboxRef,
    SandboxSpawn,
)
from ..runtimes.spawned import Process
from .held import Held

T = TypeVar("T")
# Processes of one held sandbox the daemon remembers (the agent holds at most 64 live ones).
MAX_REMEMBERED = 256


class BackgroundProcesses:
    """Controller methods for background processes; mixed into ``Controller`` beside ``HeldSandboxes``."""

    if TYPE_CHECKING:  # the HeldSandboxes mixin's, which this works beside

        async def _held_call(self, request: SandboxRef, caller: Caller, call: Callable[[Held], Awaitable[T]]) -> T: ...
        async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    async def spawn(self, request: SandboxSpawn, caller: Caller) -> ProcessInfo:
        async def start(held: Held) -> ProcessInfo:
            process: Process = await self._blocking(
                held.sandbox.spawn, request.command, stdin=request.stdin_bytes(), env=request.env, cwd=request.cwd
            )
            held.processes[process.handle] = process
            _prune(held.processes)
            return _info(process)

        return await self._held_call(request, caller, start)

    async def process_read(self, request: ProcessRef, caller: Caller) -> ProcessOutput:
        async def read(held: Held) -> ProcessOutput:
            process = _process(held, request.handle)
            before = dict(process.dropped)
            out, err = await self._blocking(process.read)
            dropped = {k: process.dropped[k] - before[k] for k in before}
            return ProcessOutput(
                **_info(process).model_dump(),
                stdout=base64.b64encode(out).decode(),
                stderr=base64.b64encode(err).decode(),
                dropped=dropped,
            )

        return await self._held_call(request, caller, read)

    async def process_write(self, request: ProcessWrite, caller: Caller) -> ProcessInfo:
        async def write(held: Held) -> ProcessInfo:
            process = _process(held, request.handle)
            await self._blocking(process.write, request.data_bytes(), eof=request.eof)
            return _info(process)

        return await self._held_call(request, caller, write)

    async def process_wait(self, request: ProcessWait, caller: Caller) -> ProcessInfo:
        async def wait(held: Held) -> ProcessInfo:
            process = _process(held, request.handle)
            await self._blocking(process.wait, request.timeout)
            return _info(process)

        return await self._held_call(request, caller, wait)

    async def process_kill(self, request: ProcessKill, caller: Caller) -> ProcessInfo:
        async def kill(held: Held) -> ProcessInfo:
            process = _process(held, request.handle)
            await self._blocking(process.kill, request.signal)
            return _info(process)

        return await self._held_call(request, caller, kill)

    async def process_list(self, request: SandboxRef, caller: Caller) -> ProcessList:
        async def listing(held: Held) -> ProcessList:
            for process in held.processes.values():
                if process.exit_code is None:
                    await self._blocking(process.poll)
            return ProcessList(sandbox_id=held.sandbox_id, processes=[_info(p) for p in held.processes.values()])

        return await self._held_call(request, caller, listing)


def _prune(processes: dict[str, Process]) -> None:
    """Keep the daemon's memory of a sandbox's processes bounded: the oldest ended ones go first."""
    ended = [handle for handle, p in processes.items() if p.exit_code is not None]
    for handle in ended[: max(0, len(processes) - MAX_REMEMBERED)]:
        del processes[handle]


def _process(held: Held, handle: str) -> Process:
    process: Process | None = held.processes.get(handle)
    if process is None:
        raise NotFoundError(f"sandbox {held.sandbox_id!r} has no background process {handle!r}")
    return process


def _info(process: Process) -> ProcessInfo:
    return ProcessInfo(
        handle=process.handle,
        pid=process.pid,
        argv=process.argv,
        running=process.exit_code is None,
        exit_code=process.exit_code,
    )


def process_infos(processes: dict[str, Process]) -> list[ProcessInfo]:
    """What ``status`` says of a held sandbox's processes: their last known state."""
    return [_info(p) for p in processes.values()]
