"""What the host asks the agent for a run: its params, and the rlimits the agent sets on it."""

from __future__ import annotations

from typing import Any

from ..errors import InvalidRequestError
from ..policy import Policy


def job_limits(policy: Policy, timeout: float | None = None) -> dict[str, int]:
    """The rlimits the agent sets on a run's processes (agent/runner.py ``apply_rlimits``).

    ``cpu_seconds`` is the hard CPU limit (SIGKILL): one past the policy's
    ``cpu_time_seconds`` (whose soft limit sends SIGXCPU first), or else a
    backstop one past the run's wall-clock timeout.
    """
    limits = {
        "max_file_size_bytes": policy.max_file_size_bytes,
        "max_open_files": policy.max_open_files,
        "max_processes": policy.pids_limit,
    }
    if policy.cpu_time_seconds is not None:
        limits["cpu_soft_seconds"] = policy.cpu_time_seconds
        limits["cpu_seconds"] = policy.cpu_time_seconds + 1
    elif timeout is not None:
        limits["cpu_seconds"] = int(timeout) + 1
    if policy.address_space_mb is not None:
        limits["address_space_bytes"] = policy.address_space_mb * 1024 * 1024
    return limits


def exec_params(argv: list[str], cwd: str | None = None) -> dict[str, Any]:
    """The agent's ``exec`` request for ``argv`` (before the run's common fields)."""
    return {"argv": list(argv), "cwd": cwd}


def code_request(code: str, language: str, session: str | None, stdin: bytes | str = b"") -> tuple[str, dict[str, Any]]:
    """The agent method and params for code: ``run_code``, or ``run_cell`` in a session's interpreter."""
    if session is None:
        return "run_code", code_params(code, language)
    if language != "python":
        raise InvalidRequestError(f"a session runs Python, not {language!r}: leave session out for {language}")
    if stdin:
        raise InvalidRequestError("a session's cells read no stdin: leave stdin out, or session")
    return "run_cell", {"code": code, "session": session}


def code_params(code: str, language: str = "python") -> dict[str, Any]:
    """The agent's ``run_code`` request for ``code`` (before the run's common fields)."""
    return {"code": code, "language": language}
