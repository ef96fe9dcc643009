"""What the host asks the agent for a run: its params, and the rlimits the agent sets on it."""

from __future__ import annotations

import base64
from typing import Any

from ..agent.sessions import INTERRUPT_GRACE_S, MAX_SESSION_NAME
from ..errors import InvalidRequestError, PolicyError
from ..limits import check_code, check_timeout
from ..policy import Policy
from .base import HOST_TIMEOUT_GRACE_S, UNBOUNDED

_FOREVER_S = 10.0 * 365 * 24 * 3600  # a component's run: no deadline


def job_limits(policy: Policy, timeout: float | None = None, *, forks_counted: bool = False) -> dict[str, int]:
    """The rlimits the agent sets on a run's processes (agent/runner.py ``apply_rlimits``).

    ``cpu_seconds`` is the hard CPU limit (SIGKILL): one past the policy's
    ``cpu_time_seconds`` (whose soft limit sends SIGXCPU first), or else a
    backstop one past the run's wall-clock timeout. ``forks_counted``: the
    isolate's cgroup enforces pids_limit and counts the forks it refuses (the
    result's ``limits_reached``); RLIMIT_NPROC, which counts the same tasks but
    refuses first and uncounted, then stands one above it, as a backstop.
    """
    limits = {
        "max_file_size_bytes": policy.max_file_size_bytes,
        "max_open_files": policy.max_open_files,
        "max_processes": policy.pids_limit + 1 if forks_counted else policy.pids_limit,
    }
    if policy.cpu_time_seconds is not None:
        limits["cpu_soft_seconds"] = policy.cpu_time_seconds
        limits["cpu_seconds"] = policy.cpu_time_seconds + 1
    elif timeout is not None:
        limits["cpu_seconds"] = int(timeout) + 1
    if policy.address_space_mb is not None:
        limits["address_space_bytes"] = policy.address_space_mb * 1024 * 1024
    return limits


def check_call_timeout(timeout: float | None, policy: Policy) -> None:
    """A call's own ``timeout`` may shorten its policy's, never lengthen it (``PolicyError``)."""
    if timeout is not None and timeout != UNBOUNDED and timeout > policy.timeout_seconds:
        # As typed: 1000000, not 1e+06 (a whole number of up to 16 digits; past that, as Python writes it).
        shown = f"{timeout:.0f}" if float(timeout).is_integer() and abs(timeout) < 1e16 else repr(timeout)
        raise PolicyError(
            f"timeout={shown} is above the policy's timeout_seconds={policy.timeout_seconds:g}: "
            "a call may shorten its run, not lengthen it (raise timeout_seconds in the policy)"
        )


def run_params(
    params: dict[str, Any],
    policy: Policy,
    stdin: bytes,
    env: dict[str, str],
    timeout: float | None,
    stream: bool,
    one_shot: bool,
    forks_counted: bool = False,
) -> float:
    """Complete a run request's ``params`` (``exec_params`` or ``code_request``'s) with what
    every run carries; how long the host waits for its answer. ``timeout`` may shorten the
    policy's, never lengthen it; ``UNBOUNDED`` is a long-lived component's run: no deadline,
    output streamed and never cut."""
    check_timeout(timeout)
    common = {"env": env, "stdin": base64.b64encode(stdin).decode() if stdin else ""}
    if timeout == UNBOUNDED:
        params.update(common, stream=True, collect=False, limits=job_limits(policy, forks_counted=forks_counted))
        return _FOREVER_S
    check_call_timeout(timeout, policy)
    timeout = timeout or policy.timeout_seconds
    wait = timeout + HOST_TIMEOUT_GRACE_S
    if "session" in params:
        wait += INTERRUPT_GRACE_S  # a cell past its timeout is interrupted first, then killed
    if one_shot:
        params["last"] = True  # the agent forks no runner ahead for a next run
    params.update(
        common,
        timeout=timeout,
        max_output_bytes=policy.max_output_bytes,
        stream=stream,
        limits=job_limits(policy, timeout, forks_counted=forks_counted),
    )
    return wait


def exec_params(argv: list[str], cwd: str | None = None) -> dict[str, Any]:
    """The agent's ``exec`` request for ``argv`` (before the run's common fields)."""
    if cwd is not None and not isinstance(cwd, str):
        raise TypeError(f"cwd must be a path inside the sandbox (str), not {type(cwd).__name__}")
    if cwd is not None and "\0" in cwd:
        raise InvalidRequestError(f"cwd holds a NUL byte, which no path can: {cwd[:64]!r}")
    return {"argv": list(argv), "cwd": cwd}


def check_session(session: Any) -> str:
    """An interpreter's name: 1 to MAX_SESSION_NAME printable characters; InvalidRequestError if not."""
    if not isinstance(session, str) or not 0 < len(session) <= MAX_SESSION_NAME or not session.isprintable():
        got = repr(session[:80]) if isinstance(session, str) else f"{str(session)[:80]} ({type(session).__name__})"
        raise InvalidRequestError(f"session must be a name of 1 to {MAX_SESSION_NAME} printable characters, not {got}")
    return session


def code_request(code: str, language: str, session: str | None, stdin: bytes | str = b"") -> tuple[str, dict[str, Any]]:
    """The agent method and params for code: ``run_code``, or ``run_cell`` in a session's interpreter."""
    check_code(code, language)
    if session is None:
        return "run_code", code_params(code, language)
    check_session(session)
    if language != "python":
        raise InvalidRequestError(f"a session runs Python, not {language!r}: leave session out for {language}")
    if stdin:
        raise InvalidRequestError("a session's cells read no stdin: leave stdin out, or session")
    return "run_cell", {"code": code, "session": session}


def code_params(code: str, language: str = "python") -> dict[str, Any]:
    """The agent's ``run_code`` request for ``code`` (before the run's common fields)."""
    return {"code": code, "language": language}
