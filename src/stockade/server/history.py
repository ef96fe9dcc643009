"""What the dashboard shows of the past: recent executions, violations and cold starts.

An ``ExecutionListener`` of the controller: bounded deques filled on the
event loop as results come, read by ``GET /api/v1/dashboard``. Nothing of a
run's code, input or output is kept, only its outcome.

Each owner has deques of its own: one owner's runs (a loop of refused calls
makes 100 records in a run) must not age another's out of its dashboard.
A run keeps at most ``MAX_VIOLATIONS_PER_RUN`` violation records here (its
counts are in its execution entry). An admin sees every owner's, merged,
newest first.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..result import ExecResult, SecurityViolation

MAX_EXECUTIONS = 100  # per owner, and in an admin's merged view
MAX_VIOLATIONS = 100
MAX_VIOLATIONS_PER_RUN = 10
MAX_POINTS = 200  # cold-start points kept per owner and runtime
MAX_OWNERS = 256  # owners remembered; the one quiet longest is forgotten first


@dataclass
class _Owned:
    executions: deque[tuple[int, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=MAX_EXECUTIONS))
    violations: deque[tuple[int, dict[str, Any]]] = field(default_factory=lambda: deque(maxlen=MAX_VIOLATIONS))
    cold_starts: dict[str, deque[tuple[int, str, float]]] = field(default_factory=dict)  # runtime -> points


class History:
    def __init__(self) -> None:
        self._owners: OrderedDict[str, _Owned] = OrderedDict()
        self._order = itertools.count()  # entries of different owners merge in the order they came

    def _of(self, owner: str) -> _Owned:
        owned = self._owners.get(owner)
        if owned is None:
            owned = self._owners[owner] = _Owned()
            while len(self._owners) > MAX_OWNERS:
                self._owners.popitem(last=False)
        self._owners.move_to_end(owner)
        return owned

    def execution(self, owner: str, agent_id: str | None, result: ExecResult, cold_start: bool = True) -> None:
        """Keep a finished run; ``cold_start``: its cold start is its isolate's own (a held
        sandbox's later runs repeat their first's, which is on the chart already)."""
        owned = self._of(owner)
        now = datetime.now(UTC).isoformat()
        owned.executions.appendleft(
            (
                next(self._order),
                {
                    "execution_id": result.execution_id,
                    "agent_id": agent_id,
                    "runtime_used": result.runtime_used,
                    "success": result.success,
                    "termination_reason": result.termination_reason,
                    "exit_code": result.exit_code,
                    "execution_time_seconds": result.execution_time_seconds,
                    "cold_start_time_ms": result.cold_start_time_ms,
                    "violations": sum(result.violation_counts.values()) or len(result.security_violations),
                    "finished_at": now,
                },
            )
        )
        self.violations(owner, agent_id, result.execution_id, result.security_violations)
        if cold_start and result.cold_start_time_ms > 0:
            points = owned.cold_starts.setdefault(result.runtime_used, deque(maxlen=MAX_POINTS))
            points.append((next(self._order), now, round(result.cold_start_time_ms, 3)))

    def violations(
        self, owner: str, agent_id: str | None, execution_id: str | None, records: Iterable[SecurityViolation]
    ) -> None:
        """Keep the first of ``records`` (a run's, or what a held sandbox did after its last run)."""
        owned = self._of(owner)
        for v in itertools.islice(records, MAX_VIOLATIONS_PER_RUN):
            owned.violations.appendleft(
                (
                    next(self._order),
                    {
                        "execution_id": execution_id,
                        "agent_id": agent_id,
                        "violation_type": v.violation_type,
                        "syscall": v.syscall,
                        "severity": v.severity,
                        "detection_layer": v.detection_layer,
                        "timestamp": v.timestamp,
                        "between_runs": v.between_runs,
                    },
                )
            )

    def snapshot(self, visible: Callable[[str], bool]) -> dict[str, Any]:
        """What an owner may see (``visible(owner)``): another's runs are not shown, as in ``status``."""
        seen = [owned for owner, owned in self._owners.items() if visible(owner)]

        def newest(entries: Iterable[Iterable[tuple[int, dict[str, Any]]]], most: int) -> list[dict[str, Any]]:
            merged = heapq.merge(*entries, key=lambda entry: -entry[0])  # each deque is newest first
            return [entry for _, entry in itertools.islice(merged, most)]

        charts: dict[str, list[tuple[int, str, float]]] = {}
        for owned in seen:
            for runtime, points in owned.cold_starts.items():
                charts.setdefault(runtime, []).extend(points)
        return {
            "recent_executions": newest((o.executions for o in seen), MAX_EXECUTIONS),
            "recent_violations": newest((o.violations for o in seen), MAX_VIOLATIONS),
            "cold_start_ms": {
                runtime: [[when, ms] for _, when, ms in sorted(points)[-MAX_POINTS:]]
                for runtime, points in sorted(charts.items())
            },
        }
