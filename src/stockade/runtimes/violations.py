"""A sandbox's violation reports, bounded: a run's first ones kept whole, every one counted.

Code can make blocked calls as fast as the host answers them: four threads
calling ``ptrace`` make 40,000 a second. A report that kept each one would
grow the host's memory, and the result, with them. Every runtime's reports
go through a ``ViolationLog`` instead: it keeps a run's first
``MAX_VIOLATION_RECORDS`` as ``SecurityViolation`` records and counts every
one by name (at most ``MAX_VIOLATION_NAMES`` names; the rest count under
``"other"``). Nothing in it grows with the number of calls.

A held sandbox can be reported to between runs: a process a run left running
goes on making calls. Those open the next run's report (``begin_run``), each
record marked ``between_runs``, rather than being reported nowhere.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from ..result import (
    MAX_VIOLATION_NAMES,
    MAX_VIOLATION_RECORDS,
    OTHER_VIOLATIONS,
    EgressRequest,
    ExecResult,
    SecurityViolation,
)


@dataclass
class ViolationReport:
    """What a run tried that was reported: its first records, and counts of them all."""

    records: list[SecurityViolation] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    blocked: int = 0  # how many of them were refused

    @property
    def dropped(self) -> int:
        """Counted, but past the records kept."""
        return sum(self.counts.values()) - len(self.records)


class ViolationLog:
    """The current run's report, fed from any thread (a supervisor's, a log reader's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report = ViolationReport()

    def tally(self, name: str, blocked: bool, build: Callable[[], SecurityViolation], times: int = 1) -> int:
        """Count ``times`` violations under ``name``; keep ``build()`` as their record while the
        run has room (past that it is never called). Returns how many refused calls the run has had."""
        with self._lock:
            report = self._report
            _count(report.counts, name, times)
            if blocked:
                report.blocked += times
            if len(report.records) < MAX_VIOLATION_RECORDS:
                report.records.append(build())
            return report.blocked

    def begin_run(self) -> None:
        """A run begins: what was counted since the last ``take`` (made between runs) opens
        its report, counted as its own (``max_violations`` included), each record kept
        marked ``between_runs``."""
        with self._lock:
            report = self._report
            report.records = [dataclasses.replace(r, between_runs=True) for r in report.records]

    def names(self) -> list[str]:
        """The names counted so far (the report stays)."""
        with self._lock:
            return list(self._report.counts)

    def take(self) -> ViolationReport:
        """The report so far; the log starts afresh for the next run."""
        with self._lock:
            report, self._report = self._report, ViolationReport()
            return report


@dataclass
class Leftovers:
    """What an isolate did outside any run's report (after its last run, or an MCP call's since
    the last): its violations, its egress requests (the first the worker kept) and how many more."""

    report: ViolationReport
    egress: list[EgressRequest] = field(default_factory=list)
    egress_dropped: int = 0


def _count(counts: dict[str, int], name: str, times: int) -> None:
    """``times`` more under ``name``: under ``OTHER_VIOLATIONS`` once ``MAX_VIOLATION_NAMES`` are counted."""
    if name not in counts and len(counts) >= MAX_VIOLATION_NAMES:
        name = OTHER_VIOLATIONS
    counts[name] = counts.get(name, 0) + times


MAX_LEFTOVER_EGRESS = 256  # egress records kept when reports are merged (each is bounded already)


def of_result(result: ExecResult) -> Leftovers:
    """What a run's result says it did, as a report no result carries (its caller never had it)."""
    blocked = sum(v.blocked for v in result.security_violations)
    report = ViolationReport(list(result.security_violations), dict(result.violation_counts), blocked)
    return Leftovers(report, list(result.egress_requests), result.egress_requests_dropped)


def merged(first: Leftovers, then: Leftovers) -> Leftovers:
    """Two reports as one, bounded as one is: ``first``'s records first."""
    report = ViolationReport(list(first.report.records), dict(first.report.counts), first.report.blocked)
    for record in then.report.records:
        if len(report.records) < MAX_VIOLATION_RECORDS:
            report.records.append(record)
    for name, count in then.report.counts.items():
        _count(report.counts, name, count)
    report.blocked += then.report.blocked
    egress = [*first.egress, *then.egress]
    dropped = first.egress_dropped + then.egress_dropped + max(0, len(egress) - MAX_LEFTOVER_EGRESS)
    return Leftovers(report, egress[:MAX_LEFTOVER_EGRESS], dropped)
