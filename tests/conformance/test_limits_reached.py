"""A run that runs into a policy limit says so in ``limits_reached``, where the command's own exit
status would hide it: it may have gone on and exited 0 after a fork was refused or the scratch space
filled. On every runtime where the limit's count can be had (docs/policy.md)."""

from __future__ import annotations

import signal

import pytest

from stockade.runtimes.manager import RuntimeManager
from tests.conformance.test_rlimits import REAL_RUNTIMES, manager, sandbox

__all__ = ["manager"]  # the module's fixture, shared


@pytest.mark.parametrize("runtime", REAL_RUNTIMES)
def test_a_full_scratch_space_is_reported_on_every_runtime(runtime: str, manager: RuntimeManager) -> None:
    with sandbox(runtime, manager, disk_mb=16) as sb:
        filled = sb.exec(["sh", "-c", "head -c 20000000 /dev/zero > /work/fill; echo head said $?"])
        assert filled.exit_code == 0 and filled.stdout == "head said 1\n", filled.summary()
        assert filled.termination_reason == "completed" and filled.limits_reached == ["disk_mb"]
        assert "reached disk_mb (the scratch space was full)" in filled.summary()
        sb.exec(["rm", "/work/fill"])
        assert sb.exec(["true"]).limits_reached == []  # room again: the next run did not reach it


@pytest.mark.parametrize("runtime", REAL_RUNTIMES)
def test_a_command_killed_at_the_file_size_limit_is_reported(runtime: str, manager: RuntimeManager) -> None:
    with sandbox(runtime, manager, max_file_size_bytes=1000) as sb:
        r = sb.exec(["dd", "if=/dev/zero", "of=/tmp/over", "bs=2000", "count=1"])
        assert r.exit_code == -signal.SIGXFSZ and r.limits_reached == ["max_file_size_bytes"], r.summary()


def test_a_fork_refused_at_the_pids_limit_is_reported(manager: RuntimeManager) -> None:
    # The process runtime's cgroup counts the forks it refuses (pids.events); gVisor and a microVM
    # refuse them at RLIMIT_NPROC, which keeps no count.
    with sandbox("process", manager, pids_limit=8) as sb:
        r = sb.exec(["python3", "-c", FORKS])
        assert r.stdout.startswith("refused after ") and r.stdout.endswith(", went on\n"), r.summary() + r.stderr
        assert r.exit_code == 0 and r.limits_reached == ["pids_limit"], r.summary()
        assert "reached pids_limit (a fork was refused)" in r.summary()
        assert sb.exec(["true"]).limits_reached == []  # its children waited for: the next run forks freely


# Each child lives until the parent is done forking (it closes the pipe's end they wait on), however
# slowly a loaded host lets it fork: they all count against the limit together.
FORKS = """
import os
r, w = os.pipe()
children = []
for _ in range(10):
    try:
        pid = os.fork()
    except BlockingIOError:
        print(f"refused after {len(children)}", end=", ")
        break
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    children.append(pid)
os.close(w)
for pid in children:
    os.waitpid(pid, 0)
print("went on")
"""
