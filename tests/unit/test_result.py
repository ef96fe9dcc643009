"""ExecResult: seed 003's response shape, and an honest one-line summary."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from stockade import ExecResult, SecurityViolation

SEED_003_FIELDS = {
    "execution_id",
    "success",
    "stdout",
    "stderr",
    "exit_code",
    "error",
    "termination_reason",
    "security_violations",
    "execution_time_seconds",
    "cold_start_time_ms",
    "resource_usage",
    "runtime_used",
    "policy_digest",
}


def _result(**kw: object) -> ExecResult:
    base: dict[str, object] = {
        "success": False,
        "termination_reason": "violation",
        "runtime_used": "process",
        "policy_digest": "0" * 64,
    }
    base.update(kw)
    return ExecResult.model_validate(base)


def test_fields_match_the_spec() -> None:
    assert SEED_003_FIELDS <= set(ExecResult.model_fields)
    assert {"violation_type", "syscall", "severity", "detection_layer", "blocked", "description", "timestamp"} <= set(
        SecurityViolation.model_fields
    )


def test_unknown_termination_reason_refused() -> None:
    with pytest.raises(ValidationError):
        _result(termination_reason="fine")


def test_summary_names_blocked_calls_and_unenforced_limits() -> None:
    v = SecurityViolation(violation_type="blocked_syscall", syscall="ptrace")
    line = _result(exit_code=1, security_violations=[v, v], unenforced_limits=["memory_mb (no cgroup)"]).summary()
    assert "violation" in line and "2 blocked: ptrace" in line and "memory_mb" in line


def test_violation_ids_are_unique() -> None:
    a = SecurityViolation(violation_type="x")
    b = SecurityViolation(violation_type="x")
    assert a.violation_id != b.violation_id
