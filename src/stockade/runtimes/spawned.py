"""``Process``: a background process in a held sandbox (the agent's ``spawn`` and ``proc_*`` calls);
``AsyncProcess``: the same, awaited, for an ``AsyncSandbox``.

The agent keeps reading the process's output while other calls run, up to
1 MiB per stream until it is read here; what was not read in time is
counted (``dropped``), never allowed to block the process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import InvalidRequestError
from ..limits import check_call_size, signal_name

if TYPE_CHECKING:
    from typing import Protocol

    class ProcCalls(Protocol):
        """What a ``Process`` talks to: an ``AgentSandbox``, or a daemon's (client/processes.py)."""

        def proc_call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]: ...


T = TypeVar("T")
_WAIT_SLICE_S = 10.0  # one proc_wait call: the sandbox's other calls wait for it
SHARED_SLICE_S = 0.2  # the same while published ports are relayed through the agent (the daemon's too)


class Process:
    """A handle on a background process: ``read``, ``write``, ``wait``, ``kill``, ``follow``."""

    def __init__(self, sandbox: ProcCalls, handle: str, pid: int, argv: list[str]) -> None:
        self._sandbox = sandbox
        self.handle, self.pid, self.argv = handle, pid, argv
        self.exit_code: int | None = None
        self.dropped = {"stdout": 0, "stderr": 0}  # bytes the agent dropped before they were read

    def __repr__(self) -> str:
        state = "running" if self.exit_code is None else f"exit {self.exit_code}"
        return f"Process({self.argv!r}, pid={self.pid}, {state})"

    def read(self) -> tuple[bytes, bytes]:
        """What the process wrote to stdout and stderr since the last read."""
        said = self._sandbox.proc_call("proc_read", {"handle": self.handle})
        self._note(said)
        for stream in ("stdout", "stderr"):
            self.dropped[stream] += int(said.get("dropped", {}).get(stream, 0))
        return _bytes(said.get("stdout")), _bytes(said.get("stderr"))

    def write(self, data: bytes | str, *, eof: bool = False) -> None:
        """Give the process input (``eof``: then close its stdin)."""
        raw = data.encode() if isinstance(data, str) else data
        check_call_size("stdin", raw)
        self._sandbox.proc_call(
            "proc_write", {"handle": self.handle, "data": base64.b64encode(raw).decode(), "eof": eof}
        )

    def close_stdin(self) -> None:
        self.write(b"", eof=True)

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        self._note(self._sandbox.proc_call("proc_wait", {"handle": self.handle, "timeout": 0}))
        return self.exit_code

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the end (at most ``timeout`` s); the exit code, or None if it still runs."""
        _check_wait(timeout)
        until = None if timeout is None else time.monotonic() + timeout
        # A published port relayed through the agent (gVisor, microVM) needs the sandbox's turn
        # between slices: short ones then, and a pause that lets its threads take it.
        relayed = bool(getattr(self._sandbox, "forwarders", None))
        slice_s = SHARED_SLICE_S if relayed else _WAIT_SLICE_S
        while self.exit_code is None:  # asked at least once, whatever the timeout
            left = slice_s if until is None else max(0.0, min(slice_s, until - time.monotonic()))
            self._note(self._sandbox.proc_call("proc_wait", {"handle": self.handle, "timeout": left}, left + 30))
            if until is not None and time.monotonic() >= until:
                break
            if relayed:
                time.sleep(0.005)
        return self.exit_code

    def kill(self, signal: str | int = "SIGTERM") -> None:
        """Signal the process's group (``"SIGTERM"``, ``signal.SIGKILL``, ``2``: SIGTERM, SIGKILL,
        SIGINT, SIGHUP, SIGUSR1, SIGUSR2)."""
        name = signal_name(signal)
        self._note(self._sandbox.proc_call("proc_kill", {"handle": self.handle, "signal": name}))

    def follow(self, on_output: Callable[[str, bytes], None], interval: float = 0.05) -> int:
        """Pass the output to ``on_output(stream, data)`` as it comes, until the process ends; its exit code."""
        while True:
            ended = self.exit_code is not None
            out, err = self.read()
            for stream, data in (("stdout", out), ("stderr", err)):
                if data:
                    on_output(stream, data)
            if ended:
                assert self.exit_code is not None
                return self.exit_code
            if not out and not err:
                self.wait(interval)

    def _note(self, said: dict[str, Any]) -> None:
        code = said.get("exit_code")
        if said.get("running") is False and isinstance(code, int):
            self.exit_code = code


def listed_processes(sandbox: ProcCalls) -> list[dict[str, Any]]:
    """The background processes ``sandbox``'s agent holds: ``{handle, pid, argv, running, exit_code}``."""
    listed = sandbox.proc_call("proc_list", {}).get("processes")
    return listed if isinstance(listed, list) else []


