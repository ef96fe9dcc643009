"""``Sandbox.watch``: file events from inside a sandbox, as they happen.

The watcher (``watcher.py``) is a background process in the sandbox (``spawn``), so a watch
works wherever ``spawn`` does: every runtime, the SDK, a daemon's ``RemoteSandbox``, and their
async forms. What it prints is the sandbox's to choose, and read as such: each line is parsed
on its own, bounded, and one that does not parse is counted in ``lost``, never trusted.
"""

from __future__ import annotations

import asyncio
import functools
import json
import posixpath
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

from .errors import SandboxError, StockadeError, os_error_named, printable

FileEventKind = Literal["created", "modified", "closed_write", "attrib", "deleted", "moved_from", "moved_to", "lost"]
KINDS: tuple[str, ...] = get_args(FileEventKind)[:-1]  # "lost" is always said
MAX_LINE = 64 * 1024  # a path is at most 4 KiB, 24 KiB once JSON-escaped: more is not the watcher's
READY_TIMEOUT_S = 60.0  # watching a tree means a watch per directory, set before watch() returns
# Each read of the watcher is a call to the sandbox (through a daemon, a request: 100 a second per
# uid are served): a watch starting polls from 10 ms, slower as it takes longer (a tree's watches
# take a while), then every 50 ms.
START_POLL_S, POLL_S = 0.01, 0.05
STOP_WAIT_S = 10.0  # for a killed watcher to be reaped (its agent answers at once)


@dataclass(frozen=True, slots=True)
class FileEvent:
    """One change under a watched path: ``kind`` (``created``, ``modified``, ``closed_write``:
    closed after writing, ``attrib``, ``deleted``, ``moved_from``, ``moved_to``; ``lost``: events
    under ``path`` were lost), the absolute ``path`` inside the sandbox, and whether it is a directory."""

    kind: FileEventKind
    path: str
    is_dir: bool


class _Spawned(Protocol):  # Process, for a Sandbox and a RemoteSandbox
    dropped: dict[str, int]
    exit_code: int | None  # as of its last call (a read says it too)

    def read(self) -> tuple[bytes, bytes]: ...
    def write(self, data: bytes | str, *, eof: bool = False) -> None: ...
    def kill(self, signal: str | int = "SIGTERM") -> None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int | None: ...


class _AsyncSpawned(Protocol):  # AsyncProcess, AsyncRemoteProcess
    dropped: dict[str, int]
    exit_code: int | None

    async def read(self) -> tuple[bytes, bytes]: ...
    async def write(self, data: bytes | str, *, eof: bool = False) -> None: ...
    async def kill(self, signal: str | int = "SIGTERM") -> None: ...
    async def poll(self) -> int | None: ...
    async def wait(self, timeout: float | None = None) -> int | None: ...


