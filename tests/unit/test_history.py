"""The dashboard's history: each owner's own, bounded, never aged out by another owner's runs."""

from __future__ import annotations

from stockade.result import ExecResult, SecurityViolation
from stockade.server.history import MAX_EXECUTIONS, MAX_OWNERS, MAX_VIOLATIONS_PER_RUN, History


def _run(violations: int = 0, cold_ms: float = 0.0, name: str = "ptrace") -> ExecResult:
    records = [SecurityViolation(violation_type="syscall_blocked", syscall=name) for _ in range(violations)]
    return ExecResult(success=True, termination_reason="completed", exit_code=0, runtime_used="process",
                      policy_digest="d", security_violations=records, cold_start_time_ms=cold_ms,
                      violation_counts={name: violations} if violations else {})  # fmt: skip


def test_one_owners_runs_never_age_anothers_out() -> None:
    history = History()
    history.execution("uid 1000", "victim", _run(violations=1, name="mount", cold_ms=5.0))
    for _ in range(3 * MAX_EXECUTIONS):  # another owner's loop of runs, each with a flood of refused calls
        history.execution("uid 65534", "cover", _run(violations=100, cold_ms=7.0))
    victim = history.snapshot(lambda owner: owner == "uid 1000")
    assert [e["agent_id"] for e in victim["recent_executions"]] == ["victim"]
    assert [v["syscall"] for v in victim["recent_violations"]] == ["mount"]
    assert victim["cold_start_ms"] == {"process": [[victim["recent_executions"][0]["finished_at"], 5.0]]}
    other = history.snapshot(lambda owner: owner == "uid 65534")
    assert len(other["recent_executions"]) == MAX_EXECUTIONS
    assert "owner" not in other["recent_executions"][0]


def test_a_run_keeps_only_its_first_violations_and_an_admin_sees_all_owners_newest_first() -> None:
    history = History()
    history.execution("a", "first", _run(violations=100))
    history.execution("b", "second", _run(violations=1, name="unshare"))
    everyone = history.snapshot(lambda owner: True)
    assert [e["agent_id"] for e in everyone["recent_executions"]] == ["second", "first"]
    assert [v["agent_id"] for v in everyone["recent_violations"]] == ["second"] + ["first"] * MAX_VIOLATIONS_PER_RUN
    assert everyone["recent_executions"][1]["violations"] == 100  # counted whole, listed in part
    assert history.snapshot(lambda owner: False) == {"recent_executions": [], "recent_violations": [],
                                                      "cold_start_ms": {}}  # fmt: skip


def test_owners_are_bounded_the_quietest_forgotten_first() -> None:
    history = History()
    history.execution("kept", None, _run())
    for n in range(MAX_OWNERS - 1):
        history.execution(f"owner {n}", None, _run())
    history.execution("kept", None, _run())  # heard from again: the quietest is now "owner 0"
    history.execution("one more", None, _run())
    assert len(history.snapshot(lambda owner: owner == "kept")["recent_executions"]) == 2
    assert history.snapshot(lambda owner: owner == "owner 0")["recent_executions"] == []
    assert len(history.snapshot(lambda owner: owner == "owner 1")["recent_executions"]) == 1
