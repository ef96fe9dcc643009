"""The one async agent channel (runtimes/channel.py) and its blocking callers (runtimes/blocking.py).

Run against the fake runtime: the real guest agent over a real socket, so
every turn, cancellation and interrupt below crosses the same protocol the
isolating runtimes speak.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from stockade.errors import SandboxError
from stockade.policy import Policy
from stockade.runtimes.fake import FakeRuntime, FakeSandbox


@pytest.fixture
def sb() -> Iterator[FakeSandbox]:
    sandbox = FakeRuntime().start(Policy(timeout_seconds=20))
    yield sandbox
    sandbox.close()


def test_a_blocking_call_from_inside_a_running_event_loop_is_answered(sb: FakeSandbox) -> None:
    # A notebook cell, or async code calling the sync SDK: this thread's loop is busy,
    # so the call runs on a helper thread and this one waits for it.
    async def main() -> tuple[str, bytes]:
        result = sb.exec(["sh", "-c", "echo from-a-loop"])
        sb.write_file(f"{sb.scratch_dir}/f", b"x" * 10)
        return result.stdout, sb.read_file(f"{sb.scratch_dir}/f")

    assert asyncio.run(main()) == ("from-a-loop\n", b"x" * 10)


def test_threads_sharing_a_sandbox_wait_their_turn(sb: FakeSandbox) -> None:
    path = f"{sb.scratch_dir}/turns"
    outputs: list[str] = []
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            r = sb.exec(["sh", "-c", f"echo start{i} >> {path}; sleep 0.1; echo end{i} >> {path}; echo {i}"])
            outputs.append(r.stdout.strip())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and sorted(outputs) == ["0", "1", "2", "3"]
    lines = sb.read_file(path).decode().split()
    # One request at a time: every run ended before the next one started.
    assert all(lines[k][:5] == "start" and lines[k + 1] == "end" + lines[k][5:] for k in range(0, 8, 2)), lines


def _until(go: str) -> str:
    """A command that waits for the file ``go`` (made by the test once it is done with the run in
    flight), however long a loaded host takes to get there."""
    return f"until [ -e {go} ]; do sleep 0.01; done"


async def _in_flight(sb: FakeSandbox) -> None:
    deadline = time.monotonic() + 30
    while not sb.channel._turn.locked():
        assert time.monotonic() < deadline, "the call never started"
        await asyncio.sleep(0.01)


def test_an_async_caller_finding_the_channel_busy_is_refused_not_queued(sb: FakeSandbox) -> None:
    go = f"{sb.scratch_dir}/go"

    async def main() -> str:
        first = asyncio.ensure_future(sb.aexec(["sh", "-c", f"{_until(go)}; echo first"]))
        await _in_flight(sb)
        with pytest.raises(SandboxError, match="another call to this sandbox is in progress"):
            await sb.aexec(["echo", "second"])
        open(go, "w").close()  # the fake runtime's scratch is on the host
        return (await first).stdout

    assert asyncio.run(main()) == "first\n"
    assert sb.exec(["echo", "after"]).stdout == "after\n"


def test_an_async_caller_that_gives_up_leaves_the_run_to_finish_and_the_sandbox_to_go_on(sb: FakeSandbox) -> None:
    # A daemon client whose connection dropped, asyncio.wait_for: the agent's answer is read
    # when it comes and dropped; the isolate (its files, its interpreters) is kept.
    sb.write_file(f"{sb.scratch_dir}/kept", b"state")
    go = f"{sb.scratch_dir}/go"

    async def main() -> str:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sb.aexec(["sh", "-c", f"{_until(go)}; echo done > {sb.scratch_dir}/ran"]), 0.2)
        with pytest.raises(SandboxError, match="another call to this sandbox is in progress"):
            await sb.aexec(["true"])  # the given-up run still holds the channel
        open(go, "w").close()  # on the host (the fake runtime's scratch): the channel is the run's
        for _ in range(600):
            await asyncio.sleep(0.05)
            if not sb.channel._turn.locked():
                break
        return (await sb.aexec(["cat", f"{sb.scratch_dir}/ran", f"{sb.scratch_dir}/kept"])).stdout

    assert asyncio.run(main()) == "done\nstate"


def test_a_call_given_up_on_a_loop_that_then_closed_does_not_hold_the_sandbox_forever(sb: FakeSandbox) -> None:
    # asyncio.run() returned with the given-up call in flight: nothing will read its answer.
    async def main() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(sb.aexec(["sleep", "30"]), 0.2)

    asyncio.run(main())
    started = time.monotonic()
    # Neither hangs nor meets the late answer as its own: the call is dropped, which ends
    # the isolate, and the caller that waited for the turn is told so.
    with pytest.raises(SandboxError, match="stopped waiting for exec before the agent answered"):
        sb.exec(["echo", "next"])
    assert time.monotonic() - started < 20  # not the given-up command's 30 s


def test_ctrl_c_during_a_blocking_call_lets_go_of_the_channel() -> None:
    sandbox = FakeRuntime().start(Policy(timeout_seconds=20))
    try:
        # Ctrl-C once the run's output shows it under way: not before the call (nor outside pytest.raises).
        running = threading.Event()
        threading.Thread(target=lambda: running.wait(30) and os.kill(os.getpid(), signal.SIGINT)).start()
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            sandbox.exec(["sh", "-c", "echo go; exec sleep 30"], on_output=lambda stream, data: running.set())
        assert time.monotonic() - started < 20  # not the command's 30 s
        # Nothing would read the agent's late answer: the isolate was ended, and says why.
        with pytest.raises(SandboxError, match="stopped waiting for exec before the agent answered"):
            sandbox.exec(["echo", "next"])
        # The turn was given back: nothing holds the channel.
        assert sandbox.channel._current is None and not sandbox.channel._turn.locked()
    finally:
        sandbox.close()


def test_an_interrupt_from_another_thread_reaches_a_blocking_run(sb: FakeSandbox) -> None:
    # Sent once the code is in its try (its output says so); it sleeps in short turns, as Python heeds
    # a SIGINT that lands just before a sleep begins only once that sleep ends.
    inside = threading.Event()
    threading.Thread(target=lambda: inside.wait(30) and sb.interrupt()).start()
    result = sb.run_code(
        "import time\ntry:\n    print('waiting', flush=True)\n    for _ in range(200):\n        time.sleep(0.05)\n"
        "except KeyboardInterrupt:\n    print('stopped')",
        on_output=lambda stream, data: inside.set(),
    )
    assert result.stdout == "waiting\nstopped\n"
    assert sb.interrupt() is False  # nothing runs now
    assert sb.exec(["echo", "still"]).stdout == "still\n"


def test_each_thread_keeps_one_loop_and_a_finished_thread_closes_its_own(sb: FakeSandbox) -> None:
    from stockade.runtimes import blocking

    loops: list[asyncio.AbstractEventLoop] = []

    def twice() -> None:
        sb.exec(["true"])
        own = blocking._loops.own
        assert own is not None
        sb.exec(["true"])
        assert blocking._loops.own is own
        loops.append(own.loop)

    thread = threading.Thread(target=twice)
    thread.start()
    thread.join(30)
    del thread
    import gc

    gc.collect()
    assert len(loops) == 1 and loops[0].is_closed()


def _epoll_fds() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventpoll]" for fd in _fds())


def _fds() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
            found.append(fd)
        except OSError:
            pass  # the listing's own descriptor, gone already
    return found


def test_short_lived_threads_leave_no_loop_or_epoll_set_behind(sb: FakeSandbox) -> None:
    import gc

    from stockade.runtimes import agent_waits

    sb.exec(["true"])  # this thread's own loop and waits exist before counting
    gc.collect()
    before_fds, before_waits = _epoll_fds(), len(agent_waits._BY_LOOP)
    for _ in range(20):
        thread = threading.Thread(target=sb.write_file, args=(f"{sb.scratch_dir}/t", b"x"))
        thread.start()
        thread.join(30)
    del thread
    gc.collect()
    assert _epoll_fds() <= before_fds and len(agent_waits._BY_LOOP) <= before_waits


def test_a_run_that_waited_for_its_turn_is_measured_from_its_turn(sb: FakeSandbox) -> None:
    # Its counters, its violation report and its time start when it is sent, not while
    # another thread's run still held the sandbox.
    first = threading.Thread(target=sb.exec, args=(["sleep", "6"],))
    first.start()
    time.sleep(0.3)
    second = sb.exec(["true"])
    first.join(30)
    assert second.success and second.execution_time_seconds < 4  # its turn came 5.7 s after it asked


def test_closing_a_sandbox_wakes_a_call_in_flight_on_another_threads_loop() -> None:
    # A component's run has no deadline; its thread's loop waits on the agent's socket in an
    # epoll set, which forgets a closed descriptor without waking anyone. The close must wake it.
    from stockade.runtimes.base import UNBOUNDED

    sandbox = FakeRuntime().start(Policy(timeout_seconds=20))
    sandbox.kill = lambda: None  # type: ignore[method-assign]  # only the channel's close may end the call
    ended: list[object] = []

    def run() -> None:
        try:
            ended.append(sandbox.exec(["sleep", "30"], timeout=UNBOUNDED))
        except BaseException as exc:
            ended.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.5)
    sandbox.close()
    thread.join(15)
    assert not thread.is_alive() and ended, "the call in flight was not woken by the close"
