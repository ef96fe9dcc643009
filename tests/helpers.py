"""Small helpers shared by the test suites."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
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