def _bytes(value: Any) -> bytes:
    return base64.b64decode(value) if isinstance(value, str) and value else b""


async def in_turn(turn: asyncio.Lock, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread, in ``turn`` (an ``AsyncSandbox``'s queue of calls). A caller that
    gives up waits for the thread all the same: its call holds the agent's channel until it ends,
    and the next call in the queue would otherwise be refused as "in progress"."""
    async with turn:
        job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            await asyncio.wait([job])
            raise


async def spawned_or_killed(spawning: Awaitable[T], kill: Callable[[T], Awaitable[None]]) -> T:
    """What ``spawning`` starts. A caller that gives up meanwhile would leave a process running that
    nobody holds a handle to: the start goes on, shielded, and what it started is killed."""
    job = asyncio.ensure_future(spawning)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        ending = asyncio.ensure_future(_kill_when_started(job, kill))
        while not ending.done():  # a second cancel must not leave it half-done either
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([ending])
        raise


async def _kill_when_started(job: asyncio.Future[T], kill: Callable[[T], Awaitable[None]]) -> None:
    await asyncio.wait([job])
    if not job.cancelled() and job.exception() is None:
        with contextlib.suppress(Exception):  # gone already: nothing to end
            await kill(job.result())


class AwaitedFollow:
    """``Process.follow``, awaited, over a class's awaited ``read`` and ``wait``."""

    exit_code: int | None

    async def read(self) -> tuple[bytes, bytes]:
        raise NotImplementedError

    async def wait(self, timeout: float | None = None) -> int | None:
        raise NotImplementedError

    async def follow(self, on_output: Callable[[str, bytes], None], interval: float = 0.05) -> int:
        """Pass the output to ``on_output(stream, data)`` as it comes, until the process ends; its exit code."""
        while True:
            ended = self.exit_code is not None
            out, err = await self.read()
            for stream, data in (("stdout", out), ("stderr", err)):
                if data:
                    on_output(stream, data)
            if ended:
                assert self.exit_code is not None
                return self.exit_code
            if not out and not err:
                await self.wait(interval)


class AsyncProcess(AwaitedFollow):
    """``Process`` for an ``AsyncSandbox``: the same methods, awaited. Each call takes the
    sandbox's turn (its queue of calls, ``turn``) and is made in a thread; a wait is made of
    short slices, so that the sandbox's other calls go on between them."""

    def __init__(self, process: Process, turn: asyncio.Lock) -> None:
        self._process, self._turn = process, turn
        self.handle, self.pid, self.argv = process.handle, process.pid, process.argv
        self.exit_code: int | None = process.exit_code
        self.dropped = process.dropped  # the one count, kept by the process's reads

    def __repr__(self) -> str:
        return f"Async{self._process!r}"

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        try:
            return await in_turn(self._turn, fn, *args)
        finally:
            self.exit_code = self._process.exit_code

    async def read(self) -> tuple[bytes, bytes]:
        return await self._call(self._process.read)

    async def write(self, data: bytes | str, *, eof: bool = False) -> None:
        await self._call(functools.partial(self._process.write, data, eof=eof))

    async def close_stdin(self) -> None:
        await self.write(b"", eof=True)

    async def poll(self) -> int | None:
        return await self._call(self._process.poll)

    async def wait(self, timeout: float | None = None) -> int | None:
        until = None if timeout is None else time.monotonic() + timeout
        while self.exit_code is None:
            left = SHARED_SLICE_S if until is None else max(0.0, min(SHARED_SLICE_S, until - time.monotonic()))
            await self._call(self._process.wait, left)
            if until is not None and time.monotonic() >= until:
                break
        return self.exit_code

    async def kill(self, signal: str | int = "SIGTERM") -> None:
        await self._call(self._process.kill, signal)


def _check_wait(timeout: Any) -> None:
    """A wait's ``timeout``: None (until the end), or seconds, 0 included (ask once)."""
    if timeout is None:
        return
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}: {timeout!r}")
    if math.isnan(timeout) or timeout < 0:
        raise InvalidRequestError(f"timeout={timeout!r}: give seconds, 0 or more (or None: until it ends)")
