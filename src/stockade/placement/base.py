"""The two protocols of the seam: a ``Placement`` hands out ``Isolate``s.

An isolate takes async calls, one at a time, runs in callback form for the
daemon's event loop, and ``aclose`` always releases everything. ``node`` says
where it runs (``local``, or a Ray node's id), so a result can always be traced
to a machine. The daemon's controller sees only these two (docs/scale-out.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ..isolation import LEVELS, rank, trust_map

if TYPE_CHECKING:
    from ..policy import Policy
    from ..result import ExecResult
    from ..runtimes.publish import AsyncTurn
    from ..runtimes.spawned import Process
    from ..runtimes.verdict import OutputCallback
    from ..runtimes.violations import Leftovers

log = logging.getLogger("stockade.placement")

# The runtime of each isolation level (runtimes/manager.py has the same map for this host).
LEVEL_RUNTIME = {"none": "fake", "process": "process", "gvisor": "gvisor", "microvm": "microvm"}
DEFAULT_RUNTIME = "process"


class RunHandle(Protocol):
    def abort(self) -> None:
        """Stop waiting for the run: its ``done`` is not called (the run is given up)."""


class Isolate(Protocol):
    """One live isolate, wherever it runs: what the daemon's controller, the conformance suite
    and a placement's user drive. ``AgentSandbox`` is the one on this host; ``RayIsolate`` one
    on a Ray node. Calls run one at a time (a second one while a run is going is refused)."""

    runtime_name: str
    node: str  # "local", or the node's id
    scratch_dir: str  # a writable directory inside it
    policy: Policy
    one_shot: bool  # a one-shot run's isolate: ended with its run (set before the run starts)

    async def aexec(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult: ...

    async def arun_code(
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

    def start_run(
        self,
        method: str,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None,
        done: Callable[[ExecResult | Exception], None],
        execution_id: str | None = None,
    ) -> RunHandle:
        """A run (``exec_params``/``code_params``) on the running loop, in callback form: ``done``
        gets its result or the exception that stopped it, once, after this returns, unless the
        handle's ``abort`` comes first. A run that cannot start raises here."""
        ...

    async def arun_request(
        self,
        method: str,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """``start_run``, awaited."""
        ...

    async def aclose_interpreter(self, session: str) -> bool: ...

    async def awrite_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None: ...

    async def aread_file(self, path: str, max_bytes: int | None = None) -> bytes: ...

    async def alist_dir(self, path: str) -> list[dict[str, Any]]: ...

    def spawn(
        self, argv: list[str], *, stdin: bytes | str = b"", env: dict[str, str] | None = None, cwd: str | None = None
    ) -> Process:
        """A background process (blocking: from a thread). Refused where the isolate has none."""
        ...

    def processes(self) -> list[dict[str, Any]]:
        """Its background processes, ``{handle, pid, argv, running, exit_code}`` (blocking: from a
        thread). Refused where the isolate has none."""
        ...

    def publish(self, spec: int | str, *, turn: AsyncTurn | None = None) -> tuple[str, int]:
        """Forward a host loopback port to a port on the isolate's loopback (``Sandbox.publish``):
        the host address and port (blocking: from a thread). Refused where the isolate is not on
        this host. ``turn``: the queue of an owner whose calls are made on an event loop, which a
        port relayed through the agent takes its turns in (``runtimes/publish.py``)."""
        ...

    async def ainterrupt(self, session: str | None = None) -> bool:
        """Interrupt the run in progress (SIGINT: a cell raises KeyboardInterrupt and its
        interpreter keeps its state), keeping the isolate; False when there is none to interrupt
        (``session``: when it is not a cell of that interpreter)."""
        ...

    def cancel(self, why: str) -> None:
        """End the isolate for its caller: a run in progress is answered ``killed``, ``why`` its error."""
        ...

    def kill(self) -> None:
        """End everything in the isolate now (on the event loop; idempotent)."""
        ...

    async def settled(self) -> None:
        """Return once no call is in flight (a call given up by its caller included)."""
        ...

    async def atake_report(self) -> Leftovers:
        """What the isolate did since its last run's report (a process a run left running, a
        background one): the violations and egress requests, taken once the last run's are."""
        ...

    async def aclose(self) -> None:
        """Release everything the isolate holds (idempotent)."""
        ...


class Placement(Protocol):
    name: str
    remote: bool  # its isolates run on other machines: reached at the daemon's start, probed by /health

    async def connect(self) -> dict[str, Any]:
        """Reach where isolates run and get ready to place them (warm pools started); ``describe()``
        after. Raises saying why when that place cannot be reached."""
        ...

    def runtime_for(self, policy: Policy) -> str:
        """The runtime that will run ``policy``'s isolate; raises ``RuntimeUnavailableError`` now
        for a policy this placement can tell it cannot serve."""
        ...

    def take_warm(self, policy: Policy) -> Isolate | None:
        """A warm isolate for ``policy`` handed over in this loop turn, without blocking, or None."""
        ...

    async def acquire(self, policy: Policy) -> Isolate:
        """An isolate for ``policy``: from a warm pool when one matches, else started now. A caller
        cancelled meanwhile leaves nothing behind (what was started is released)."""
        ...

    async def release(self, isolate: Isolate) -> None:
        """Give ``isolate`` back: it is destroyed, never reused (idempotent)."""
        ...

    def dispose(self, isolate: Isolate) -> None:
        """Release a one-shot isolate (killed already) in the background, from the event loop."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the placement is and where it can put isolates, without asking anyone (``doctor``)."""
        ...

    async def check(self) -> dict[str, Any]:
        """``describe()`` after a cheap fresh look at whether isolates can be placed (``/health``)."""
        ...

    async def runtimes(self) -> list[dict[str, Any]]:
        """Each runtime it can place and whether it works (``Availability`` fields), for ``runtimes``."""
        ...

    def pool_statistics(self) -> dict[str, dict[str, int]]:
        """The warm pools this process keeps, by runtime (the metrics' ``pool_*``)."""
        ...

    async def aclose(self) -> None: ...


async def reach(placement: Placement) -> dict[str, Any]:
    """``connect``, with a place that cannot be reached reported, not raised: what was found.

    The daemon still starts, says so in its log and in ``/health``, and tries
    again on the next request.
    """
    try:
        return await placement.connect()
    except Exception as exc:  # noqa: BLE001 - told, and told again by describe()
        log.warning("placement %s: %s", placement.name, exc)
    return placement.describe()


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
            return await isolate.aexec(argv, stdin=stdin, on_output=on_output)
        return await isolate.arun_code(code or "", language, stdin=stdin, on_output=on_output)
    finally:
        await placement.release(isolate)


def runtime_choices(policy: Policy) -> tuple[list[str], str]:
    """The runtimes that may serve ``policy``, in the order they are preferred, and why (for a refusal).

    A policy that names a runtime or a level gets exactly that; one that names a
    trust gets the levels its trust accepts, its own level first (the first a node offers wins);
    otherwise the default. As ``RuntimeManager.select`` on one host, without
    asking this host what it has: the nodes say what they have.
    """
    if policy.runtime or policy.isolation:
        name = policy.runtime or LEVEL_RUNTIME[policy.isolation or DEFAULT_RUNTIME]
        return [name], f"runtime {name}"
    if policy.trust:
        minimum = trust_map()[policy.trust]
        names = [LEVEL_RUNTIME[level] for level in LEVELS if level != "none" and rank(level) >= rank(minimum)]
        return names, f"trust {policy.trust!r} (at least {minimum})"
    return [DEFAULT_RUNTIME], f"runtime {DEFAULT_RUNTIME}"
