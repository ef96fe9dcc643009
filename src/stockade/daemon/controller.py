"""The daemon's controller: owns the runtimes and every live sandbox, whatever the transport.

Its methods take a request model (``protocol/models.py``) and a ``Caller`` and
return an answer model; both doors serve them through one method table
(``methods.py``). Where isolates come from is all a ``Placement`` says
(``placement/``): this host's runtimes and warm pools, or a Ray cluster's
nodes; the controller drives the ``Isolate``s it hands out on the event loop,
in callback form, whichever it is. A fixed
number of sandbox slots (held sandboxes and running one-shot executions)
bounds what the daemon asks of the host; a bounded queue waits for a slot,
and beyond it callers get "busy". This module holds what is shared; the
one-shot runs are ``oneshot.py``'s, the held sandboxes ``held.py``'s.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from ..errors import DaemonBusyError, PolicyError, SandboxError
from ..placement import Isolate, Placement, open_placement
from ..placement.config import LocalPlacementConfig
from ..placement.local import LocalPlacement
from ..policy import Policy
from ..protocol.models import (
    ActiveSandbox,
    Caller,
    Empty,
    ExecuteRequest,
    SelfTest,
    Status,
)
from ..result import ExecResult
from ..runtimes.manager import RuntimeManager
from ..runtimes.violations import Leftovers
from .answers import AnswerBudget
from .background import BackgroundProcesses, process_infos
from .config import DaemonConfig
from .held import Held, HeldSandboxes
from .held_calls import HeldCalls
from .oneshot import OneShotRuns, Running
from .slots import Slots

T = TypeVar("T")
log = logging.getLogger("stockade.daemon")


class ExecutionListener(Protocol):
    """Told of every finished ``execute`` (metrics, the audit log, the dashboard's history), and
    of a held sandbox's life: made, a background process started in it, ended.

    Called on the event loop, in the turn the result is ready: it must not block.
    """

    def execution(
        self, caller: Caller, agent_id: str | None, result: ExecResult, held: bool = False, cold_start: bool = True
    ) -> None:
        """``held``: a held sandbox's run; ``cold_start``: the result's cold start is this
        isolate's first (a held sandbox's later runs repeat it)."""

    def sandbox_event(self, caller: Caller, event: str, **fields: Any) -> None:
        """``sandbox.create``, ``sandbox.spawn``: metadata of it only (no argument, no input)."""

    def sandbox_ended(
        self, caller: Caller, agent_id: str | None, sandbox_id: str, ended: str, runs: int, leftovers: Leftovers | None
    ) -> None:
        """A held sandbox's end (``ended``: why), with what it did after its last run (a process
        that run left running, a background one): its violations and egress, None when they
        could not be taken (its isolate lost)."""


class Controller(OneShotRuns, HeldSandboxes, HeldCalls, BackgroundProcesses):
    def __init__(
        self, config: DaemonConfig, manager: RuntimeManager | None = None, placement: Placement | None = None
    ) -> None:
        self.config = config
        # This daemon's run, drawn at its start: ``status`` reports it, and the ids of the
        # sandboxes it holds carry its first 8 digits, so that a later daemon can tell a
        # sandbox lost with this one from one that never was (held.py).
        self.instance_id = str(uuid.uuid4())
        self.listeners: list[ExecutionListener] = []
        # Runtimes seen to work here: a sandbox of theirs started, or the last ``runtimes``
        # check found them available. ``/health`` reports these without starting anything.
        self.working_runtimes: set[str] = set()
        # This host's runtimes: the local placement's, and the MCP servers' (which run on the
        # daemon's own host whatever the placement) and the privileges' (daemon/privileges.py).
        self.manager = manager or RuntimeManager(pool_size=config.pool_size)
        # Where isolates run: this host (the default), or a cluster (``stockade serve --placement ray``).
        if placement is None and isinstance(config.placement, LocalPlacementConfig):
            placement = LocalPlacement(config.placement, self.manager, threads=config.max_sandboxes + 4)
        self.placement: Placement = placement or open_placement(config.placement)
        # Background processes' calls block on their isolate's agent: they wait here, off the loop.
        self._pool = ThreadPoolExecutor(max_workers=config.max_sandboxes + 4, thread_name_prefix="stockade-run")
        self.slots = Slots(config.max_sandboxes, config.max_sandboxes_per_uid, config.queue_limit, config.queue_timeout)
        self.held: dict[str, Held] = {}
        self.answers = AnswerBudget()  # answers held for clients that have not read them yet
        self.closing: dict[str, Held] = {}  # held sandboxes being closed (a call of theirs may still run)
        self.running: dict[str, Running] = {}
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._teardowns: dict[Isolate, asyncio.TimerHandle] = {}
        self._expired: OrderedDict[str, tuple[str, str]] = OrderedDict()  # sandbox id -> (owner, why)
        self._closing: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Task[None]] = set()
        self._recording: set[asyncio.Task[None]] = set()  # runs without a result, told once their report is in
        self._waiting: dict[str, tuple[int, int]] = {}
        self._cold_starts: set[asyncio.Task[None]] = set()  # execute_now's runs building an isolate

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def runtime_for(self, policy: Policy) -> str:
        """The runtime the placement would run ``policy`` on; ``fake`` (no isolation at all) is
        refused unless the daemon's owner allowed it (``STOCKADE_ALLOW_UNISOLATED``)."""
        runtime = self.placement.runtime_for(policy)
        if runtime == "fake" and not self.config.allow_unisolated:
            raise PolicyError(
                "runtime fake (isolation none) runs commands as the daemon itself, unconfined: "
                "this daemon does not serve it (its owner may allow it with STOCKADE_ALLOW_UNISOLATED=1, "
                "for tests on a host of their own)"
            )
        return runtime

    async def connect_placement(self) -> dict[str, Any]:
        """At the start: reach the placement (this host's default runtime and its pool, or a Ray
        cluster and its node actors) and say what it offers. One that cannot be reached is
        said in the log (and, for a cluster, in ``/health``), not raised: the daemon serves
        what it can, and tries again on the next request."""
        try:
            described = await self.placement.connect()
        except Exception as exc:  # noqa: BLE001 - told here, and by describe()
            log.warning("placement %s: %s", self.placement.name, exc)
            return self.placement.describe()
        self.working_runtimes |= set(described.get("runtimes", ()))
        return described

    async def placement_health(self) -> dict[str, Any] | None:
        """Whether a remote placement can place, freshly checked, for ``/health`` (None: this host's)."""
        if not self.placement.remote:
            return None
        described = await self.placement.check()
        if described.get("reachable", True):
            self.working_runtimes |= set(described.get("runtimes", ()))
        # /health answers anyone: whether the cluster is there, not where it is or what it holds
        # (``runtimes``, behind the socket's checks and the API's token, says why it is not).
        return {"type": described["type"], "reachable": described.get("reachable", True),
                "nodes": len(described.get("nodes", []))}  # fmt: skip

    def _track(self, delta: int) -> None:
        self._inflight += delta
        if self._inflight:
            self._idle.clear()
        else:
            self._idle.set()

    # ---- methods ----------------------------------------------------------------------

    async def selftest(self, request: Empty, caller: Caller) -> SelfTest:
        """Run a real sandbox end to end and check that it is really confined."""
        probe = (
            "import os\n"
            "st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
            "print(6 * 7, *(st.get(k, '').strip() for k in ('CapEff', 'NoNewPrivs', 'Seccomp')),"
            " os.path.exists('/root'))"
        )
        result = await self.execute(ExecuteRequest(code=probe), Caller("selftest", "local", admin=True))
        fields = result.stdout.split()
        answer_ok = bool(fields) and fields[0] == "42"
        confined = fields[1:] == ["0000000000000000", "1", "2", "False"]
        if result.runtime_used == "fake":
            confined = False
        ok = result.success and answer_ok
        message = (
            f"Self-test passed: ran in {result.runtime_used} in {result.execution_time_seconds * 1000:.1f} ms"
            if ok and confined
            else f"Self-test failed: {result.summary()} {result.stderr.strip()[:200]}"
        )
        return SelfTest(
            ok=ok and confined,
            message=message,
            verified=confined,
            runtime=result.runtime_used,
            policy_digest=result.policy_digest,
        )

    async def _take_slot(self, caller: Caller) -> None:
        if caller.waits:
            await self.slots.take(caller.owner)
            try:  # it waited: what its caller left unread may fill its share by now
                self.answers.refuse_new(caller.owner)
            except DaemonBusyError:
                self.slots.release(caller.owner)
                raise
        else:
            self.slots.take_at_once(caller.owner)

    def _observe(self, caller: Caller, agent_id: str | None, result: ExecResult, held: Held | None = None) -> None:
        first = True
        if held is not None:
            first, held.runs = held.runs == 0, held.runs + 1
        for listener in self.listeners:
            try:
                listener.execution(caller, agent_id, result, held is not None, first)
            except Exception:
                log.exception("an execution listener failed")

    def _tell(self, event: Callable[[ExecutionListener], None]) -> None:
        """Tell each listener of a held sandbox's ``event`` (one listener's failure is logged)."""
        for listener in self.listeners:
            try:
                event(listener)
            except Exception:
                log.exception("a listener failed")

    def cancel_all(self, reason: str) -> None:
        """End every run under way, one-shot or in a held sandbox, its caller told ``reason``
        (at the daemon's stop, once the grace period is over)."""
        for running in list(self.running.values()):
            if running.cancelled is None:
                running.cancelled = reason
                if running.sandbox is not None:
                    running.sandbox.cancel(reason)
        for held in list(self.held.values()):
            if held.calls:
                held.sandbox.cancel(reason)

    def require_slot(self, caller: Caller) -> None:
        """Refuse now (``DaemonBusyError``) what could not get a slot at once: for a door that
        must answer "busy" before it starts answering (a stream)."""
        if not caller.waits:
            self.slots.refuse_unless_free(caller.owner)

    def _kept_mcp(self) -> list[ActiveSandbox]:
        """The MCP servers it keeps (mcp.call_tool), each in an isolate of its own."""
        mcp = sys.modules.get("stockade.daemon.mcp")
        return mcp.active(self) if mcp is not None else []

    def active_count(self) -> int:
        """Isolates open for callers now: runs, held sandboxes, kept MCP servers (/health, metrics)."""
        return len(self.running) + len(self.held) + len(self._kept_mcp())

    def status(self, caller: Caller) -> Status:
        """What runs: the caller's own sandboxes and runs (an admin's: everyone's), and
        the daemon-wide counts. Another owner's ids, runtimes and timings are not
        shown: they would tell one user what another is doing."""
        now = time.monotonic()
        everything = [
            ActiveSandbox(
                sandbox_id=h.sandbox_id,
                kind="held",
                runtime=h.sandbox.runtime_name,
                owner=h.caller.owner,
                owner_uid=h.caller.uid,
                agent_id=h.agent_id,
                uptime_seconds=round(now - h.created, 3),
                idle_seconds=round(h.idle_seconds(now), 3),
                idle_timeout=h.idle_timeout_s,
                closing=h.sandbox_id in self.closing,
                processes=process_infos(h.processes),
                published=list(h.published),
            )
            for h in [*self.held.values(), *self.closing.values()]
        ] + [
            ActiveSandbox(
                execution_id=r.execution_id,
                kind="execute",
                runtime=r.sandbox.runtime_name if r.sandbox is not None else r.runtime,
                owner=r.caller.owner,
                owner_uid=r.caller.uid,
                agent_id=r.agent_id,
                uptime_seconds=round(now - r.started, 3),
            )
            for r in self.running.values()
        ]
        everything += self._kept_mcp()
        return Status(
            active_sandboxes=[e for e in everything if caller.may_touch(e.owner)],
            total_count=len(everything),
            max_sandboxes=self.config.max_sandboxes,
            max_sandboxes_per_uid=self.config.max_sandboxes_per_uid,
            waiting=self.slots.waiting,
            instance_id=self.instance_id,
        )

    async def runtimes(self) -> list[dict[str, Any]]:
        """Every runtime the placement has and whether it works: this host's from a check at most
        a minute old (a check starts a real sandbox of each runtime, a VM boot for microVM,
        outside the slots), a cluster's as its nodes advertise them."""
        found = await self.placement.runtimes()
        if not self.config.allow_unisolated:  # refused to every caller (runtime_for): not listed
            found = [a for a in found if a["name"] != "fake"]
        self.working_runtimes = {a["name"] for a in found if a["available"] and a["name"] != "fake"}
        return found

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is running a sandbox; False if ``timeout`` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def shutdown(self, grace_s: float) -> None:
        """Let running work finish for ``grace_s``, then kill and release everything."""
        await self.wait_idle(grace_s)
        if (mcp := sys.modules.get("stockade.daemon.mcp")) is not None:
            await mcp.close_all(self)  # the MCP servers it keeps, with their isolates
        if self._closing:  # sandboxes being closed: done before the runtimes close
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._recording:  # runs without a result, each waiting (boundedly) for its isolate's report
            await asyncio.gather(*self._recording, return_exceptions=True)
        self._teardown_now()
        for held in list(self.held.values()):
            held.sandbox.kill()
        why = "the daemon stopped during this call"
        closing = [self._close(held, interrupt=why, ended="daemon stopped") for held in list(self.held.values())]
        for failed in await asyncio.gather(*closing, return_exceptions=True):  # at once: each may wait for its report
            if isinstance(failed, BaseException) and not isinstance(failed, SandboxError):
                log.error("closing a held sandbox at the stop failed: %r", failed)
        try:
            await self.placement.aclose()
        except Exception:
            log.exception("closing the %s placement failed", self.placement.name)
        await self._blocking(self.manager.close)
        self._pool.shutdown(wait=False, cancel_futures=True)
