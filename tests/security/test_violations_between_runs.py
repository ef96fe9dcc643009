"""A process a run leaves running goes on after the run: its refused calls between runs
of a held sandbox are reported with the next run, marked, never dropped (before, they
were reported nowhere, and a caller saw only the effect: ptrace had returned -1)."""

from __future__ import annotations

import time

import pytest

import stockade
from stockade import Policy, Sandbox
from stockade.runtimes.manager import RuntimeManager
from tests.conftest import require

RUNTIMES = ["process", "gvisor"]
# Waits, in the background, until the host lets it go (/work/go), then calls
# ptrace(PTRACE_ATTACH, 1) and writes what it returned to /work/out.
LEFT_RUNNING = (
    "(while [ ! -e /work/go ]; do sleep 0.02; done; "
    "python3 -c 'import ctypes; print(ctypes.CDLL(None).ptrace(16, 1, 0, 0))' > /work/out.tmp; "
    "mv /work/out.tmp /work/out) </dev/null >/dev/null 2>&1 &"
)
PTRACE = "import ctypes\nprint(ctypes.CDLL(None).ptrace(16, 1, 0, 0))"


def let_it_call(sb: Sandbox) -> None:
    """Let the process left running make its call, and wait (bounded) until it has."""
    sb.write_file("/work/go", "")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if sb.read_file("/work/out"):
                return
        except stockade.SandboxError:
            pass  # not there yet
        time.sleep(0.05)
    pytest.fail("the process left running never made its call")


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_call_made_between_runs_is_reported_with_the_next_run(runtime: str, manager: RuntimeManager) -> None:
    require(runtime)
    with Sandbox(Policy(runtime=runtime, timeout_seconds=60), manager=manager) as sb:
        first = sb.exec(["sh", "-c", LEFT_RUNNING])
        assert first.success and first.violation_counts == {}, first.summary()
        let_it_call(sb)
        assert sb.read_file("/work/out") == b"-1\n"  # refused, while no run was going
        second = sb.run_code(PTRACE)  # and one of its own
        assert second.stdout == "-1\n" and second.violation_counts == {"ptrace": 2}, second.summary()
        assert [(v.syscall, v.blocked, v.between_runs) for v in second.security_violations] == [
            ("ptrace", True, True),
            ("ptrace", True, False),
        ]
        third = sb.exec(["true"])  # reported once: it does not follow into later runs
        assert third.violation_counts == {} and third.security_violations == [], third.summary()


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_call_between_runs_under_on_violation_kill_ends_the_sandbox_and_says_so(
    runtime: str, manager: RuntimeManager
) -> None:
    require(runtime)
    with Sandbox(Policy(runtime=runtime, on_violation="kill", timeout_seconds=60), manager=manager) as sb:
        assert sb.exec(["sh", "-c", LEFT_RUNNING]).violation_counts == {}
        sb.write_file("/work/go", "")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the call ends the sandbox: every call then fails
            try:
                sb.read_file("/work/go")
            except stockade.SandboxError:
                break
            time.sleep(0.05)
        with pytest.raises(stockade.SandboxError, match=r"killed after a policy violation \(ptrace\)"):
            sb.run_code("print('after')")
