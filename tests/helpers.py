"""Small helpers shared by the test suites."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from stockade.result import ExecResult

T = TypeVar("T")


def processes_with_arg(marker: str) -> list[int]:
    """Pids of every process on the host whose command line contains ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def write_executable(path: str, text: str) -> str:
    """A script at ``path`` (its directories made), mode 0755; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def cgroup_limit_cases() -> list[tuple[str, int | float]]:
    """Every cgroup-backed Policy limit at its minimum, default and maximum.

    The minimum is the Policy's own (the smallest value its validation accepts).
    """
    from stockade.errors import PolicyError
    from stockade.policy import MAX_CPU, MAX_MEMORY_MB, MIN_CPU, Policy

    def smallest_accepted(name: str) -> int:
        for value in range(1, 1 << 16):
            try:
                Policy.build(**{name: value})
            except PolicyError:
                continue
            return value
        raise AssertionError(f"Policy accepts no {name}")

    default = Policy()
    limits: dict[str, tuple[int | float, ...]] = {
        "memory_mb": (smallest_accepted("memory_mb"), default.memory_mb, MAX_MEMORY_MB),
        "pids_limit": (smallest_accepted("pids_limit"), default.pids_limit, 4096),
        "cpu_limit": (MIN_CPU, default.cpu_limit, MAX_CPU),
    }
    return [(name, value) for name, values in limits.items() for value in values]


@contextlib.contextmanager
def shared_directory(mode: int, prefix: str = "stockade-share-") -> Iterator[str]:
    """A host directory of ``mode`` for a test to share with an isolate, removed after."""
    path = tempfile.mkdtemp(prefix=prefix)
    try:
        os.chmod(path, mode)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run_sharing(argv: list[str], runtime: str, share: str, access: str = "rw") -> ExecResult:
    """``argv`` run once on ``runtime`` in an isolate of its own (no pool), ``share`` at /data."""
    from stockade import RuntimeManager, run

    own = RuntimeManager(pool_size=0)
    try:
        return run(argv, runtime=runtime, manager=own, filesystem_access=[f"{share}:/data:{access}"])
    finally:
        own.close()


def returned_within(seconds: float, call: Callable[[], T]) -> T | BaseException:
    """``call``'s result, or what it raised; a failed test if it is still waiting after ``seconds``."""
    outcome: list[T | BaseException] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"the call was still waiting after {seconds} s"
    return outcome[0]


@contextlib.contextmanager
def full_backlog(path: str) -> Iterator[tuple[socket.socket, list[socket.socket]]]:
    """A listener at ``path`` whose backlog is full (the next connect finds no room), and the
    connections that fill it."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    held: list[socket.socket] = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX)
            s.setblocking(False)
            try:
                s.connect(path)
            except BlockingIOError:
                s.close()
                break
            held.append(s)
        else:
            raise AssertionError("the backlog never filled")
        yield listener, held
    finally:
        for s in held:
            s.close()
        listener.close()


def wait_in_connect(tids: Callable[[], list[int]], within: float = 60) -> bool:
    """Whether one of ``tids()`` (threads, or processes' main threads: asked again each look) is
    seen blocked in connect(2) within ``within`` seconds."""
    connect = "42 "  # x86_64's connect, as /proc/TID/syscall starts
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        for tid in tids():
            with contextlib.suppress(OSError):
                with open(f"/proc/{tid}/syscall") as f:
                    if f.read().startswith(connect):
                        return True
        time.sleep(0.01)
    return False


def make_room_and_read(listener: socket.socket, held: list[socket.socket]) -> bytes:
    """Empty the backlog (the held connections closed, each accepted), and return the first line
    a connection that waited for room sends."""
    for s in held:
        s.close()
    held.clear()
    listener.settimeout(30)
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(30)
            line = conn.makefile("rb").readline()
        if line:
            return line
