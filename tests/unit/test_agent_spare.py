"""When a held sandbox's agent forks its next python runner: not while the host reads an answer.

Forking the spare (and the runner's warm-up) right after an answer took the CPUs
the host and its client needed to read it; the agent now waits for the host to
go quiet first, unless the host keeps coming straight back.
"""

from __future__ import annotations

import time

from stockade import Policy
from stockade.agent import commands, server
from stockade.runtimes.fake import FakeRuntime


class _Probe(server.Agent):
    """The agent's spare decision alone: whether a request is waiting is scripted."""

    def __init__(self, pending: list[bool], eager: bool = False) -> None:  # no socket, no signals
        self.pending = pending
        self.calls: list[str] = []
        self._eager_spare = eager
        self._spare = None

    def _request_pending(self, wait_s: float = 0) -> bool:
        self.calls.append(f"wait {wait_s:g}")
        return self.pending.pop(0)

    def prepare_spare(self, warm: bool = True) -> None:
        self.calls.append("spare")


def test_a_quiet_host_gets_its_spare_after_the_delay() -> None:
    probe = _Probe([False, False])
    probe._spare_when_idle()
    assert probe.calls == [f"wait {commands.SPARE_DELAY_S:g}", "spare", "wait 0"] and not probe._eager_spare


def test_a_host_back_within_the_delay_is_served_first_and_then_gets_its_spare_at_once() -> None:
    probe = _Probe([True])
    probe._spare_when_idle()
    assert probe.calls == [f"wait {commands.SPARE_DELAY_S:g}"] and probe._eager_spare  # no fork before its request
    probe = _Probe([False, True], eager=True)  # the next time round: no delay
    probe._spare_when_idle()
    assert probe.calls == ["wait 0", "spare", "wait 0"] and probe._eager_spare


def test_a_host_that_slows_down_gets_the_delay_again() -> None:
    probe = _Probe([False, False], eager=True)
    probe._spare_when_idle()
    assert probe.calls == ["wait 0", "spare", "wait 0"] and not probe._eager_spare


def test_a_real_agent_still_forks_its_spare_after_a_run() -> None:
    sandbox = FakeRuntime().start(Policy())
    try:
        assert sandbox.run_code("pass").success
        deadline = time.monotonic() + 10
        while not _children(sandbox.proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _children(sandbox.proc.pid), "no runner was forked ahead of the next run_code"
        assert sandbox.run_code("print(1)").stdout == "1\n"
    finally:
        sandbox.close()


def _children(pid: int) -> list[int]:
    """Live (not zombie) children of ``pid``: the run's own runner has exited and been reaped."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids = [int(p) for p in f.read().split()]
    except OSError:
        return []
    live = []
    for child in pids:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    live.append(child)
        except OSError:
            continue
    return live
