"""How the host judges a run's end (runtimes/judgement.py): what it knows outranks what the agent says."""

from __future__ import annotations

import signal
from typing import Any

from stockade.policy import Policy
from stockade.runtimes.base import IsolateUsage
from stockade.runtimes.judgement import judge
from stockade.runtimes.verdict import Verdict
from stockade.runtimes.violations import ViolationReport


def _judge(policy: Policy | None = None, said: Verdict | None = None, **kw: Any) -> tuple[str, str | None]:
    before, after = kw.pop("before", IsolateUsage()), kw.pop("after", IsolateUsage())
    options = {"killed_for": None, "cancelled": None, "timeout_s": None, **kw}
    error = options.pop("error", None)
    judged = judge(policy or Policy(), said or Verdict(exit_code=0), error, before, after, ViolationReport(), **options)
    return judged.reason, judged.error


def test_a_clean_exit_completes_and_a_signal_is_a_kill() -> None:
    assert _judge() == ("completed", None)
    # Said to be none of stockade's: `sh -c 'kill -TERM $$'` read as if stockade had killed it.
    assert _judge(said=Verdict(exit_code=-9)) == (
        "killed",
        "it died of SIGKILL, from inside the sandbox or its kernel (stockade sent none)",
    )
    assert _judge(said=Verdict(exit_code=-signal.SIGXFSZ))[1].startswith("it wrote past max_file_size_bytes=")


def test_an_interrupt_is_named_only_where_the_run_ended_of_it() -> None:
    from stockade.result import CellException
    from stockade.runtimes.cells import Cell

    assert _judge(said=Verdict(exit_code=-signal.SIGINT), interrupted=True) == ("killed", "interrupted (SIGINT)")
    assert _judge(said=Verdict(exit_code=0), interrupted=True) == ("completed", None)  # it caught the SIGINT
    assert _judge(said=Verdict(exit_code=-signal.SIGINT)) == (  # its own kill -INT: not ours
        "killed",
        "it died of SIGINT, from inside the sandbox or its kernel (stockade sent none)",
    )
    stopped = Cell(3, exception=CellException(name="KeyboardInterrupt", value="", traceback=""))
    assert _judge(said=Verdict(exit_code=1, cell=stopped), interrupted=True) == (
        "killed",
        "interrupted (the cell raised KeyboardInterrupt; its interpreter keeps its state)",
    )
    failed = Cell(3, exception=CellException(name="ValueError", value="x", traceback=""))
    assert _judge(said=Verdict(exit_code=1, cell=failed), interrupted=True) == ("completed", None)
    # A timeout outranks the interrupt that came with it.
    assert _judge(said=Verdict(exit_code=-signal.SIGINT, timed_out=True), interrupted=True)[0] == "timeout"


def test_what_the_host_knows_outranks_what_the_agent_says() -> None:
    # The agent says it exited 0; the host killed it for a violation, or its caller cancelled it.
    assert _judge(killed_for="violation")[0] == "violation"
    assert _judge(cancelled="by an operator") == ("killed", None)
    # An OOM kill counted by the cgroup beats the agent's "timed out".
    reason, error = _judge(said=Verdict(timed_out=True), before=IsolateUsage(oom_kills=1),
                           after=IsolateUsage(oom_kills=2))  # fmt: skip
    assert reason == "memory_limit" and error == "out of memory: the 512 MB limit was reached"


def test_the_run_s_own_timeout_is_named() -> None:
    assert _judge(said=Verdict(timed_out=True), timeout_s=0.5) == ("timeout", "timed out after 0.5 s")


def test_cpu_limit_by_sigxcpu_or_by_sigkill_past_the_limit() -> None:
    policy = Policy(cpu_time_seconds=2)
    assert _judge(policy, Verdict(exit_code=-signal.SIGXCPU))[0] == "cpu_limit"
    used = {"before": IsolateUsage(cpu_seconds=1.0), "after": IsolateUsage(cpu_seconds=3.5)}
    assert _judge(policy, Verdict(exit_code=-signal.SIGKILL), **used)[0] == "cpu_limit"
    assert _judge(None, Verdict(exit_code=-signal.SIGKILL), **used)[0] == "killed"  # no CPU limit set


def test_the_host_cuts_output_past_the_cap_whatever_the_agent_sent() -> None:
    said = Verdict(exit_code=0, stdout=b"o" * 800, stderr=b"e" * 800)
    judged = judge(Policy(max_output_bytes=1000), said, None, IsolateUsage(), IsolateUsage(), ViolationReport(),
                   killed_for=None, cancelled=None, timeout_s=None)  # fmt: skip
    assert (judged.reason, len(judged.stdout), len(judged.stderr)) == ("output_limit", 800, 200)
    assert judged.error == "output exceeded 1000 bytes and was cut"


def _reached(policy: Policy | None = None, said: Verdict | None = None, **kw: Any) -> list[str]:
    before, after = kw.pop("before", IsolateUsage()), kw.pop("after", IsolateUsage())
    judged = judge(policy or Policy(), said or Verdict(exit_code=0), None, before, after, ViolationReport(),
                   killed_for=None, cancelled=None, timeout_s=None)  # fmt: skip
    return judged.reached


def test_the_limits_a_run_ran_into_are_named_whether_or_not_they_ended_it() -> None:
    assert _reached() == []
    # Ran into and went on: what the command's own exit status would hide.
    assert _reached(before=IsolateUsage(pids_refused=3), after=IsolateUsage(pids_refused=5)) == ["pids_limit"]
    assert _reached(before=IsolateUsage(pids_refused=3), after=IsolateUsage(pids_refused=3)) == []  # an earlier run's
    assert _reached(said=Verdict(exit_code=0, scratch_full=True)) == ["disk_mb"]
    assert _reached(said=Verdict(exit_code=-signal.SIGXFSZ)) == ["max_file_size_bytes"]
    # The one that ended it, beside its termination_reason.
    assert _reached(said=Verdict(timed_out=True)) == ["timeout_seconds"]
    assert _reached(Policy(cpu_time_seconds=2), Verdict(exit_code=-signal.SIGXCPU)) == ["cpu_time_seconds"]
    assert _reached(before=IsolateUsage(oom_kills=0), after=IsolateUsage(oom_kills=1)) == ["memory_mb"]
    cut = Verdict(exit_code=-signal.SIGKILL, truncated=True, scratch_full=True)
    assert _reached(said=cut) == ["max_output_bytes", "disk_mb"]