def watched_path(path: str) -> str:
    """``path`` as the watcher is given it, and names what is below it: absolute, in its plain form
    (``/w//d/`` is ``/w/d``), so that each event's path is one the host checks as below it."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValueError(f"path must be an absolute path inside the sandbox, not {path!r}")
    return "/" + posixpath.normpath(path).lstrip("/")  # POSIX keeps a leading "//" apart: not here


def watcher_command(path: str, recursive: bool, kinds: Iterable[str] | None) -> tuple[list[str], bytes]:
    """The argv and stdin that start a watcher on ``path`` (``watched_path``'s; the program is read
    from stdin, so that ``processes()`` lists a short argv)."""
    chosen = list(KINDS) if kinds is None else [kinds] if isinstance(kinds, str) else list(kinds)
    unknown = [k for k in chosen if k not in KINDS]
    if unknown or not chosen:
        raise ValueError(f"events must name some of {', '.join(KINDS)}; not {unknown or chosen!r}")
    return ["python3", "-I", "-S", "-", path, "1" if recursive else "0", ",".join(chosen)], _watcher_source()


@functools.cache
def _watcher_source() -> bytes:
    """watcher.py's text, read once (it goes to each watcher's stdin)."""
    return Path(__file__).with_name("watcher.py").read_bytes()


class _Lines:
    """The watcher's stdout, a line at a time: events, its ready line, or its error."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._root = posixpath.normpath(path)
        self._below = self._root.rstrip("/") + "/"
        self.pending = b""
        self.events: list[FileEvent] = []
        self.ready = False
        self.error: tuple[str, str] | None = None  # (message, errno name)
        self.lost = 0  # lines that did not parse, or were cut
        self.dropped = 0  # stdout the agent dropped, as of the last read
        self.stderr = b""

    def feed(self, data: bytes) -> None:
        self.pending += data
        *lines, self.pending = self.pending.split(b"\n")
        if len(self.pending) > MAX_LINE:
            self.pending = b""
            self.lost += 1
        for line in lines:
            self._line(line)

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"{"):  # no parse for it: a flood of empty lines cost seconds a MiB in exceptions
            self.lost += 1
            return
        try:
            said = json.loads(line) if len(line) <= MAX_LINE else None
        except (ValueError, RecursionError):  # RecursionError: "[[[[..." nested past the parser's depth
            said = None
        if not isinstance(said, dict):
            self.lost += 1
            return
        kind, path, is_dir = said.get("kind"), said.get("path"), said.get("dir")
        if kind in KINDS or kind == "lost":
            # The sandbox's code runs as the watcher's uid and may write its stdout: an event is kept
            # only for the watched path or one below it, as the watcher names it (no "..", no other root).
            if isinstance(path, str) and isinstance(is_dir, bool) and self.ready and self._inside(path):
                self.events.append(FileEvent(kind, path, is_dir))
                return  # (none comes before "ready" from a real watcher: one that does is not kept)
        elif isinstance(said.get("ready"), int):
            self.ready = True
            return
        elif isinstance(said.get("error"), str) and isinstance(said.get("errno"), str):
            self.error = (said["error"][:4096], said["errno"][:32])
            return
        self.lost += 1

    def _inside(self, path: str) -> bool:
        if path in (self.path, self._root):
            return True
        # No name holds a NUL: a path with one is made up (the watcher's output is the sandbox's).
        return (
            path.startswith(self._below)
            and not path.startswith("//")  # (normpath keeps a leading "//" apart: named so, it is made up)
            and "\0" not in path
            and posixpath.normpath(path) == path
        )

    def feed_read(self, stdout: bytes, stderr: bytes, dropped: dict[str, int]) -> None:
        """What one ``read()`` of the watcher gave (its stderr kept for an early end's error),
        and the output the agent has dropped so far (counted as lost, once)."""
        if stderr:
            self.stderr = (self.stderr + stderr)[-4096:]
        total = int(dropped.get("stdout", 0))
        if total > self.dropped:
            self.lost += 1
            self.dropped = total
            self.pending = b""  # the rest of a line whose start was dropped
        self.feed(stdout)

    def check_started(self, code: int | None, until: float) -> None:
        """Raise why the watcher did not start: it ended (``code``), or it took too long."""
        if code is not None:
            raise self.failure(code)
        if time.monotonic() > until:
            raise TimeoutError(f"watching {self.path} did not start within {READY_TIMEOUT_S:g} s")

    def take(self) -> list[FileEvent]:
        taken, self.events = self.events, []
        return taken

    def failure(self, code: int) -> Exception:
        """Why the watcher ended before it was ready."""
        if self.error is not None:
            message, name = self.error
            return os_error_named(name, printable(message), self.path)  # the sandbox's words: no terminal control
        said = self.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {code}"]
        return SandboxError(f"cannot watch {self.path}: the watcher ended ({printable(said[0][:500])})")


