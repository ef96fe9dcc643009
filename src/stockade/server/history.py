"""What the dashboard shows of the past: recent executions, violations and cold starts.

An ``ExecutionListener`` of the controller: bounded deques filled on the
event loop as results come, read by ``GET /api/v1/dashboard``. Nothing of a
run's code, input or output is kept, only its outcome.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..result import ExecResult

MAX_EXECUTIONS = 100
MAX_VIOLATIONS = 100
MAX_POINTS = 200  # cold-start points kept per runtime


class History:
    def __init__(self) -> None:
        self.executions: deque[dict[str, Any]] = deque(maxlen=MAX_EXECUTIONS)
        self.violations: deque[dict[str, Any]] = deque(maxlen=MAX_VIOLATIONS)
        self.cold_starts: dict[str, deque[tuple[str, str, float]]] = {}  # runtime -> (owner, when, ms)

    def execution(self, owner: str, agent_id: str | None, result: ExecResult, cold_start: bool = True) -> None:
        """Keep a finished run; ``cold_start``: its cold start is its isolate's own (a held
        sandbox's later runs repeat their first's, which is on the chart already)."""
        now = datetime.now(UTC).isoformat()
        self.executions.appendleft(
            {
                "owner": owner,
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
            }
        )
        for v in result.security_violations[:MAX_VIOLATIONS]:
            self.violations.appendleft(
                {
                    "owner": owner,
                    "execution_id": result.execution_id,
                    "agent_id": agent_id,
                    "violation_type": v.violation_type,
                    "syscall": v.syscall,
                    "severity": v.severity,
                    "detection_layer": v.detection_layer,
                    "timestamp": v.timestamp,
                }
            )
        if cold_start and result.cold_start_time_ms > 0:
            points = self.cold_starts.setdefault(result.runtime_used, deque(maxlen=MAX_POINTS))
            points.append((owner, now, round(result.cold_start_time_ms, 3)))

    def snapshot(self, visible: Callable[[str], bool]) -> dict[str, Any]:
        """What an owner may see (``visible(owner)``): another's runs are not shown, as in ``status``."""

        def mine(entries: deque[dict[str, Any]]) -> list[dict[str, Any]]:
            return [{k: v for k, v in e.items() if k != "owner"} for e in entries if visible(e["owner"])]

        return {
            "recent_executions": mine(self.executions),
            "recent_violations": mine(self.violations),
            "cold_start_ms": {
                runtime: [[when, ms] for owner, when, ms in points if visible(owner)]
                for runtime, points in self.cold_starts.items()
            },
        }
