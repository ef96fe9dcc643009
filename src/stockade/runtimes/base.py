"""The runtime interface: what every isolation backend (process, gVisor, microVM) offers.

A ``Runtime`` knows how to start, confine, connect and stop an isolate; the
isolate it starts is an ``AgentSandbox`` (``sandbox.py``), which talks to the
same guest agent in every runtime over one async channel (``channel.py``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import SandboxError
from ..policy import Policy
from .reaper import Reaper

if TYPE_CHECKING:
    from .sandbox import AgentSandbox


# How long past the policy's timeout the host waits for the agent's own verdict
# before it kills the isolate itself.
HOST_TIMEOUT_GRACE_S = 2.0
UNBOUNDED = float("inf")  # exec(timeout=UNBOUNDED): run until it ends or the sandbox closes
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/work", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}


@dataclass
class Availability:
    """Whether a runtime works on this host, and if not exactly why."""

    name: str
    available: bool
    isolation: str
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class IsolateUsage:
    """What the host measured of an isolate (cgroup counters), sampled around a run."""

    oom_kills: int = 0
    pids_refused: int = 0  # forks the cgroup's pids limit refused (pids.events "max")
    cpu_seconds: float | None = None
    memory_peak_mb: float | None = None


class Runtime(abc.ABC):
    name: str
    isolation: str
    egress_proxy = False  # whether it offers network_policy "allowlist" (the host's proxy on the isolate's lo)

    @abc.abstractmethod
    def detect(self) -> Availability:
        """Can this runtime run here? Never raises."""

    @abc.abstractmethod
    def start(self, policy: Policy) -> AgentSandbox:
        """Start an isolate under ``policy``; raises SandboxStartError naming the failed step."""

    def close(self) -> None:
        """Release runtime-wide resources (pools, helper processes); the one-shot isolates it
        disposed of are torn down first (a process that exits would otherwise end its reaper's
        thread halfway, and leave what that was removing)."""
        if self._reaper is not None:
            self._reaper.join(10.0)

    # -- one-shot isolates: taken, then disposed of (a pooled runtime overrides these) --------

    _reaper: Reaper | None = None

    def take_warm(self, policy: Policy) -> AgentSandbox | None:
        """A pre-built isolate for ``policy``, handed over without blocking, or None (no pool, no fit)."""
        return None

    def acquire(self, policy: Policy) -> AgentSandbox:
        """A fresh isolate for a one-shot run: a warm one when there is one, else started now."""
        return self.take_warm(policy) or self.start(policy)

    def warm_up(self) -> None:  # noqa: B027 - a runtime without a pool has nothing to warm
        """Start what its isolates are made from and fill its warm pool now (none: nothing)."""

    def refill(self) -> None:  # noqa: B027 - a runtime without a pool has nothing to refill
        """An isolate taken warm has been torn down: top the warm pool up (none: nothing)."""

    def dispose(self, sandbox: AgentSandbox) -> None:
        """Tear a one-shot isolate down without blocking the caller (on the runtime's reaper thread)."""
        if self._reaper is None:
            self._reaper = Reaper()
        self._reaper.put(sandbox)

    def pool_statistics(self) -> dict[str, int] | None:
        """The warm pool's counters (runtimes/pool.py ``statistics``); None without a pool."""
        return None

    def _probe(self, details: dict[str, Any]) -> Availability:
        """``detect``'s last word: available only if a sandbox under the default policy
        really starts and its agent answers; otherwise the reason is what failed."""
        try:
            with self.start(Policy()) as sandbox:
                sandbox.ping()
        except SandboxError as exc:  # a failed start, or an agent that did not answer
            return Availability(self.name, False, self.isolation, str(exc), details)
        return Availability(self.name, True, self.isolation, "", details)
