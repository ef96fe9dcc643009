"""The code can stop what the agent starts for a call (same uid): the agent must keep answering.

A process of the sandbox's that sends SIGSTOP to every new process catches the runner the agent
forks ahead of the next call, the interpreter a session's cell runs in, a command's runner before
it execs. Each wait of the agent's on one of them is bounded: a wait without an end wedged the
agent (single-threaded), and every later call of the sandbox with it, file calls too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from stockade import ExecResult, Policy, Sandbox
from stockade.errors import SandboxError
from stockade.runtimes.manager import RuntimeManager
from stockade.runtimes.spawned import Process
from tests.helpers import returned_within

STOPPER = """
import os, signal, time
seen = {int(p) for p in os.listdir('/proc') if p.isdigit()}
open('/tmp/stopping', 'w').close()
while True:
    for p in os.listdir('/proc'):
        if p.isdigit() and int(p) not in seen:
            seen.add(int(p))
            try:
                os.kill(int(p), signal.SIGSTOP)
            except OSError:
                pass
    time.sleep(0.002)
"""


@pytest.fixture
def stopped(process_runtime: str, manager: RuntimeManager) -> Iterator[Sandbox]:
    """A held sandbox whose stopper runs: every process started from now on is stopped at once.

    Its commands start from runners too (under 64 open files: the agent could not take that limit
    on itself): posix_spawn's vfork is the one wait the agent cannot end, its child stopped before
    its exec (a race of microseconds for the code), and the host's bound then ends the sandbox."""
    with Sandbox(Policy(runtime="process", timeout_seconds=120, max_open_files=32), manager=manager) as sandbox:
        sandbox.spawn(["python3", "-c", STOPPER])
        deadline = time.monotonic() + 30
        while not any(e["name"] == "stopping" for e in sandbox.list_dir("/tmp")):
            assert time.monotonic() < deadline, "the stopper did not start"
            time.sleep(0.1)
        yield sandbox


def answered(sandbox: Sandbox) -> None:
    listed = returned_within(15, lambda: sandbox.list_dir("/tmp"))
    assert not isinstance(listed, BaseException) and any(e["name"] == "stopping" for e in listed), listed


def test_runners_stopped_before_their_job_leave_the_agent_answering(stopped: Sandbox) -> None:
    # The runner forked before the stopper ran serves this call. Each one after it is stopped: a
    # spare before or after its "ready" (the pause lets the stopper find it), one forked on demand
    # at any point, or not before its short job is done (a race the test cannot decide). Whichever
    # it is, the call is answered within its timeout, and the agent answers on.
    first = returned_within(60, lambda: stopped.run_code("print('served')", timeout=30))
    assert not isinstance(first, BaseException) and first.stdout.strip() == "served", first
    answered(stopped)
    for call in (
        lambda: stopped.run_code("print('held')", timeout=5),
        lambda: stopped.exec(["echo", "held"], timeout=5),
        lambda: stopped.exec(["python3", "-c", "print('held')"], timeout=5),
        lambda: stopped.run_code("print('held')", timeout=5),
    ):
        time.sleep(1)
        started = time.monotonic()
        said = returned_within(40, call)
        assert isinstance(said, (SandboxError, ExecResult)), said
        assert time.monotonic() - started < 25, said  # its timeout, the grace, not the host's 30 s
        answered(stopped)
    spawned = returned_within(25, lambda: stopped.spawn(["sleep", "100"]))  # started, then stopped; or held up
    assert isinstance(spawned, (Process, SandboxError)), spawned
    answered(stopped)


def test_a_stopped_interpreter_is_timed_out_while_it_takes_a_large_cell(
    process_runtime: str, manager: RuntimeManager
) -> None:
    # 1 MiB of cell: more than a pipe holds, written as the interpreter reads it.
    stop_me = (
        "import os, subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', "
        "f'import os, signal, time; time.sleep(1); os.kill({os.getpid()}, signal.SIGSTOP); "
        'open("/tmp/stopped", "w").close()\'])\n'  # a second: the cell's reply is out by then
    )
    with Sandbox(Policy(runtime="process", timeout_seconds=120), manager=manager) as sandbox:
        assert sandbox.run_code(stop_me, session="s", timeout=20).exit_code == 0
        deadline = time.monotonic() + 30  # file calls are the agent's: answered with the interpreter stopped
        while not any(e["name"] == "stopped" for e in sandbox.list_dir("/tmp")):
            assert time.monotonic() < deadline, "the interpreter was not stopped"
            time.sleep(0.1)
        large = "x = 1\n" + "#" * (1 << 20) + "\nprint(x)\n"
        said = returned_within(30, lambda: sandbox.run_code(large, session="s", timeout=3))
        assert not isinstance(said, BaseException) and said.termination_reason == "timeout", said
        after = returned_within(30, lambda: sandbox.run_code("print('fresh')", session="s", timeout=20))
        assert not isinstance(after, BaseException) and after.stdout.strip() == "fresh", after


def test_a_cell_that_closes_its_reply_pipe_is_still_timed_out(process_runtime: str, manager: RuntimeManager) -> None:
    # The end of the reply pipe was read as the interpreter ending, and waited for without a
    # deadline: a cell that closed it and ran on held the agent until the host ended the sandbox.
    with Sandbox(Policy(runtime="process", timeout_seconds=120), manager=manager) as sandbox:
        started = time.monotonic()
        said = returned_within(30, lambda: sandbox.run_code("import os, time\nos.closerange(3, 64)\ntime.sleep(60)\n",
                                                   session="s", timeout=2))  # fmt: skip
        assert not isinstance(said, BaseException) and said.termination_reason == "timeout", said
        assert time.monotonic() - started < 25  # not the host's end of the sandbox
        after = returned_within(30, lambda: sandbox.run_code("print('fresh')", session="s", timeout=20))
        assert not isinstance(after, BaseException) and after.stdout.strip() == "fresh", after


def test_a_timeout_shorter_than_a_runners_start_times_out_the_run(
    process_runtime: str, manager: RuntimeManager
) -> None:
    # The runner's time is the run's timeout, but never under a second: a run of 1 ms found its
    # spare not ready yet (back to back) and was answered as a runner held up by the sandbox.
    with Sandbox(Policy(runtime="process", timeout_seconds=60), manager=manager) as sandbox:
        for _ in range(5):
            said = sandbox.run_code("print(1)", timeout=0.001)
            assert said.termination_reason in ("timeout", "completed"), said