class FileWatch:
    """File events under a path in a sandbox (``Sandbox.watch``): ``events()`` takes those seen
    so far, iterating waits for each; ``stop()`` (or the ``with`` block's end) ends the watch."""

    def __init__(self, process: _Spawned, path: str) -> None:
        self.process, self.path = process, path
        self._lines = _Lines(path)

    @classmethod
    def start(
        cls, spawn: Callable[[list[str], bytes], _Spawned], path: str, recursive: bool, kinds: Iterable[str] | None
    ) -> FileWatch:
        path = watched_path(path)
        argv, source = watcher_command(path, recursive, kinds)
        watch = cls(spawn(argv, source), path)
        try:
            watch.process.write(b"", eof=True)  # the program is whole: python3 runs it
            until, pause = time.monotonic() + READY_TIMEOUT_S, START_POLL_S
            while True:
                code = watch.process.exit_code  # before the read: output that came before the end is in it
                watch._lines.feed_read(*watch.process.read(), watch.process.dropped)
                if watch._lines.ready:
                    return watch
                watch._lines.check_started(code, until)
                time.sleep(pause)
                pause = min(pause * 1.5, POLL_S * 4)
        except BaseException:
            watch.stop()
            raise

    @property
    def lost(self) -> int:
        """How many lines of events were known lost on the way: output the agent dropped because
        it was not read in time (it keeps 1 MiB), lines that did not parse. The watcher's own
        ``lost`` events say what it could not watch."""
        return self._lines.lost

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def events(self, timeout: float = 0.0) -> list[FileEvent]:
        """The events seen since the last call; with ``timeout``, wait that long for at least one."""
        until = time.monotonic() + timeout
        while True:
            ended = self.process.exit_code is not None
            self._lines.feed_read(*self.process.read(), self.process.dropped)
            taken = self._lines.take()
            if taken or ended or time.monotonic() >= until:
                return taken
            time.sleep(min(POLL_S, max(0.0, until - time.monotonic())))

    def __iter__(self) -> Iterator[FileEvent]:
        """Each event as it comes, until the watch ends (``stop()``, or its path deleted or moved)."""
        while True:
            ended = self.process.exit_code is not None
            self._lines.feed_read(*self.process.read(), self.process.dropped)
            yield from self._lines.take()
            if ended:
                return
            time.sleep(POLL_S)

    def stop(self) -> None:
        """End the watch (its watcher killed); events not yet taken stay for ``events()``."""
        try:
            if self.process.exit_code is None:  # one that ended since is nothing to signal: fine
                self.process.kill("SIGKILL")
                self.process.wait(STOP_WAIT_S)  # gone when stop() returns
            self._lines.feed_read(*self.process.read(), self.process.dropped)
        except StockadeError:
            pass  # the sandbox closed, and its processes with it

    def __enter__(self) -> FileWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"FileWatch({self.path!r})"


class AsyncFileWatch:
    """``FileWatch`` for ``AsyncSandbox`` and ``AsyncRemoteSandbox``: the same, awaited
    (``await w.events()``, ``async for event in w``, ``await w.stop()``, ``async with``)."""

    def __init__(self, process: _AsyncSpawned, path: str) -> None:
        self.process, self.path = process, path
        self._lines = _Lines(path)

    @classmethod
    async def start(
        cls,
        spawn: Callable[[list[str], bytes], Awaitable[_AsyncSpawned]],
        path: str,
        recursive: bool,
        kinds: Iterable[str] | None,
    ) -> AsyncFileWatch:
        path = watched_path(path)
        argv, source = watcher_command(path, recursive, kinds)
        watch = cls(await spawn(argv, source), path)
        try:
            await watch.process.write(b"", eof=True)
            until, pause = time.monotonic() + READY_TIMEOUT_S, START_POLL_S
            while True:
                code = watch.process.exit_code
                watch._lines.feed_read(*await watch.process.read(), watch.process.dropped)
                if watch._lines.ready:
                    return watch
                watch._lines.check_started(code, until)
                await asyncio.sleep(pause)
                pause = min(pause * 1.5, POLL_S * 4)
        except BaseException:
            await asyncio.shield(watch.stop())
            raise

    @property
    def lost(self) -> int:
        return self._lines.lost

    async def events(self, timeout: float = 0.0) -> list[FileEvent]:
        until = time.monotonic() + timeout
        while True:
            ended = self.process.exit_code is not None
            self._lines.feed_read(*await self.process.read(), self.process.dropped)
            taken = self._lines.take()
            if taken or ended or time.monotonic() >= until:
                return taken
            await asyncio.sleep(min(POLL_S, max(0.0, until - time.monotonic())))

    async def __aiter__(self) -> AsyncIterator[FileEvent]:
        while True:
            ended = self.process.exit_code is not None
            self._lines.feed_read(*await self.process.read(), self.process.dropped)
            for event in self._lines.take():
                yield event
            if ended:
                return
            await asyncio.sleep(POLL_S)

    async def stop(self) -> None:
        try:
            if self.process.exit_code is None:
                await self.process.kill("SIGKILL")
                await self.process.wait(STOP_WAIT_S)
            self._lines.feed_read(*await self.process.read(), self.process.dropped)
        except StockadeError:
            pass

    async def __aenter__(self) -> AsyncFileWatch:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"AsyncFileWatch({self.path!r})"
