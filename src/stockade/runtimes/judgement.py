"""The host's judgement of a run: how it ended, and the error that says why.

The agent's verdict (verdict.py) is one witness; the host weighs it against
what only the host knows: why it killed the isolate (a violation, a cancel, a
timeout), the cgroup's OOM and CPU counters before and after the run, and the
policy's output cap, which the host, not the guest, enforces last.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..agent.sessions import INTERRUPT_GRACE_S

if TYPE_CHECKING:
    from ..policy import Policy
    from ..result import TerminationReason
    from .base import IsolateUsage
    from .verdict import Verdict
    from .violations import ViolationReport


@dataclass(frozen=True, slots=True)
class Judgement:
    reason: TerminationReason
    error: str | None
    stdout: bytes  # cut to the policy's output cap
    stderr: bytes
    reached: list[str]  # the policy limits the run ran into (``limits_reached``)


def judge(
    policy: Policy,
    said: Verdict,
    error: str | None,
    before: IsolateUsage,
    after: IsolateUsage,
    report: ViolationReport,
    *,
    killed_for: TerminationReason | None,
    cancelled: str | None,
    timeout_s: float | None,
    interrupted: bool = False,
) -> Judgement:
    """``said``: the agent's verdict (empty when it said nothing); ``error``: what ended the call,
    if anything did; ``killed_for``: why the host killed the isolate; ``cancelled``: why its
    caller ended it; ``timeout_s``: the run's own timeout, when shorter than the policy's;
    ``interrupted``: the caller interrupted the run (SIGINT, ``Sandbox.interrupt``)."""
    exit_code, stdout, stderr = said.exit_code, said.stdout, said.stderr
    timed_out, truncated = said.timed_out, said.truncated
    cap = policy.max_output_bytes
    if len(stdout) + len(stderr) > cap:
        truncated = True
        stdout = stdout[:cap]
        stderr = stderr[: max(0, cap - len(stdout))]
    reason: TerminationReason
    if killed_for == "violation":
        reason = "violation"
    elif cancelled is not None:
        reason = "killed"
    elif after.oom_kills > before.oom_kills:
        reason = "memory_limit"
    elif timed_out or killed_for == "timeout":
        reason = "timeout"
    elif hit_cpu_limit(policy, exit_code, before, after):
        reason = "cpu_limit"
    elif truncated:
        reason = "output_limit"
    elif error is not None:
        reason = "error"
    elif interrupted and ended_by_interrupt(said):
        reason = "killed"
        if said.cell is not None:
            error = "interrupted (the cell raised KeyboardInterrupt; its interpreter keeps its state)"
        elif said.interpreter_lost:
            error = f"interrupted, and its interpreter did not stop within {INTERRUPT_GRACE_S:g} s: it was killed"
        else:
            error = "interrupted (SIGINT)"
    elif exit_code is not None and exit_code < 0:
        reason = "killed"
        # None of the above: the signal was not stockade's (the code's own, a crash, another process).
        if exit_code == -signal.SIGXFSZ:
            error = error or f"it wrote past max_file_size_bytes={policy.max_file_size_bytes} (SIGXFSZ)"
        elif said.answer_refused:
            error = error or (
                "the agent ended the interpreter: its answer to the cell was not the interpreter's (the cell "
                "wrote to its reply pipe) or past its bounds"
            )
        else:
            error = (
                error
                or f"it died of {_signal_name(-exit_code)}, from inside the sandbox or its kernel (stockade sent none)"
            )
    else:
        reason = "completed"
    if reason == "memory_limit":
        # The isolate may have died of it: the limit, not the death, is the news.
        error = f"out of memory: the {policy.memory_mb} MB limit was reached"
    elif reason == "timeout":
        error = error or f"timed out after {timeout_s or policy.timeout_seconds:g} s"
        if said.cell is not None:
            error += " (the cell was interrupted; its interpreter keeps its state)"
    elif reason == "cpu_limit":
        error = f"CPU time limit reached: cpu_time_seconds={policy.cpu_time_seconds}"
    elif reason == "output_limit":
        error = error or f"output exceeded {cap} bytes and was cut"
    elif reason == "violation":
        named = f" ({', '.join(report.counts)})" if report.counts else ""
        limit = policy.max_violations
        if policy.on_violation == "kill" or limit is None:
            error = error or f"killed after a policy violation{named}"
        else:
            error = error or f"killed after {report.blocked} refused calls, more than max_violations={limit}{named}"
    return Judgement(reason, error, stdout, stderr, limits_reached(said, before, after, reason, truncated))


def limits_reached(
    said: Verdict, before: IsolateUsage, after: IsolateUsage, reason: TerminationReason, truncated: bool
) -> list[str]:
    """The policy's limits the run ran into, by field name: the one that ended it (its
    ``termination_reason``), and those that did not end it and that a command's exit status
    would hide: a fork refused at pids_limit (the cgroup's count), the scratch space full at
    disk_mb (the agent's look as the run ended), a command killed by SIGXFSZ at
    max_file_size_bytes."""
    reached = []
    if reason == "timeout":
        reached.append("timeout_seconds")
    if reason == "cpu_limit":
        reached.append("cpu_time_seconds")
    if reason == "memory_limit":
        reached.append("memory_mb")
    if truncated:
        reached.append("max_output_bytes")
    if after.pids_refused > before.pids_refused:
        reached.append("pids_limit")
    if said.scratch_full:
        reached.append("disk_mb")
    if said.exit_code == -signal.SIGXFSZ:
        reached.append("max_file_size_bytes")
    return reached


def ended_by_interrupt(said: Verdict) -> bool:
    """Whether an interrupted run ended of it: a command dead of SIGINT, a cell that raised
    KeyboardInterrupt, an interpreter killed for not heeding it. Code that caught the interrupt
    and went on ended as it chose to."""
    if said.interpreter_lost:
        return True
    if said.cell is not None:
        return said.cell.exception is not None and said.cell.exception.name == "KeyboardInterrupt"
    return said.exit_code == -signal.SIGINT


def hit_cpu_limit(policy: Policy, exit_code: int | None, before: IsolateUsage, after: IsolateUsage) -> bool:
    """Ended by RLIMIT_CPU: SIGXCPU at the soft limit, or SIGKILL at the hard one (SIGXCPU ignored)."""
    limit = policy.cpu_time_seconds
    if limit is None or exit_code is None:
        return False
    if exit_code == -signal.SIGXCPU:
        return True
    used = None
    if after.cpu_seconds is not None and before.cpu_seconds is not None:
        used = after.cpu_seconds - before.cpu_seconds
    return exit_code == -signal.SIGKILL and used is not None and used >= limit


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
