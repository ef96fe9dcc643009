"""The daemon's controller: owns the runtimes and every live sandbox, whatever the transport.

Runtime calls block (they wait on an isolate), so they run in a thread pool;
the controller itself lives on the event loop. A fixed number of sandbox slots
(held sandboxes and running one-shot executions) bounds what the daemon asks of
the host; a bounded queue waits for a slot, and beyond it callers get "busy".
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from ..errors import DaemonBusyError, InvalidRequestError, NotFoundError, RunCancelledError, SandboxError
from ..policy import Policy
from ..protocol.models import (
    ActiveSandbox,
    Caller,
    Cancelled,
    CancelRequest,
    Closed,
    DirListing,
    Empty,
    ExecuteRequest,
    FileData,
    FileWritten,
    ListDir,
    ReadFile,
    SandboxCreate,
    SandboxCreated,
    SandboxExec,
    SandboxRef,
    SandboxRunCode,
    SelfTest,
    Status,
    WriteFile,
)
from ..result import ExecResult, new_id
from ..runtimes.base import AgentSandbox, OutputCallback, code_params, exec_params
from ..runtimes.manager import RuntimeManager
from .config import DaemonConfig
from .slots import Slots

T = TypeVar("T")
log = logging.getLogger("stockade.daemon")

# Ids of sandboxes closed for idleness, remembered (up to this many) so that a
# late call learns why its sandbox is gone instead of "no sandbox".
EXPIRED_REMEMBERED = 1024

# How long the answer to ``runtimes`` is reused before the runtimes are checked again.
RUNTIMES_FRESH_S = 60.0

# A one-shot isolate is killed as soon as its answer is written (nothing of it
# runs on), but its teardown (cgroups, then the pool's next isolate) waits this
# long: on a small host it otherwise competes for the CPU with the client that
# was just answered, which measured 0.2-0.4 ms slower to wake and read it.
TEARDOWN_DELAY_S = 0.005


class ExecutionListener(Protocol):
    """Told of every finished ``execute`` (metrics, the audit log, the dashboard's history).

    Called on the event loop, in the turn the result is ready: it must not block.
    """

    def execution(
        self, caller: Caller, agent_id: str | None, result: ExecResult, held: bool = False, cold_start: bool = True
    ) -> None:
        """``held``: a held sandbox's run; ``cold_start``: the result's cold start is this
        isolate's first (a held sandbox's later runs repeat it)."""


@dataclass
class Held:
    """A sandbox a client created and holds."""

    sandbox_id: str
    sandbox: AgentSandbox
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

    def idle_seconds(self, now: float) -> float:
        return 0.0 if self.calls else max(0.0, now - self.last_used)


@dataclass(slots=True)
class Running:
    execution_id: str
    runtime: str
    caller: Caller
    agent_id: str | None
    started: float = field(default_factory=time.monotonic)
    sandbox: AgentSandbox | None = None  # None while its isolate is still being started
    cancelled: str | None = None  # why, once ``execute.cancel`` ended it


class Controller:
    def __init__(self, config: DaemonConfig, manager: RuntimeManager | None = None) -> None:
        self.config = config
        self.listeners: list[ExecutionListener] = []
        # Runtimes seen to work here: a sandbox of theirs started, or the last ``runtimes``
        # check found them available. ``/health`` reports these without starting anything.
        self.working_runtimes: set[str] = set()
        self.manager = manager or RuntimeManager(pool_size=config.pool_size)
        self._pool = ThreadPoolExecutor(max_workers=config.max_sandboxes + 4, thread_name_prefix="stockade-run")
        self.slots = Slots(
            config.max_sandboxes, config.max_sandboxes_per_uid, config.queue_limit, config.queue_timeout_s
        )
        self.held: dict[str, Held] = {}
        self.closing: dict[str, Held] = {}  # held sandboxes being closed (a call of theirs may still run)
        self.running: dict[str, Running] = {}
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._teardowns: dict[AgentSandbox, tuple[asyncio.TimerHandle, Callable[[AgentSandbox], None]]] = {}
        self._expired: OrderedDict[str, tuple[str, str]] = OrderedDict()  # sandbox id -> (owner, why)
        self._closing: set[asyncio.Task[None]] = set()
        self._cold_starts: set[asyncio.Task[None]] = set()  # execute_now's runs building an isolate
        self._runtimes_lock = asyncio.Lock()
        self._runtimes_seen: tuple[float, list[dict[str, Any]]] | None = None  # when, what ``runtimes`` found

    async def _blocking(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    def _track(self, delta: int) -> None:
        self._inflight += delta
        if self._inflight:
            self._idle.clear()
        else:
            self._idle.set()

    def _dispose_after_answer(self, sandbox: AgentSandbox, dispose: Callable[[AgentSandbox], None]) -> None:
        """Kill ``sandbox`` right after its answer is written; tear it down a little later.

        Both are callbacks on the loop, so both run after the answer being
        written in this loop turn (by the handler, or by the callback that read
        the agent's answer) has gone out.
        """
        loop = asyncio.get_running_loop()
        loop.call_soon(sandbox.kill)

        def teardown() -> None:
            self._teardowns.pop(sandbox, None)
            dispose(sandbox)

        self._teardowns[sandbox] = (loop.call_later(TEARDOWN_DELAY_S, teardown), dispose)

    def _teardown_now(self) -> None:
        """Hand every isolate still waiting for its teardown to its runtime now (at shutdown)."""
        while self._teardowns:
            sandbox, (timer, dispose) = self._teardowns.popitem()
            timer.cancel()
            dispose(sandbox)

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

    def execute_now(
        self, request: ExecuteRequest, caller: Caller, done: Callable[[ExecResult | Exception], None]
    ) -> Callable[[], None] | None:
        """``execute``, without waiting in line, when a slot is free right now.

        Returns None when none is (the caller awaits ``execute``, which queues).
        Otherwise the run has started and the function returned abandons it (for
        a caller that goes away first; ``done`` is then not called). With a warm
        isolate, ``done`` gets the result in the loop turn the agent answers, so
        the answer goes out with no task woken on the way; without one, a task
        builds an isolate and runs it, holding the slot taken here (the pool is
        asked once: a second ask would count a second miss).
        """
        request.check_sizes()
        runtime = self.manager.select(request.policy)
        if not self.slots.take_now(caller.owner):
            return None  # the awaited path says why, or waits for a slot
        try:
            take = getattr(runtime, "take_warm", None)
            sandbox: AgentSandbox | None = take(request.policy) if take is not None else None
        except BaseException:  # a limit the host refused at hand-over: the slot goes back
            self.slots.release(caller.owner)
            raise
        running = self._started(runtime.name, caller, request.agent_id, sandbox)
        if sandbox is not None:
            return self._launch(request, running, sandbox, self._disposer(runtime), done)

        async def cold() -> None:
            try:
                result = await self._run_in_slot(request, running, runtime, None)
            except asyncio.CancelledError:
                return  # abandoned: nobody to tell
            except Exception as exc:  # noqa: BLE001 - handed to the caller, as an awaited run would raise it
                done(exc)
                return
            done(result)

        task = asyncio.get_running_loop().create_task(cold())
        self._cold_starts.add(task)  # a task nobody awaits must be referenced until it ends

        def settled(task: asyncio.Task[None]) -> None:
            self._cold_starts.discard(task)
            # Cancelled before its first step, the task never ran the code that gives the slot back.
            if self.running.get(running.execution_id) is running and running.sandbox is None:
                self._ended(running.execution_id)

        task.add_done_callback(settled)

        def abandon() -> None:
            task.cancel()

        return abandon

    async def execute(
        self, request: ExecuteRequest, caller: Caller, on_output: OutputCallback | None = None
    ) -> ExecResult:
        """One ``execute``: a slot (waiting in the queue if need be), a warm isolate or a
        cold one, the run, the isolate's end."""
        request.check_sizes()
        runtime = self.manager.select(request.policy)
        await self._take_slot(caller)
        try:
            # A warm isolate is handed over on the event loop itself; only building
            # one on demand blocks, so only that goes to a thread.
            take = getattr(runtime, "take_warm", None)
            sandbox: AgentSandbox | None = take(request.policy) if take is not None else None
        except BaseException:
            self.slots.release(caller.owner)
            raise
        running = self._started(runtime.name, caller, request.agent_id, sandbox)
        return await self._run_in_slot(request, running, runtime, on_output)

    async def _run_in_slot(
        self, request: ExecuteRequest, running: Running, runtime: Any, on_output: OutputCallback | None
    ) -> ExecResult:
        """The run counted in as ``running`` (its slot taken), on its warm isolate or on one
        built now, to its result; whatever happens, its slot and isolate are given back."""
        sandbox = running.sandbox
        if sandbox is None:
            try:
                sandbox = running.sandbox = await self._start_for(runtime, request.policy)
            except BaseException:
                self._ended(running.execution_id)
                raise
        dispose = self._disposer(runtime)
        if running.cancelled is not None:  # while its isolate was being started
            self._dispose_after_answer(sandbox, dispose)
            self._ended(running.execution_id)
            raise RunCancelledError(f"{running.cancelled} before it started")
        outcome: asyncio.Future[ExecResult | Exception] = asyncio.get_running_loop().create_future()
        abandon = self._launch(request, running, sandbox, dispose, outcome.set_result, on_output)
        try:
            answer = await outcome
        except BaseException:  # the caller went away: the run ends with it
            abandon()
            raise
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _disposer(self, runtime: Any) -> Callable[[AgentSandbox], None]:
        """How a one-shot isolate of ``runtime`` goes: its pool's reaper, or a close off the loop."""
        dispose: Callable[[AgentSandbox], None] | None = getattr(runtime, "dispose", None)
        return dispose or self._close_in_pool

    def _launch(
        self,
        request: ExecuteRequest,
        running: Running,
        sandbox: AgentSandbox,
        dispose: Callable[[AgentSandbox], None],
        done: Callable[[ExecResult | Exception], None],
        on_output: OutputCallback | None = None,
    ) -> Callable[[], None]:
        """Start ``request`` on ``sandbox`` (a one-shot isolate): the one path every
        ``execute`` takes. ``done`` gets the outcome in the loop turn the agent
        answers; the isolate is killed right after and torn down a little later.
        Returns what abandons the run."""
        sandbox.one_shot = True
        self.working_runtimes.add(sandbox.runtime_name)
        execution_id = running.execution_id

        def bookkeeping() -> None:
            self._dispose_after_answer(sandbox, dispose)
            self._ended(execution_id)

        def deliver(outcome: ExecResult | Exception) -> None:
            if isinstance(outcome, ExecResult):
                self._observe(running.caller, running.agent_id, outcome)
            done(outcome)

        finish = _settle_once(deliver, bookkeeping)
        if request.command is not None:
            method, params = "exec", exec_params(request.command)
        else:
            method, params = "run_code", code_params(request.code or "", request.language)
        try:
            call = sandbox.start_run(method, params, request.stdin_bytes(), None, None, on_output, finish, execution_id)
        except BaseException:
            finish(None)
            raise

        def abandon() -> None:
            call.abort()
            finish(None)

        return abandon

    async def _take_slot(self, caller: Caller) -> None:
        if caller.waits:
            await self.slots.take(caller.owner)
        else:
            self.slots.take_at_once(caller.owner)

    def _close_in_pool(self, sandbox: AgentSandbox) -> None:
        """Close an isolate whose runtime keeps no pool, off the event loop."""
        with contextlib.suppress(RuntimeError):  # the pool is shut down: manager.close ends it
            self._pool.submit(sandbox.close)

    def _observe(self, caller: Caller, agent_id: str | None, result: ExecResult, held: Held | None = None) -> None:
        first = True
        if held is not None:
            first, held.runs = held.runs == 0, held.runs + 1
        for listener in self.listeners:
            try:
                listener.execution(caller, agent_id, result, held is not None, first)
            except Exception:
                log.exception("an execution listener failed")

    def _started(
        self, runtime: str, caller: Caller, agent_id: str | None, sandbox: AgentSandbox | None = None
    ) -> Running:
        """Count a running execute in, under an id drawn now: ``status`` shows it while the
        run is going and the ExecResult carries it, so a caller can match the two."""
        self._track(+1)
        running = Running(new_id(), runtime, caller, agent_id, sandbox=sandbox)
        self.running[running.execution_id] = running
        return running

    def cancel(self, request: CancelRequest, caller: Caller) -> Cancelled:
        """``execute.cancel``: end a running execute (its owner's, or any for an admin).

        A run under way ends at once (its isolate is killed) and is answered as
        ``killed``; one whose isolate is still starting is answered with a
        ``cancelled`` error instead, and its isolate is ended as soon as it exists.
        """
        execution_id = request.execution_id
        running = self.running.get(execution_id)
        if running is None or not _may_touch(caller, running.caller.owner):  # another's is reported as missing
            raise NotFoundError(f"no running execution {execution_id!r}")
        if running.cancelled is None:
            running.cancelled = f"cancelled by {caller.owner} (execute.cancel)"
            log.info("execution %s of %s cancelled by %s", execution_id, running.caller.owner, caller.owner)
            if running.sandbox is not None:
                running.sandbox.cancel(running.cancelled)
        return Cancelled(execution_id=execution_id)

    def _ended(self, execution_id: str) -> None:
        self.slots.release(self.running.pop(execution_id).caller.owner)
        self._track(-1)

    async def _start_for(self, runtime: Any, policy: Policy) -> AgentSandbox:
        """Start an isolate in a thread; one whose caller is cancelled meanwhile
        (its client went away) is closed once it has started, not left behind."""
        start = asyncio.get_running_loop().run_in_executor(self._pool, runtime.start, policy)
        try:
            return await asyncio.shield(start)
        except asyncio.CancelledError:
            start.add_done_callback(self._close_unwanted)
            raise

    def _close_unwanted(self, start: asyncio.Future[AgentSandbox]) -> None:
        if not start.cancelled() and start.exception() is None:
            with contextlib.suppress(RuntimeError):  # the pool is shut down: manager.close ends it
                self._pool.submit(start.result().close)

    async def create(self, request: SandboxCreate, caller: Caller) -> SandboxCreated:
        policy = request.policy
        idle_timeout = self._idle_timeout(request.idle_timeout)
        runtime = self.manager.select(policy)
        await self._take_slot(caller)
        try:
            # Not a bare thread call: a caller cancelled meanwhile (a client gone) would leave
            # the isolate it started running, held by nobody.
            sandbox = await self._start_for(runtime, policy)
        except BaseException:
            self.slots.release(caller.owner)
            raise
        self.working_runtimes.add(sandbox.runtime_name)
        sandbox_id = "sb-" + secrets.token_hex(8)
        connection = None if request.keep else caller.connection
        held = Held(sandbox_id, sandbox, caller, request.agent_id, connection, idle_timeout)
        self.held[sandbox_id] = held
        self._watch_idle(held)
        return SandboxCreated(
            sandbox_id=sandbox_id, runtime=sandbox.runtime_name, policy_digest=policy.digest, idle_timeout=idle_timeout
        )

    def _idle_timeout(self, asked: float | None) -> float | None:
        """A held sandbox's idle timeout: at most the daemon's own, which is also the default."""
        limit = self.config.sandbox_idle_timeout_s
        if asked is None:
            return limit
        if limit is not None and asked > limit:
            raise InvalidRequestError(
                f"idle_timeout {asked:g} s is over this daemon's limit of {limit:g} s (STOCKADE_SANDBOX_IDLE_TIMEOUT)"
            )
        return asked

    def require_slot(self, caller: Caller) -> None:
        """Refuse now (``DaemonBusyError``) what could not get a slot at once: for a door that
        must answer "busy" before it starts answering (a stream)."""
        if not caller.waits and (not self.slots.free or self.slots.waiting):
            raise DaemonBusyError(f"busy: all {self.slots.total} sandbox slots are in use; try again shortly")

    def require_sandbox(self, request: SandboxRef, caller: Caller) -> None:
        """Refuse now (``NotFoundError``) a call to a sandbox the caller does not hold."""
        self._lookup(request, caller)

    def _lookup(self, request: SandboxRef, caller: Caller) -> Held:
        sandbox_id = request.sandbox_id
        held = self.held.get(sandbox_id)
        # Another owner's sandbox is reported exactly like a missing one.
        if held is None or not _may_touch(caller, held.caller.owner):
            expired = self._expired.get(sandbox_id)
            if expired is not None and _may_touch(caller, expired[0]):
                raise NotFoundError(expired[1])
            raise NotFoundError(f"no sandbox {sandbox_id!r}")
        return held

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
        left = held.last_used + held.idle_timeout_s - time.monotonic()
        if left > 0:
            self._watch_idle(held, left)
            return
        why = f"sandbox {held.sandbox_id!r} was closed after {held.idle_timeout_s:g} s without a call (idle_timeout)"
        self._expired[held.sandbox_id] = (held.caller.owner, why)
        while len(self._expired) > EXPIRED_REMEMBERED:
            self._expired.popitem(last=False)
        log.info("closing sandbox %s of %s: idle for %g s", held.sandbox_id, held.caller.owner, held.idle_timeout_s)
        task = asyncio.get_running_loop().create_task(self._close_quietly(held))
        self._closing.add(task)  # a task nobody awaits must be referenced until it ends
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, held: Held) -> None:
        try:
            await self._close(held)
        except Exception:
            log.exception("closing idle sandbox %s failed", held.sandbox_id)

    def sandbox_call_now(
        self, request: SandboxExec | SandboxRunCode, caller: Caller, done: Callable[[ExecResult | Exception], None]
    ) -> Callable[[], None] | None:
        """A held sandbox's ``exec`` or ``run_code``, without a task, when no other call has it.

        As ``execute_now``: None when the sandbox is busy (the caller awaits
        ``sandbox_run`` instead, which waits its turn); otherwise the run has
        started and ``done`` gets its result in the loop turn the agent answers.
        An unknown sandbox raises ``NotFoundError`` here. The function returned
        is for a caller that goes away: the call is let finish (a kept sandbox
        stays in step with its agent), unanswered.
        """
        held = self._lookup(request, caller)
        request.check_sizes()
        if held.calls or not _take_now(held.lock):
            return None
        held.calls += 1
        self._track(+1)

        def deliver(outcome: ExecResult | Exception) -> None:
            if isinstance(outcome, ExecResult):
                self._observe(caller, held.agent_id, outcome, held)
            done(outcome)

        finish = _settle_once(deliver, functools.partial(self._held_call_ended, held))
        method, params = _held_params(request)
        try:
            held.sandbox.start_run(method, params, request.stdin_bytes(), request.env, request.timeout, None, finish)
        except BaseException:
            self._held_call_ended(held)
            raise
        return lambda: None

    def _held_call_ended(self, held: Held) -> None:
        held.lock.release()
        held.calls -= 1
        held.last_used = time.monotonic()
        self._track(-1)
        if self.held.get(held.sandbox_id) is held:
            self._watch_idle(held)

    async def _held_call(self, request: SandboxRef, caller: Caller, call: Callable[[Held], Awaitable[T]]) -> T:
        """``call`` on the held sandbox ``request`` names, in its turn (one call at a time reaches its agent)."""
        held = self._lookup(request, caller)
        held.calls += 1  # from here, waiting for the lock included: not idle
        try:
            await held.lock.acquire()
        except BaseException:
            held.calls -= 1
            raise
        self._track(+1)
        try:
            if self.held.get(held.sandbox_id) is not held:  # closed while this call waited its turn
                raise NotFoundError(f"sandbox {held.sandbox_id!r} was closed")
            return await call(held)
        finally:
            self._held_call_ended(held)

    async def sandbox_run(
        self, request: SandboxExec | SandboxRunCode, caller: Caller, on_output: OutputCallback | None = None
    ) -> ExecResult:
        """A held sandbox's ``exec`` or ``run_code``, awaited."""
        request.check_sizes()
        method, params = _held_params(request)
        stdin = request.stdin_bytes()

        async def run(held: Held) -> ExecResult:
            result = await held.sandbox.arun_request(method, params, stdin, request.env, request.timeout, on_output)
            self._observe(caller, held.agent_id, result, held)
            return result

        return await self._held_call(request, caller, run)

    async def write_file(self, request: WriteFile, caller: Caller) -> FileWritten:
        data = request.data_bytes()

        async def write(held: Held) -> None:
            await self._blocking(held.sandbox.write_file, request.path, data, request.mode)

        await self._held_call(request, caller, write)
        return FileWritten(path=request.path, size=len(data))

    async def read_file(self, request: ReadFile, caller: Caller) -> FileData:
        async def read(held: Held) -> bytes:
            return await self._blocking(held.sandbox.read_file, request.path, request.max_bytes)

        raw = await self._held_call(request, caller, read)
        return FileData(path=request.path, data=base64.b64encode(raw).decode())

    async def list_dir(self, request: ListDir, caller: Caller) -> DirListing:
        async def listing(held: Held) -> list[dict[str, Any]]:
            return await self._blocking(held.sandbox.list_dir, request.path)

        return DirListing(path=request.path, entries=await self._held_call(request, caller, listing))

    async def close_sandbox(self, request: SandboxRef, caller: Caller) -> Closed:
        held = self._lookup(request, caller)
        why = f"the sandbox was closed by {caller.owner} (sandbox.close) during this call"
        await self._close(held, interrupt=why)
        return Closed(sandbox_id=held.sandbox_id)

    async def _close(self, held: Held, interrupt: str | None = None) -> None:
        """Close a held sandbox and free its slot.

        A call in progress on it ends first: at once when ``interrupt`` says why
        (its isolate is ended, and the call answered ``killed`` with that
        reason), else when it is done. Its agent connection is never closed
        under a call still reading it: that call would wait out its timeout.
        Calls still waiting their turn then find it closed.
        """
        if self.held.pop(held.sandbox_id, None) is None:
            return
        if held.idle_timer is not None:
            held.idle_timer.cancel()
            held.idle_timer = None
        self.closing[held.sandbox_id] = held  # listed by ``status`` until its slot is free
        try:
            if held.calls and interrupt is not None:
                held.sandbox.cancel(interrupt)
            async with held.lock:  # a call still reading its agent ends first
                await self._blocking(held.sandbox.close)
        finally:
            del self.closing[held.sandbox_id]
            self.slots.release(held.caller.owner)

    async def close_connection(self, connection: int) -> None:
        """Close the sandboxes a connection held (not kept ones), each once its call, if any, is done."""
        for held in [h for h in self.held.values() if h.connection == connection]:
            await self._close(held)

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
            )
            for h in [*self.held.values(), *self.closing.values()]
        ] + [
            ActiveSandbox(
                execution_id=r.execution_id,
                kind="execute",
                runtime=r.runtime,
                owner=r.caller.owner,
                owner_uid=r.caller.uid,
                agent_id=r.agent_id,
                uptime_seconds=round(now - r.started, 3),
            )
            for r in self.running.values()
        ]
        return Status(
            active_sandboxes=[e for e in everything if _may_touch(caller, e.owner)],
            total_count=len(everything),
            max_sandboxes=self.config.max_sandboxes,
            max_sandboxes_per_uid=self.config.max_sandboxes_per_uid,
            waiting=self.slots.waiting,
        )

    async def runtimes(self) -> list[dict[str, Any]]:
        """Every runtime and whether it works here, from a check at most RUNTIMES_FRESH_S old.

        A check starts a real sandbox of each runtime (a VM boot for microVM),
        outside the slots: checked on every request, any local client could
        have the daemon boot VMs as fast as it can ask. Callers that come during
        a check wait for that one.
        """
        async with self._runtimes_lock:
            if self._runtimes_seen is None or time.monotonic() - self._runtimes_seen[0] > RUNTIMES_FRESH_S:
                found = [asdict(a) for a in await self._blocking(self.manager.doctor)]
                log.info("checked the runtimes: %s", ", ".join(f"{a['name']}={a['available']}" for a in found))
                self._runtimes_seen = (time.monotonic(), found)
                self.working_runtimes = {a["name"] for a in found if a["available"] and a["name"] != "fake"}
            return self._runtimes_seen[1]

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
        if self._closing:  # idle sandboxes being closed: done before the runtimes close
            await asyncio.gather(*self._closing, return_exceptions=True)
        self._teardown_now()
        for held in list(self.held.values()):
            held.sandbox.kill()
        for held in list(self.held.values()):
            try:
                await self._close(held, interrupt="the daemon stopped during this call")
            except SandboxError:
                pass
        await self._blocking(self.manager.close)
        self._pool.shutdown(wait=False, cancel_futures=True)


