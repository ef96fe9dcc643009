"""Held sandboxes: the part of the controller that keeps a sandbox for its client between calls.

A held sandbox has an id, an owner, one call at a time (a lock: one request at
a time reaches its agent), and an idle timeout. It is closed by its owner, by
the end of the Unix-socket connection that made it (unless kept), by its idle
timeout, or at the daemon's stop. ``HeldSandboxes`` is a part of ``Controller``
(``controller.py``), which supplies the slots, the thread pool and the
listeners it uses.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TypeVar

from ..errors import (
    InvalidRequestError,
    NotFoundError,
    SandboxLostError,
)
from ..placement import Isolate, Placement
from ..protocol.models import (
    Caller,
    Closed,
    PublishedPort,
    SandboxCreate,
    SandboxCreated,
    SandboxInfo,
    SandboxRef,
)
from ..runtimes.agent_requests import check_call_timeout
from ..runtimes.spawned import Process
from ..runtimes.violations import Leftovers
from .answers import AnswerBudget
from .config import DaemonConfig
from .parts import ControllerCalls
from .slots import Slots

T = TypeVar("T")
log = logging.getLogger("stockade.daemon")

# Ids of sandboxes closed for idleness, remembered (up to this many) so that a
# late call learns why its sandbox is gone instead of "no sandbox".
EXPIRED_REMEMBERED = 1024

# How long a closing sandbox's report of what it did after its last run is waited for.
LEFTOVERS_WAIT_S = 10.0

# A held sandbox's id: its daemon instance's first 8 digits, then 16 random ones.
_SANDBOX_ID = re.compile(r"sb-([0-9a-f]{8})-[0-9a-f]{16}")


@dataclass
class Held:
    """A sandbox a client created and holds."""

    sandbox_id: str
    sandbox: Isolate
    caller: Caller
    agent_id: str | None
    connection: int | None  # closed with this connection, unless kept
    idle_timeout_s: float | None  # closed after this long without a call; None: never
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)  # when its last call ended
    calls: int = 0  # calls running or waiting for its lock: it is not idle while any is
    runs: int = 0  # runs answered: the first carries the isolate's cold start
    idle_timer: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    processes: dict[str, Process] = field(default_factory=dict)  # its background processes, by handle
    published: list[PublishedPort] = field(default_factory=list)  # its published ports, closed with it

    def idle_seconds(self, now: float) -> float:
        return 0.0 if self.calls else max(0.0, now - self.last_active())

    def last_active(self) -> float:
        """Its last call's end, or its published ports' last connection, whichever is later: a
        sandbox serving traffic through a published port is in use, though no call comes."""
        activity = getattr(self.sandbox, "port_activity", None)  # an isolate of this host's runtimes
        seen = activity() if callable(activity) else None
        return self.last_used if seen is None else max(self.last_used, seen)


class HeldSandboxes(ControllerCalls):
    """The held sandboxes of a ``Controller``, and its methods that act on them."""

    # What the controller provides (controller.py).
    config: DaemonConfig
    instance_id: str
    placement: Placement
    slots: Slots
    working_runtimes: set[str]
    held: dict[str, Held]
    answers: AnswerBudget
    closing: dict[str, Held]  # held sandboxes being closed (a call of theirs may still run)
    _expired: OrderedDict[str, tuple[str, str]]  # sandbox id -> (owner, why)
    _closing: set[asyncio.Task[None]]  # sandboxes being closed (idle ones, and every close in flight)
    _settling: set[asyncio.Task[None]]  # calls given up by their callers, their sandbox's turn kept until they end
    _waiting: dict[str, tuple[int, int]]  # owner -> its calls waiting for a held sandbox's turn, their bytes

    async def create(self, request: SandboxCreate, caller: Caller) -> SandboxCreated:
        policy = request.policy
        idle_timeout = self._idle_timeout(request.idle_timeout)
        self.runtime_for(policy)  # a policy it cannot serve is refused before a slot is taken
        await self._take_slot(caller)
        try:
            # A caller cancelled meanwhile (a client gone) leaves nothing: the placement releases
            # what it was starting.
            sandbox = await self.placement.acquire(policy)
        except BaseException:
            self.slots.release(caller.owner)
            raise
        self.working_runtimes.add(sandbox.runtime_name)
        sandbox_id = f"sb-{self.instance_id[:8]}-{secrets.token_hex(8)}"
        connection = None if request.keep else caller.connection
        held = Held(sandbox_id, sandbox, caller, request.agent_id, connection, idle_timeout)
        self.held[sandbox_id] = held
        self._watch_idle(held)
        policy = sandbox.policy  # as it runs: a cluster writes the runtime it chose into a trust's
        self._tell(lambda listener: listener.sandbox_event(
            caller, "sandbox.create", agent_id=request.agent_id, sandbox_id=sandbox_id,
            runtime=sandbox.runtime_name, policy_digest=policy.digest, keep=request.keep,
        ))  # fmt: skip
        return SandboxCreated(
            sandbox_id=sandbox_id,
            runtime=sandbox.runtime_name,
            policy_digest=policy.digest,
            idle_timeout=idle_timeout,
            memory_mb=policy.memory_mb,
        )

    async def describe(self, request: SandboxRef, caller: Caller) -> SandboxInfo:
        """A held sandbox of the caller's, as its create answered (``NotFoundError``, or
        ``SandboxLostError`` for one of a daemon instance that stopped, otherwise). Never waits
        for the sandbox's turn: a run under way on it does not hold this."""
        held = self._lookup(request, caller)
        policy = held.sandbox.policy
        return SandboxInfo(
            sandbox_id=held.sandbox_id,
            runtime=held.sandbox.runtime_name,
            policy_digest=policy.digest,
            idle_timeout=held.idle_timeout_s,
            memory_mb=policy.memory_mb,
        )

    def _idle_timeout(self, asked: float | None) -> float | None:
        """A held sandbox's idle timeout: at most the daemon's own, which is also the default."""
        limit = self.config.sandbox_idle_timeout
        if asked is None:
            return limit
        if limit is not None and asked > limit:
            raise InvalidRequestError(
                f"idle_timeout {asked:g} s is over this daemon's limit of {limit:g} s (STOCKADE_SANDBOX_IDLE_TIMEOUT)"
            )
        return asked

    def require_sandbox(self, request: SandboxRef, caller: Caller) -> None:
        """Refuse now a call to a sandbox the caller does not hold (``NotFoundError``), and a run
        whose own timeout is above its sandbox's policy's (``PolicyError``): a streamed answer
        has begun by the time the run itself would say so."""
        held = self._lookup(request, caller)
        timeout = getattr(request, "timeout", None)
        if isinstance(timeout, (int, float)):
            check_call_timeout(timeout, held.sandbox.policy)

    def _lookup(self, request: SandboxRef, caller: Caller) -> Held:
        sandbox_id = request.sandbox_id
        held = self.held.get(sandbox_id)
        # Another owner's sandbox is reported exactly like a missing one.
        if held is None or not caller.may_touch(held.caller.owner):
            expired = self._expired.get(sandbox_id)
            if expired is not None and caller.may_touch(expired[0]):
                raise NotFoundError(expired[1])
            self._refuse_if_lost(sandbox_id)
            raise NotFoundError(f"no sandbox {sandbox_id!r}")
        return held

    def _refuse_if_lost(self, sandbox_id: str) -> None:
        """``SandboxLostError`` for the id of a sandbox another daemon instance made: it ended
        with that daemon. Never a sandbox of this daemon, so nothing of another owner shows."""
        made = _SANDBOX_ID.fullmatch(sandbox_id)
        if made is not None and made[1] != self.instance_id[:8]:
            raise SandboxLostError(
                f"sandbox {sandbox_id!r} is not this daemon's: its id names daemon instance {made[1]}, which is "
                f"not running (this daemon is instance {self.instance_id}); a sandbox that instance made ended "
                "when it stopped"
            )

    # ---- idle held sandboxes ---------------------------------------------------------

    def _watch_idle(self, held: Held, delay: float | None = None) -> None:
        """Check ``held`` for idleness ``delay`` seconds from now (its whole timeout by default).

        One timer per sandbox, moved only when it fires: a call does not touch
        it, it only stamps ``last_used``, and a timer that finds the sandbox
        used since sets itself again for the time that is left.
        """
        if held.idle_timeout_s is None or held.idle_timer is not None:
            return
        wait = held.idle_timeout_s if delay is None else delay
        held.idle_timer = asyncio.get_running_loop().call_later(wait, self._idle_check, held)

    def _idle_check(self, held: Held) -> None:
        held.idle_timer = None
        if self.held.get(held.sandbox_id) is not held or held.calls or held.idle_timeout_s is None:
            return  # closed meanwhile, or in use: the call's end sets the timer again
        left = held.last_active() + held.idle_timeout_s - time.monotonic()
        if left > 0:
            self._watch_idle(held, left)
            return
        why = (
            f"sandbox {held.sandbox_id!r} was closed after {held.idle_timeout_s:g} s without a call "
            "or a connection to a published port (idle_timeout)"
        )
        log.info("closing sandbox %s of %s: idle for %g s", held.sandbox_id, held.caller.owner, held.idle_timeout_s)
        self._close_later(held, "idle", why)

    def _close_later(self, held: Held, ended: str, why: str) -> None:
        """Close ``held`` (``ended``: the listeners' word): out of the held sandboxes now, so that a
        call waiting its turn is told ``why``, as later ones are; released in a task of its own."""
        self._expired[held.sandbox_id] = (held.caller.owner, why)
        while len(self._expired) > EXPIRED_REMEMBERED:
            self._expired.popitem(last=False)
        if not self._take_out(held):
            return
        task = asyncio.get_running_loop().create_task(self._close_quietly(held, ended))
        self._closing.add(task)  # a task nobody awaits must be referenced until it ends
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, held: Held, ended: str) -> None:
        try:
            await self._end_taken_out(held, None, ended)
        except Exception:
            log.exception("closing %s sandbox %s failed", ended, held.sandbox_id)

    async def close_sandbox(self, request: SandboxRef, caller: Caller) -> Closed:
        held = self._lookup(request, caller)
        why = f"the sandbox was closed by {caller.owner} (sandbox.close) during this call"
        await self._close(held, interrupt=why, ended="closed")
        return Closed(sandbox_id=held.sandbox_id)

    async def _close(self, held: Held, interrupt: str | None = None, ended: str = "closed") -> None:
        """Close a held sandbox and free its slot; ``ended``: why (the listeners are told).

        A call in progress on it ends first: at once when ``interrupt`` says why
        (its isolate is ended, and the call answered ``killed`` with that
        reason), else when it is done. Its agent connection is never closed
        under a call still reading it: that call would wait out its timeout.
        Calls still waiting their turn then find it closed. What it did after
        its last run (a process that run left running) is taken before its
        isolate goes, for the audit log and metrics: no run reports it.
        """
        if self._take_out(held):
            await self._end_taken_out(held, interrupt, ended)

    def _take_out(self, held: Held) -> bool:
        """``held`` out of the held sandboxes, listed by ``status`` as closing until its slot is
        free; False: it was out already (closed, or being closed)."""
        if self.held.pop(held.sandbox_id, None) is None:
            return False
        if held.idle_timer is not None:
            held.idle_timer.cancel()
            held.idle_timer = None
        self.closing[held.sandbox_id] = held
        return True

    async def _end_taken_out(self, held: Held, interrupt: str | None, ended: str) -> None:
        # A task of its own: a close whose caller goes (a client gone, the daemon stopping) still
        # releases the isolate, frees its slot and says so; the daemon's stop waits for it.
        ending = asyncio.ensure_future(self._end_held(held, interrupt, ended))
        self._closing.add(ending)
        ending.add_done_callback(self._closing.discard)
        await asyncio.shield(ending)

    async def _end_held(self, held: Held, interrupt: str | None, ended: str) -> None:
        leftovers = None
        try:
            if held.calls and interrupt is not None:
                held.sandbox.cancel(interrupt)
            async with held.lock:  # a call still reading its agent ends first
                try:
                    leftovers = await _leftovers(held)
                finally:
                    await self.placement.release(held.sandbox)
        finally:
            del self.closing[held.sandbox_id]
            self.slots.release(held.caller.owner)
            self._tell(lambda listener: listener.sandbox_ended(
                held.caller, held.agent_id, held.sandbox_id, ended, held.runs, leftovers
            ))  # fmt: skip

    async def close_unanswered(self, sandbox_id: str) -> None:
        """Close a sandbox its caller went away before being told of (a kept one: its connection's
        end does not close it, and no one knows its id)."""
        held = self.held.get(sandbox_id)
        if held is not None:
            await self._close(held, ended="connection closed")

    async def close_connection(self, connection: int) -> None:
        """Close the sandboxes a connection held (not kept ones), each once its call, if any, is done."""
        for held in [h for h in self.held.values() if h.connection == connection]:
            await self._close(held, ended="connection closed")


async def _leftovers(held: Held) -> Leftovers | None:
    """What ``held`` did after its last run, or None when it cannot be taken in time (its isolate
    lost, its node gone): a process that run left running is reported by no run."""
    try:
        return await asyncio.wait_for(held.sandbox.atake_report(), LEFTOVERS_WAIT_S)
    except Exception as exc:  # noqa: BLE001 - the sandbox goes all the same; said in the record
        log.info("sandbox %s: what it did after its last run could not be taken: %s", held.sandbox_id, exc)
        return None
