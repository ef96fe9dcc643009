"""The two protocols of the seam: a ``Placement`` hands out ``Isolate``s.

An isolate is what ``AsyncSandbox`` is on this host: async calls, one at a time,
and ``aclose`` that always releases everything. ``node`` says where it runs
(``local``, or a Ray node's id), so a result can always be traced to a machine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from ..isolation import LEVELS, rank, trust_map

if TYPE_CHECKING:
    from ..policy import Policy
    from ..result import ExecResult
    from ..runtimes.verdict import OutputCallback

# The runtime of each isolation level (runtimes/manager.py has the same map for this host).
LEVEL_RUNTIME = {"none": "fake", "process": "process", "gvisor": "gvisor", "microvm": "microvm"}
DEFAULT_RUNTIME = "process"


class Isolate(Protocol):
    runtime: str
    node: str

    async def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult: ...

    async def run_code(
        self,
        code: str,
        language: str = "python",
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
        session: str | None = None,
    ) -> ExecResult:
        """``session``: a cell of that stateful interpreter (variables kept between calls)."""
        ...

    async def close_interpreter(self, session: str) -> bool: ...

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None: ...

    async def read_file(self, path: str, max_bytes: int | None = None) -> bytes: ...

    async def list_dir(self, path: str) -> list[dict[str, Any]]: ...

    async def aclose(self) -> None: ...


class Placement(Protocol):
    name: str

    async def connect(self) -> dict[str, Any]:
        """Reach where isolates run and get ready to place them; ``describe()`` after. Raises
        ``RuntimeUnavailableError`` saying why when that place cannot be reached."""
        ...

    async def acquire(self, policy: Policy) -> Isolate:
        """An isolate for ``policy``: from a warm pool when one matches, else started now."""
        ...

    async def release(self, isolate: Isolate) -> None:
        """Give ``isolate`` back: it is destroyed, never reused (idempotent)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the placement is and where it can put isolates, for ``/health`` and ``doctor``."""
        ...

    async def check(self) -> dict[str, Any]:
        """``describe()`` after a cheap fresh look at whether isolates can be placed (``/health``)."""
        ...

    async def aclose(self) -> None: ...


async def one_shot(
    placement: Placement,
    policy: Policy,
    *,
    argv: list[str] | None = None,
    code: str | None = None,
    language: str = "python",
    stdin: bytes | str = b"",
    on_output: OutputCallback | None = None,
) -> ExecResult:
    """One execution in a fresh isolate of ``placement``: acquire, run, release (whatever happens)."""
    if (argv is None) == (code is None):
        raise ValueError("give argv or code, not both")
    isolate = await placement.acquire(policy)
    try:
        if argv is not None:
            return await isolate.exec(argv, stdin=stdin, on_output=on_output)
        return await isolate.run_code(code or "", language, stdin=stdin, on_output=on_output)
    finally:
        await placement.release(isolate)


def runtime_choices(policy: Policy) -> tuple[list[str], str]:
    """The runtimes that may serve ``policy``, strongest first, and why (for a refusal).

    A policy that names a runtime or a level gets exactly that; one that names a
    trust gets the levels its trust accepts (the strongest a node offers wins);
    otherwise the default. As ``RuntimeManager.select`` on one host, without
    asking this host what it has: the nodes say what they have.
    """
    if policy.runtime or policy.isolation:
        name = policy.runtime or LEVEL_RUNTIME[policy.isolation or DEFAULT_RUNTIME]
        return [name], f"runtime {name}"
    if policy.trust:
        minimum = trust_map()[policy.trust]
        names = [LEVEL_RUNTIME[level] for level in reversed(LEVELS) if level != "none" and rank(level) >= rank(minimum)]
        return names, f"trust {policy.trust!r} (at least {minimum})"
    return [DEFAULT_RUNTIME], f"runtime {DEFAULT_RUNTIME}"
