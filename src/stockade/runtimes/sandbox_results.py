"""The result of a run of ``AgentSandbox``: the agent's verdict, judged against the policy and what
the isolate used and tried, with its egress account and no secret's value in it."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import TYPE_CHECKING, Any

from ..errors import SandboxError
from ..result import EgressRequest, ExecResult, ResourceUsage, TerminationReason
from .base import IsolateUsage
from .cells import cell_fields
from .channel import BLOCKING_CALLER
from .judgement import judge
from .verdict import PendingRun, Verdict
from .violations import ViolationLog, ViolationReport

if TYPE_CHECKING:
    from ..policy import Policy
    from .egress import Egress


_account_pool: concurrent.futures.ThreadPoolExecutor | None = None
_account_pool_lock = threading.Lock()


def accounts() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that take egress workers' accounts of runs (a few: each waits on one worker)."""
    global _account_pool
    with _account_pool_lock:
        if _account_pool is None:
            from ..settings import current

            # One a sandbox that may run at once: a worker kept busy delays only its own results.
            workers = max(8, current().max_sandboxes)
            _account_pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="stockade-account")
        return _account_pool


def settle_account(account: concurrent.futures.Future[None]) -> None:
    """A run's account is taken, or will never be (its run given up before its answer): whichever
    of the two says so first (the other finds it settled)."""
    try:
        account.set_result(None)
    except concurrent.futures.InvalidStateError:
        pass


class AgentResults:
    """How ``AgentSandbox`` turns a finished run into its ``ExecResult``."""

    if TYPE_CHECKING:  # given by AgentSandbox
        policy: Policy
        egress: Egress | None
        violation_log: ViolationLog
        runtime_name: str
        cold_start_ms: float
        unenforced_limits: list[str]
        one_shot: bool
        _dead: bool
        _ended_by: str | None
        _kill_reason: TerminationReason | None
        _cancelled: str | None

        _settling: concurrent.futures.Future[Any] | None

        def usage(self, peak: bool = True) -> IsolateUsage: ...
        def _collect_violations(self) -> None: ...
        def _redacted(self, data: bytes) -> bytes: ...

    def _finish_run(self, run: PendingRun, verdict: Verdict | None, error: str | None, interrupted: bool) -> ExecResult:
        elapsed = time.monotonic() - run.started
        after = self.usage()
        # The worker's account first: every refusal it reported before it is counted by then.
        egress = self.egress.take() if self.egress is not None else None
        self._collect_violations()
        report = self.violation_log.take()
        timeout = run.params.get("timeout")  # the run's own, when it had one shorter than the policy's
        limit = float(timeout) if isinstance(timeout, (int, float)) else self.policy.timeout_seconds
        return self._result(
            verdict, error, elapsed, run.before, after, report, run.execution_id, limit, egress, interrupted
        )

    def _result(
        self,
        verdict: Verdict | None,
        error: str | None,
        elapsed: float,
        before: IsolateUsage,
        after: IsolateUsage,
        report: ViolationReport,
        execution_id: str,
        timeout_s: float | None = None,
        egress_taken: tuple[list[EgressRequest], int] | None = None,
        interrupted: bool = False,
    ) -> ExecResult:
        said = verdict or Verdict()  # no verdict: the agent said nothing
        judged = judge(
            self.policy, said, error, before, after, report,
            killed_for=self._kill_reason, cancelled=self._cancelled, timeout_s=timeout_s, interrupted=interrupted,
        )  # fmt: skip
        reason, error, exit_code = judged.reason, judged.error, said.exit_code
        stdout, stderr = judged.stdout, judged.stderr
        cpu = None
        if after.cpu_seconds is not None and before.cpu_seconds is not None:
            cpu = max(0.0, after.cpu_seconds - before.cpu_seconds)
        cell = cell_fields(said.cell, said.interpreter_lost, error)
        egress: dict[str, Any] = {}
        if self.egress is not None:
            # A secret's value never leaves in a result: output, a cell's results, the error.
            stdout, stderr = self._redacted(stdout), self._redacted(stderr)
            cell = self.egress.redact_fields(cell)
            records, dropped = egress_taken or ([], 0)
            egress = {"egress_requests": records, "egress_requests_dropped": dropped,
                      "secrets_redacted": self.egress.redactor.take_count()}  # fmt: skip
        # A violation's error says it was killed, a close's or a cancel's that its caller ended it.
        if self._dead and not self.one_shot and reason != "violation" and self._cancelled is None:
            # A kept sandbox the run took down with it (a timeout, gVisor's memory limit is its whole
            # sandbox's): the run's error says what the caller has lost, and the next call says why.
            told, gone = cell["error"], "the sandbox has ended: its files, processes and interpreters are gone"
            cell["error"] = f"{told}; {gone}" if told else gone
            self._ended_by = f"{reason}: {told}" if told else reason
        return ExecResult(
            execution_id=execution_id,
            success=reason == "completed" and exit_code == 0,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            stdout_bytes=stdout,
            stderr_bytes=stderr,
            exit_code=exit_code,
            termination_reason=reason,
            security_violations=report.records,
            violation_counts=report.counts,
            violations_dropped=report.dropped,
            execution_time_seconds=round(elapsed, 6),
            cold_start_time_ms=round(self.cold_start_ms, 3),
            resource_usage=ResourceUsage(cpu_seconds=cpu, memory_peak_mb=after.memory_peak_mb),
            runtime_used=self.runtime_name,
            policy_digest=self.policy.digest,
            unenforced_limits=list(self.unenforced_limits),
            limits_reached=judged.reached,
            **cell,
            **egress,
        )

    def _await_account(self) -> None:
        """The last run's account taken before this one starts: taken later, it would take this
        run's egress records and violations with it, into a result nobody reads."""
        taking = self._settling
        if taking is None or taking.done():
            return
        if not BLOCKING_CALLER.get():
            raise SandboxError("another call to this sandbox is in progress (the last run's account is being taken)")
        concurrent.futures.wait([taking])  # a blocking caller's loop is its own
