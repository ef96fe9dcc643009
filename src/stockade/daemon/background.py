"""The daemon's side of background processes and published ports in held sandboxes
(``sandbox.spawn``, ``sandbox.process_*``, ``sandbox.publish``).

Each call takes the sandbox's turn as any call does, briefly: the process
runs in the isolate beside later calls, and its agent keeps its output
(runtimes/spawned.py). The daemon remembers each process's last known
state, and each published port, so that ``status`` lists them without
asking the agent. A published port listens on the daemon's host loopback
(runtimes/publish.py) until its sandbox closes.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import InvalidRequestError, NotFoundError
from ..limits import check_call_size
from ..protocol.models import (
    Caller,
    ProcessInfo,
    ProcessKill,
    ProcessList,
    ProcessOutput,
    ProcessRef,
    ProcessWait,
    ProcessWrite,
    Published,
    PublishedPort,
    SandboxPublish,
    SandboxRef,
    SandboxSpawn,
)
from ..runtimes.spawned import SHARED_SLICE_S, Process
from ..settings import current
from .held import Held
from .parts import ControllerCalls

T = TypeVar("T")
# Processes of one held sandbox the daemon remembers (the agent holds at most 64 live ones).
MAX_REMEMBERED = 256
# Characters of a process's argv the daemon keeps (and answers, in status too), each argument 1 KiB
# at most: an argv may be ~2 MiB, and 256 of them were half a GiB of the daemon's memory, all of it
# in every answer to status.
ARGV_KEPT = 4096
ARG_KEPT = 1024
# Ports one held sandbox may publish: each is a listener of the daemon's, and up to 64
# connections relayed at once, two daemon threads each.
MAX_PUBLISHED = 16
# Below it, binding needs root: a caller that is not root does not get the daemon's root to take
# one of the host's service ports (and answer in that service's place on its loopback).
FIRST_UNPRIVILEGED_PORT = 1024
DEFAULT_ADDRESS = "127.0.0.1"  # where a caller that is not root publishes (parse_publish's default)


class BackgroundProcesses(ControllerCalls):
    """Controller methods for background processes; mixed into ``Controller`` beside ``HeldSandboxes``."""

    if TYPE_CHECKING:  # the HeldSandboxes mixin's, which this works beside

        async def _held_call(self, request: SandboxRef, caller: Caller, call: Callable[[Held], Awaitable[T]]) -> T: ...
        async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...

    async def spawn(self, request: SandboxSpawn, caller: Caller) -> ProcessInfo:
        check_call_size("stdin", request.stdin_bytes())  # before it waits its turn holding the data

        async def start(held: Held) -> ProcessInfo:
            process: Process = await self._blocking(
                held.sandbox.spawn, request.command, stdin=request.stdin_bytes(), env=request.env, cwd=request.cwd
            )
            process.argv = kept_argv(process.argv)
            held.processes[process.handle] = process
            _prune(held.processes)
            # Metadata only, as for a run: the program, never its arguments (code, often) or input.
            self._tell(lambda listener: listener.sandbox_event(
                caller, "sandbox.spawn", agent_id=held.agent_id, sandbox_id=held.sandbox_id,
                policy_digest=held.sandbox.policy.digest, handle=process.handle, pid=process.pid,
                program=request.command[0][:256],
            ))  # fmt: skip
            return _info(process)

        return await self._held_call(request, caller, start)

    async def publish(self, request: SandboxPublish, caller: Caller) -> Published:
        from ..runtimes.publish import parse_publish  # the daemon's loop imports no relay it does not run

        address, host_port, port = parse_publish(request.port)
        if 0 < host_port < FIRST_UNPRIVILEGED_PORT and not caller.admin:
            raise InvalidRequestError(
                f"publish {request.port!r}: host port {host_port} is below {FIRST_UNPRIVILEGED_PORT}, "
                "which only root may bind: ask for another, or 0 (any free one)"
            )
        ports = current().publish_ports
        if host_port and ports is not None and not caller.admin and not ports[0] <= host_port <= ports[1]:
            # On a daemon several tenants share, a port a host service uses (one that is down, or
            # not started yet) would be one a caller's sandbox answers on, for the host's clients.
            raise InvalidRequestError(
                f"publish {request.port!r}: host port {host_port} is outside {ports[0]}-{ports[1]}, the ports "
                "this daemon lets its callers name (STOCKADE_PUBLISH_PORTS): ask for one of them, or 0 (any free one)"
            )
        if address != DEFAULT_ADDRESS and not caller.admin:
            # On another loopback address a port would answer in the place of a host service bound
            # to one of them only (::1 where it listens on 127.0.0.1, which "localhost" may try first).
            raise InvalidRequestError(
                f"publish {request.port!r}: only root chooses the host address; a port is published on "
                f"{DEFAULT_ADDRESS}: ask for HOST_PORT:PORT or PORT"
            )

        async def forward(held: Held) -> Published:
            if len(held.published) >= MAX_PUBLISHED:
                raise InvalidRequestError(f"a held sandbox publishes at most {MAX_PUBLISHED} ports")
            try:
                # A port relayed through the agent (gVisor, a microVM) takes its turns in the
                # held sandbox's queue, beside its caller's calls.
                turn = (asyncio.get_running_loop(), held.lock)
                address, bound = await self._blocking(held.sandbox.publish, request.port, turn=turn)
            except PermissionError:
                raise InvalidRequestError(
                    f"publish {request.port!r}: the daemon runs without root (STOCKADE_DAEMON_USER) and binds "
                    f"no host port below {FIRST_UNPRIVILEGED_PORT}"
                ) from None
            held.published.append(PublishedPort(port=port, address=address, host_port=bound))
            return Published(sandbox_id=held.sandbox_id, port=port, address=address, host_port=bound)

        return await self._held_call(request, caller, forward)

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
        check_call_size("stdin", request.data_bytes())  # before it waits its turn holding the data

        async def write(held: Held) -> ProcessInfo:
            process = _process(held, request.handle)
            await self._blocking(process.write, request.data_bytes(), eof=request.eof)
            return _info(process)

        return await self._held_call(request, caller, write)

    async def process_wait(self, request: ProcessWait, caller: Caller) -> ProcessInfo:
        until = time.monotonic() + request.timeout

        async def wait(held: Held) -> ProcessInfo:
            process = _process(held, request.handle)
            left = max(0.0, until - time.monotonic())
            # A published port's relay takes its turns in this sandbox's queue: a long wait
            # gives the turn up between slices, so that its connections are served meanwhile.
            await self._blocking(process.wait, min(left, SHARED_SLICE_S) if held.published else left)
            return _info(process)

        while True:  # asked at least once, whatever the timeout
            info = await self._held_call(request, caller, wait)
            if not info.running or time.monotonic() >= until:
                return info

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


def kept_argv(argv: list[str]) -> list[str]:
    """``argv`` as the daemon remembers it: each argument cut at ARG_KEPT characters, the whole at
    ARGV_KEPT, ``…`` where something was cut."""
    kept, left = [], ARGV_KEPT
    for arg in argv:
        if left <= 0:
            kept.append("…")
            break
        piece = arg[: min(left, ARG_KEPT)]
        kept.append(piece if len(piece) == len(arg) else piece + "…")
        left -= len(piece) + 1  # and its place: 200,000 empty arguments are an argv too
    return kept


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