def _held_params(request: SandboxExec | SandboxRunCode) -> tuple[str, dict[str, Any]]:
    """The agent's request for a held sandbox's run."""
    if isinstance(request, SandboxExec):
        return "exec", exec_params(request.command, request.cwd)
    return "run_code", code_params(request.code, request.language)


def _may_touch(caller: Caller, owner: str) -> bool:
    """Whether ``caller`` may see or end what ``owner`` holds: its own, or anything for an admin."""
    return caller.admin or caller.owner == owner


def _settle_once(
    done: Callable[[ExecResult | Exception], None], bookkeeping: Callable[[], None]
) -> Callable[[ExecResult | Exception | None], None]:
    """A run's ``finish``: its outcome to ``done`` first (None: abandoned, nobody to tell),
    then ``bookkeeping``, which is not the caller's wait; once, however often it is called."""
    settled = False

    def finish(outcome: ExecResult | Exception | None) -> None:
        nonlocal settled
        if settled:
            return
        settled = True
        try:
            if outcome is not None:
                done(outcome)
        finally:
            bookkeeping()

    return finish


def _take_now(lock: asyncio.Lock) -> bool:
    """Take a free lock in this loop turn, or say it is taken.

    ``acquire`` does not suspend when the lock is not locked, so its coroutine
    is run to its end here instead of in a task of its own.
    """
    if lock.locked():
        return False
    acquire = lock.acquire()
    try:
        acquire.send(None)
    except StopIteration:
        return True
    acquire.close()  # not reached: an unlocked lock is acquired without waiting
    return False
