"""A run's violation report stays bounded however many calls it counts, and the policy's
flood limit (``max_violations``) and ``on_violation`` end the run when they say so."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from stockade import Policy, PolicyError, SandboxError, SecurityViolation
from stockade.result import MAX_VIOLATION_NAMES, MAX_VIOLATION_RECORDS, OTHER_VIOLATIONS, violation_key
from stockade.runtimes.base import IsolateUsage
from stockade.runtimes.sandbox import AgentSandbox
from stockade.runtimes.violations import ViolationLog


def refused(name: str = "ptrace") -> SecurityViolation:
    return SecurityViolation(violation_type="blocked_syscall", syscall=name)


def test_the_first_records_are_kept_and_every_call_counted() -> None:
    log = ViolationLog()
    built = 0

    def build() -> SecurityViolation:
        nonlocal built
        built += 1
        return refused()

    for _ in range(MAX_VIOLATION_RECORDS * 5):
        log.tally("ptrace", True, build)
    log.tally("unshare", False, lambda: SecurityViolation(violation_type="sensitive_syscall", blocked=False))
    report = log.take()
    assert len(report.records) == MAX_VIOLATION_RECORDS and built == MAX_VIOLATION_RECORDS  # past the cap: none made
    assert report.counts == {"ptrace": MAX_VIOLATION_RECORDS * 5, "unshare": 1}
    assert report.blocked == MAX_VIOLATION_RECORDS * 5 and report.dropped == MAX_VIOLATION_RECORDS * 4 + 1
    assert log.take().counts == {}  # taken: the next run starts afresh


def test_names_are_bounded_too() -> None:
    # Unknown syscall numbers are named by number: code could make a billion names.
    log = ViolationLog()
    for nr in range(MAX_VIOLATION_NAMES + 500):
        log.tally(f"syscall_{nr}", True, refused)
    counts = log.take().counts
    assert len(counts) == MAX_VIOLATION_NAMES + 1 and counts[OTHER_VIOLATIONS] == 500
    assert sum(counts.values()) == MAX_VIOLATION_NAMES + 500


def test_what_came_between_runs_opens_the_next_runs_report_marked() -> None:
    log = ViolationLog()
    log.tally("ptrace", True, refused)
    log.take()  # a run ended
    log.tally("ptrace", True, refused)  # a process it left running
    log.tally("mount", True, lambda: refused("mount"))
    log.begin_run()
    log.tally("ptrace", True, refused)  # the run's own
    report = log.take()
    assert report.counts == {"ptrace": 2, "mount": 1} and report.blocked == 3
    assert [(v.syscall, v.between_runs) for v in report.records] == [
        ("ptrace", True),
        ("mount", True),
        ("ptrace", False),
    ]
    log.begin_run()
    assert log.take().counts == {}  # reported once


class _Reporting(AgentSandbox):
    """Only the reporting half of a sandbox: violations are fed to it by hand."""

    runtime_name = "unit"

    def __init__(self, policy: Policy, conn: socket.socket) -> None:
        super().__init__(policy, conn, 0.0)
        self.kills = 0

    def kill(self) -> None:
        self.kills += 1

    def _release(self) -> None:
        pass

    def _record_violation(self, violation: SecurityViolation) -> None:
        """As a runtime reports one (a supervisor, a log reader): counted, its record kept while there is room."""
        self._count_violation(violation_key(violation), violation.blocked, lambda: violation)


@pytest.fixture
def conn() -> Iterator[socket.socket]:
    a, b = socket.socketpair()
    with a, b:
        yield a


def test_max_violations_ends_the_run_past_the_limit(conn: socket.socket) -> None:
    sb = _Reporting(Policy(max_violations=3), conn)
    for _ in range(3):
        sb._record_violation(refused())
    sb._record_violation(SecurityViolation(violation_type="sensitive_syscall", syscall="unshare", blocked=False))
    assert sb.kills == 0  # three refused calls are within the limit; an allowed one is not refused
    sb._record_violation(refused())
    assert sb.kills == 1 and sb._kill_reason == "violation"
    for _ in range(1000):
        sb._record_violation(refused())  # the flood goes on until the isolate is gone: killed once
    assert sb.kills == 1
    report = sb.violation_log.take()
    result = sb._result(None, None, 0.0, IsolateUsage(), IsolateUsage(), report, "id")
    assert result.termination_reason == "violation"
    assert result.violation_counts == {"ptrace": 1004, "unshare": 1} and result.violations_dropped == 5
    assert result.error == "killed after 1004 refused calls, more than max_violations=3 (ptrace, unshare)"
    assert "1005 blocked: ptrace, unshare" in result.summary()


def test_without_a_limit_a_flood_is_only_counted(conn: socket.socket) -> None:
    sb = _Reporting(Policy(), conn)
    for _ in range(MAX_VIOLATION_RECORDS + 10):
        sb._record_violation(refused())
    assert sb.kills == 0 and sb._kill_reason is None


def test_on_violation_kill_ends_the_run_at_the_first_refused_call(conn: socket.socket) -> None:
    sb = _Reporting(Policy(on_violation="kill", max_violations=100), conn)
    sb._record_violation(SecurityViolation(violation_type="sensitive_syscall", syscall="unshare", blocked=False))
    assert sb.kills == 0
    sb._record_violation(refused())
    assert sb._kill_reason == "violation"
    result = sb._result(None, None, 0.0, IsolateUsage(), IsolateUsage(), sb.violation_log.take(), "id")
    assert result.error == "killed after a policy violation (unshare, ptrace)"


def test_max_violations_is_validated() -> None:
    assert Policy().max_violations is None
    assert Policy(max_violations=0).max_violations == 0
    with pytest.raises(PolicyError, match="max_violations"):
        Policy.build(max_violations=-1)


def test_calls_between_runs_count_toward_the_next_runs_limit(conn: socket.socket) -> None:
    sb = _Reporting(Policy(max_violations=3), conn)
    for _ in range(2):
        sb._record_violation(refused())  # between runs: within the limit
    sb.violation_log.begin_run()
    sb._record_violation(refused())
    assert sb.kills == 0
    sb._record_violation(refused())  # the fourth of the report
    assert sb.kills == 1 and sb._kill_reason == "violation"


def test_a_sandbox_killed_between_runs_says_for_what(conn: socket.socket) -> None:
    sb = _Reporting(Policy(on_violation="kill"), conn)
    sb._record_violation(refused())  # no run going: nothing else would report it
    with pytest.raises(SandboxError, match=r"^the isolate was killed after a policy violation \(ptrace\); start"):
        sb.exec(["true"])
