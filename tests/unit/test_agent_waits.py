"""The loop's shared waits on agent sockets: readers by epoll, deadlines by one timer."""

from __future__ import annotations

import asyncio
import gc
import os
import socket

from stockade.runtimes.agent_waits import AgentWaits, agent_waits


def test_deadlines_fire_in_order_and_cancelled_ones_never() -> None:
    async def scenario() -> list[str]:
        waits = agent_waits(asyncio.get_running_loop())
        fired: list[str] = []
        waits.call_later(0.06, lambda: fired.append("late"))
        waits.call_later(0.02, lambda: fired.append("early"))  # nearer than the timer set: re-armed
        cancelled = waits.call_later(0.04, lambda: fired.append("cancelled"))
        waits.call_later(0.04, lambda: fired.append("middle"))
        waits.cancel(cancelled)
        waits.cancel(cancelled)  # twice is harmless
        await asyncio.sleep(0.01)
        assert fired == []  # nothing early
        await asyncio.sleep(0.1)
        return fired

    assert asyncio.run(scenario()) == ["early", "middle", "late"]


def test_a_deadline_set_from_a_deadline_callback_fires() -> None:
    async def scenario() -> list[int]:
        waits = agent_waits(asyncio.get_running_loop())
        fired: list[int] = []
        waits.call_later(0.01, lambda: waits.call_later(0.01, lambda: fired.append(2)) and None)
        waits.call_later(0.5, lambda: fired.append(3))  # the timer must come back for the nearer one
        await asyncio.sleep(0.1)
        return fired

    assert asyncio.run(scenario()) == [2]


def test_cancelled_deadlines_do_not_pile_up() -> None:
    async def scenario() -> int:
        waits = AgentWaits(asyncio.get_running_loop())
        for _ in range(10_000):
            waits.cancel(waits.call_later(30.0, lambda: None))
        return len(waits._deadlines)

    assert asyncio.run(scenario()) < 200


def test_readers_are_called_while_readable_and_not_after_unwatch() -> None:
    async def scenario() -> tuple[list[bytes], int]:
        loop = asyncio.get_running_loop()
        waits = agent_waits(loop)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        got: list[bytes] = []
        done = loop.create_future()

        def readable() -> None:
            got.append(ours.recv(1))  # one byte a call: level-triggered, so it is called again
            if len(got) == 3:
                waits.unwatch(ours.fileno(), readable)
                done.set_result(None)

        waits.watch(ours.fileno(), readable)
        theirs.send(b"abcd")
        await asyncio.wait_for(done, 5)
        await asyncio.sleep(0.02)  # the fourth byte is there, nobody is called for it
        left = len(ours.recv(16))
        ours.close()
        theirs.close()
        return got, left

    got, left = asyncio.run(scenario())
    assert got == [b"a", b"b", b"c"] and left == 1


def test_unwatch_by_another_caller_leaves_the_current_reader() -> None:
    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        waits = agent_waits(loop)
        ours, theirs = socket.socketpair()
        called = loop.create_future()
        waits.watch(ours.fileno(), lambda: called.done() or called.set_result(True))
        waits.unwatch(ours.fileno(), lambda: None)  # not the registered reader: a no-op
        theirs.send(b"x")
        result = await asyncio.wait_for(called, 5)
        ours.close()
        theirs.close()
        return result

    assert asyncio.run(scenario())


def test_a_socket_closed_while_watched_neither_spins_nor_breaks_the_next() -> None:
    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        waits = agent_waits(loop)
        ours, theirs = socket.socketpair()
        calls = 0

        def readable() -> None:
            nonlocal calls
            calls += 1

        waits.watch(ours.fileno(), readable)
        fd = ours.fileno()
        ours.close()  # closed under the call: the kernel drops it from the set
        waits.unwatch(fd, readable)
        theirs.close()
        again, other = socket.socketpair()  # likely the same number, now a new socket
        seen = loop.create_future()
        waits.watch(again.fileno(), lambda: seen.done() or seen.set_result(None))
        other.send(b"y")
        await asyncio.wait_for(seen, 5)
        waits.unwatch(again.fileno(), lambda: None)
        again.close()
        other.close()
        return calls

    assert asyncio.run(scenario()) == 0


def test_one_epoll_set_per_loop_and_none_left_open_after_the_loop() -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def scenario() -> bool:
        loop = asyncio.get_running_loop()
        return agent_waits(loop) is agent_waits(loop)

    assert asyncio.run(scenario())
    before = open_fds()
    for _ in range(20):
        assert asyncio.run(scenario())
    gc.collect()
    assert open_fds() <= before + 1  # the last loop's set may stay cached until the next loop


def test_a_run_on_the_loop_whose_agent_never_answers_ends_at_its_deadline() -> None:
    # A frozen agent: the run's host-side deadline (its timeout plus the
    # host's grace) must end it as a timeout and kill the isolate, and a run
    # started meanwhile on another sandbox must still be answered.
    import signal
    import time

    from stockade import Policy
    from stockade.runtimes.agent_requests import code_params
    from stockade.runtimes.base import HOST_TIMEOUT_GRACE_S
    from stockade.runtimes.fake import FakeRuntime

    runtime = FakeRuntime()
    frozen, alive = runtime.start(Policy()), runtime.start(Policy())
    try:
        os.kill(frozen.proc.pid, signal.SIGSTOP)

        async def scenario() -> tuple[float, str, str]:
            started = time.monotonic()
            stuck = asyncio.ensure_future(frozen.arun_request("run_code", code_params("pass"), b"", None, 0.5))
            answered = await alive.arun_request("run_code", code_params("print('meanwhile')"), b"", None, 30.0)
            result = await asyncio.wait_for(stuck, 30)
            return time.monotonic() - started, result.termination_reason, answered.stdout

        elapsed, reason, meanwhile = asyncio.run(scenario())
        assert reason == "timeout" and meanwhile == "meanwhile\n"
        assert elapsed >= 0.5 + HOST_TIMEOUT_GRACE_S - 0.1  # not before the deadline
        assert frozen.closed or frozen.proc.wait(10) is not None  # the isolate was killed
    finally:
        frozen.close()
        alive.close()
