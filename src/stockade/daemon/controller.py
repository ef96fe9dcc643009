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
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from ..errors import SandboxError
from ..limits import check_call_size
from ..policy import Policy, coerce_policy
from ..result import ExecResult, new_id
from ..runtimes.base import AgentSandbox, OutputCallback, code_params, exec_params
from ..runtimes.manager import RuntimeManager
from .config import DaemonConfig
from .errors import RequestError
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


@dataclass
class Held:
    """A sandbox a client created and holds."""

    sandbox_id: str
    sandbox: AgentSandbox
    owner_uid: int
    connection: int | None  # closed with this connection, unless kept
    idle_timeout_s: float | None  # closed after this long without a call; None: never
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)  # when its last call ended
    calls: int = 0  # calls running or waiting for its lock: it is not idle while any is
    idle_timer: asyncio.TimerHandle | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def idle_seconds(self, now: float) -> float:
        return 0.0 if self.calls else max(0.0, now - self.last_used)


@dataclass(slots=True)
class Running:
    execution_id: str
    runtime: str
    owner_uid: int
    started: float = field(default_factory=time.monotonic)
    sandbox: AgentSandbox | None = None  # None while its isolate is still being started
    cancelled: str | None = None  # why, once ``execute.cancel`` ended it


class Controller:
    def __init__(self, config: DaemonConfig, manager: RuntimeManager | None = None) -> None:
        self.config = config
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
        self._expired: OrderedDict[str, tuple[int, str]] = OrderedDict()  # sandbox id -> (owner uid, why)
        self._closing: set[asyncio.Task[None]] = set()
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

    # ---- methods --------------------------------------------------------------------

    async def selftest(self) -> dict[str, Any]:
        """Run a real sandbox end to end and check that it is really confined."""
        probe = (
            "import os\n"
            "st = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
            "print(6 * 7, *(st.get(k, '').strip() for k in ('CapEff', 'NoNewPrivs', 'Seccomp')),"
            " os.path.exists('/root'))"
        )
        result = await self._execute_job(ExecuteJob(coerce_policy(None), None, probe, "python", b""), uid=-1)
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
        return {
            "ok": ok and confined,
            "message": message,
            "verified": confined,
            "runtime": result.runtime_used,
            "policy_digest": result.policy_digest,
        }

    @staticmethod
    def check_execute(params: dict[str, Any]) -> ExecuteJob:
        """An ``execute`` request's arguments, checked (``RequestError``/``PolicyError`` if bad)."""
        return _job(params)

    async def execute(
        self, params: dict[str, Any] | ExecuteJob, uid: int, on_output: OutputCallback | None = None
    ) -> ExecResult:
        """Run one ``execute``: from its raw params, or from a job ``check_execute`` made already."""
        job = params if isinstance(params, ExecuteJob) else _job(params)
        return await self._execute_job(job, uid, on_output)

    def execute_now(
        self, job: ExecuteJob, uid: int, done: Callable[[ExecResult | Exception], None]
    ) -> Callable[[], None] | None:
        """``execute``, without a task, when a slot and a warm isolate are free right now.

        Returns None when they are not (the caller awaits ``execute`` instead).
        Otherwise the run has started, ``done`` gets its result (or what stopped
        it) in the loop turn the agent answers, so the answer can go out with no
        task woken on the way, and the function returned abandons the run (for a
        caller that goes away first; ``done`` is then not called). ``job`` comes
        from ``check_execute``, so a caller that falls back to ``execute`` hands
        it the same job instead of having its arguments checked again.
        """
        runtime = self.manager.select(job.policy)
        take, dispose = getattr(runtime, "take_warm", None), getattr(runtime, "dispose", None)
        if take is None or dispose is None or not self.slots.take_now(uid):
            return None  # the awaited path says why, or waits for a slot
        try:
            sandbox: AgentSandbox | None = take(job.policy)
        except BaseException:  # a limit the host refused at hand-over: the slot goes back
            self.slots.release(uid)
            raise
        if sandbox is None:
            self.slots.release(uid)
            return None
        sandbox.one_shot = True
        # Named before it starts, so that the result carries the id ``status`` shows.
        execution_id = new_id()

        def bookkeeping() -> None:
            self._dispose_after_answer(sandbox, dispose)
            self._ended(execution_id)

        finish = _settle_once(done, bookkeeping)

        # The agent's request goes out first; the bookkeeping follows it, in
        # the same loop turn (``finish`` is never called before this returns).
        try:
            method, request = _agent_request(job)
            call = sandbox.start_run(method, request, job.stdin, None, None, None, finish, execution_id)
        except BaseException:
            self._dispose_after_answer(sandbox, dispose)
            self.slots.release(uid)
            raise
        self._started(runtime.name, uid, execution_id, sandbox)

        def abandon() -> None:
            call.abort()
            finish(None)

        return abandon

    def _started(
        self, runtime: str, uid: int, execution_id: str | None = None, sandbox: AgentSandbox | None = None
    ) -> str:
        """Count a running execute in; its id (drawn here unless given), from start to end:
        ``status`` shows it while the run is going and the ExecResult carries it, so a
        caller can match the two."""
        self._track(+1)
        execution_id = execution_id or new_id()
        self.running[execution_id] = Running(execution_id, runtime, uid, sandbox=sandbox)
        return execution_id

    def cancel(self, params: dict[str, Any], uid: int) -> dict[str, Any]:
        """``execute.cancel``: end a running execute (its owner's, or any as root).

        A run under way ends at once (its isolate is killed) and is answered as
        ``killed``; one whose isolate is still starting is answered with a
        ``cancelled`` error instead, and its isolate is ended as soon as it exists.
        """
        execution_id = params.get("execution_id")
        running = self.running.get(execution_id) if isinstance(execution_id, str) else None
        if running is None or uid not in (running.owner_uid, 0):  # another uid's run is reported as missing
            raise RequestError(f"no running execution {execution_id!r}", "not_found")
        if running.cancelled is None:
            running.cancelled = f"cancelled by uid {uid} (execute.cancel)"
            log.info("execution %s of uid %d cancelled by uid %d", execution_id, running.owner_uid, uid)
            if running.sandbox is not None:
                running.sandbox.cancel(running.cancelled)
        return {"execution_id": execution_id, "cancelled": True}

    def _ended(self, execution_id: str) -> None:
        self.slots.release(self.running.pop(execution_id).owner_uid)
        self._track(-1)

    async def _execute_job(self, job: ExecuteJob, uid: int, on_output: OutputCallback | None = None) -> ExecResult:
        policy = job.policy
        runtime = self.manager.select(policy)
        await self.slots.take(uid)
        execution_id = self._started(runtime.name, uid)
        try:
            # A warm isolate is handed over and spoken to on the event loop itself:
            # a trip through the thread pool costs two thread wake-ups (~1 ms here).
            # Only building an isolate on demand blocks, so only that goes to a thread.
            take = getattr(runtime, "take_warm", None)
            sandbox: AgentSandbox | None = take(policy) if take is not None else None
            if sandbox is None:
                sandbox = await self._start_for(runtime, policy)
            sandbox.one_shot = True
            running = self.running[execution_id]
            running.sandbox = sandbox
            try:
                if running.cancelled is not None:  # while its isolate was being started
                    sandbox.cancel(running.cancelled)
                    raise RequestError(f"{running.cancelled} before it started", "cancelled")
                if job.command is not None:
                    result = await sandbox.aexec(job.command, stdin=job.stdin, on_output=on_output)
                else:
                    result = await sandbox.arun_code(job.code or "", job.language, stdin=job.stdin, on_output=on_output)
                result.execution_id = execution_id
                return result
            finally:
                dispose = getattr(runtime, "dispose", None)
                if dispose is not None:
                    self._dispose_after_answer(sandbox, dispose)
                else:
                    await self._blocking(sandbox.close)
        finally:
            self._ended(execution_id)

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

    async def create(self, params: dict[str, Any], uid: int, connection: int) -> dict[str, Any]:
        policy = _policy(params.get("policy"))
        idle_timeout = _idle_timeout(params, self.config.sandbox_idle_timeout_s)
        runtime = self.manager.select(policy)
        await self.slots.take(uid)
        try:
            sandbox = await self._blocking(runtime.start, policy)
        except BaseException:
            self.slots.release(uid)
            raise
        sandbox_id = "sb-" + secrets.token_hex(8)
        keep = params.get("keep") is True
        held = Held(sandbox_id, sandbox, uid, None if keep else connection, idle_timeout)
        self.held[sandbox_id] = held
        self._watch_idle(held)
        return {
            "sandbox_id": sandbox_id,
            "runtime": sandbox.runtime_name,
            "policy_digest": policy.digest,
            "idle_timeout": idle_timeout,
        }

    def _lookup(self, params: dict[str, Any], uid: int) -> Held:
        sandbox_id = params.get("sandbox_id")
        held = self.held.get(sandbox_id) if isinstance(sandbox_id, str) else None
        # Another uid's sandbox is reported exactly like a missing one.
        if held is None or uid not in (held.owner_uid, 0):
            expired = self._expired.get(sandbox_id) if isinstance(sandbox_id, str) else None
            if expired is not None and uid in (expired[0], 0):
                raise RequestError(expired[1], "not_found")
            raise RequestError(f"no sandbox {sandbox_id!r}", "not_found")
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
        self._expired[held.sandbox_id] = (held.owner_uid, why)
        while len(self._expired) > EXPIRED_REMEMBERED:
            self._expired.popitem(last=False)
        log.info("closing sandbox %s of uid %d: idle for %g s", held.sandbox_id, held.owner_uid, held.idle_timeout_s)
        task = asyncio.get_running_loop().create_task(self._close_quietly(held))
        self._closing.add(task)  # a task nobody awaits must be referenced until it ends
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, held: Held) -> None:
        try:
            await self._close(held)
        except Exception:
            log.exception("closing idle sandbox %s failed", held.sandbox_id)

    def sandbox_call_now(
        self, method: str, params: dict[str, Any], uid: int, done: Callable[[ExecResult | Exception], None]
    ) -> Callable[[], None] | None:
        """A held sandbox's ``exec`` or ``run_code``, without a task, when no other call has it.

        As ``execute_now``: None when the sandbox is busy (the caller awaits
        ``sandbox_call`` instead, which waits its turn); otherwise the run has
        started and ``done`` gets its result in the loop turn the agent answers.
        A bad argument or an unknown sandbox raises ``RequestError`` here. The
        function returned is for a caller that goes away: the call is let
        finish (a kept sandbox stays in step with its agent), unanswered.
        """
        held = self._lookup(params, uid)
        run = _held_run(method, params)
        if held.calls or not _take_now(held.lock):
            return None
        held.calls += 1
        self._track(+1)
        finish = _settle_once(done, functools.partial(self._held_call_ended, held))
        try:
            held.sandbox.start_run(run.method, run.request, run.stdin, run.env, run.timeout, None, finish)
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

    async def sandbox_call(
        self, method: str, params: dict[str, Any], uid: int, on_output: OutputCallback | None = None
    ) -> Any:
        held = self._lookup(params, uid)
        held.calls += 1  # from here, waiting for the lock included: not idle
        try:
            await held.lock.acquire()
        except BaseException:
            held.calls -= 1
            raise
        self._track(+1)
        try:
            return await self._sandbox_call(held.sandbox, method, params, on_output)
        finally:
            self._held_call_ended(held)

    async def _sandbox_call(
        self, sb: AgentSandbox, method: str, params: dict[str, Any], on_output: OutputCallback | None
    ) -> Any:
        if method in ("exec", "run_code"):
            run = _held_run(method, params)
            return await sb.arun_request(run.method, run.request, run.stdin, run.env, run.timeout, on_output)
        if method == "write_file":
            data = _b64(params, "data")
            await self._blocking(sb.write_file, _path(params), data, params.get("mode", 0o644))
            return {"path": params["path"], "size": len(data)}
        if method == "read_file":
            raw = await self._blocking(sb.read_file, _path(params), _max_bytes(params))
            return {"path": params["path"], "data": base64.b64encode(raw).decode()}
        if method == "list_dir":
            return {"path": params["path"], "entries": await self._blocking(sb.list_dir, _path(params))}
        raise RequestError(f"unknown sandbox method {method!r}", "method_not_found")

    async def close_sandbox(self, params: dict[str, Any], uid: int) -> dict[str, Any]:
        held = self._lookup(params, uid)
        await self._close(held, interrupt=f"the sandbox was closed by uid {uid} (sandbox.close) during this call")
        return {"sandbox_id": held.sandbox_id, "closed": True}

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
            self.slots.release(held.owner_uid)

    async def close_connection(self, connection: int) -> None:
        """Close the sandboxes a connection held (not kept ones), each once its call, if any, is done."""
        for held in [h for h in self.held.values() if h.connection == connection]:
            await self._close(held)

    def status(self, uid: int = 0) -> dict[str, Any]:
        """What runs: ``uid``'s own sandboxes and runs (root's: everyone's), and the
        daemon-wide counts. Another user's ids, runtimes and timings are not shown:
        they would tell one local user what another is doing."""
        now = time.monotonic()
        everything = [
            {
                "sandbox_id": h.sandbox_id,
                "kind": "held",
                "runtime": h.sandbox.runtime_name,
                "owner_uid": h.owner_uid,
                "uptime_seconds": round(now - h.created, 3),
                "idle_seconds": round(h.idle_seconds(now), 3),
                "idle_timeout": h.idle_timeout_s,
                "closing": h.sandbox_id in self.closing,
            }
            for h in [*self.held.values(), *self.closing.values()]
        ] + [
            {
                "execution_id": r.execution_id,
                "kind": "execute",
                "runtime": r.runtime,
                "owner_uid": r.owner_uid,
                "uptime_seconds": round(now - r.started, 3),
            }
            for r in self.running.values()
        ]
        return {
            "active_sandboxes": [e for e in everything if uid in (0, e["owner_uid"])],
            "total_count": len(everything),
            "max_sandboxes": self.config.max_sandboxes,
            "max_sandboxes_per_uid": self.config.max_sandboxes_per_uid,
            "waiting": self.slots.waiting,
        }

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


@dataclass(slots=True)  # not frozen: that doubles its cost to build, per request (docs/performance.md)
class ExecuteJob:
    """An ``execute`` request's arguments, checked."""

    policy: Policy
    command: list[str] | None
    code: str | None
    language: str
    stdin: bytes


def _job(params: dict[str, Any]) -> ExecuteJob:
    command, code = params.get("command"), params.get("code")
    if (command is None) == (code is None):
        raise RequestError("execute needs exactly one of 'command' (a list of strings) or 'code'")
    if command is not None and (
        not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command)
    ):
        raise RequestError("command must be a non-empty list of strings")
    if code is not None and not isinstance(code, str):
        raise RequestError("code must be a string")
    stdin = _stdin(params)
    check_call_size("code", code)  # before a slot is taken or an isolate started
    check_call_size("stdin", stdin)
    policy = _policy(params.get("policy"))
    return ExecuteJob(policy, command, code, _language(params), stdin)


@dataclass(slots=True)  # not frozen: that doubles its cost to build, per request (docs/performance.md)
class HeldRun:
    """A held sandbox's ``exec`` or ``run_code`` request, checked: what goes to its agent."""

    method: str
    request: dict[str, Any]
    stdin: bytes
    env: dict[str, str] | None
    timeout: float | None


def _held_run(method: str, params: dict[str, Any]) -> HeldRun:
    if method == "exec":
        argv = params.get("command")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise RequestError("command must be a non-empty list of strings")
        request = exec_params(argv, _optional_str(params, "cwd"))
    elif method == "run_code":
        code = params.get("code")
        if not isinstance(code, str):
            raise RequestError("code must be a string")
        check_call_size("code", code)
        request = code_params(code, _language(params))
    else:
        raise RequestError(f"unknown sandbox method {method!r}", "method_not_found")
    stdin = _stdin(params)
    check_call_size("stdin", stdin)
    return HeldRun(method, request, stdin, _env(params), _timeout(params))


def _agent_request(job: ExecuteJob) -> tuple[str, dict[str, Any]]:
    if job.command is not None:
        return "exec", exec_params(job.command)
    return "run_code", code_params(job.code or "", job.language)


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


def _idle_timeout(params: dict[str, Any], limit: float | None) -> float | None:
    """``sandbox.create``'s ``idle_timeout``: seconds, at most the daemon's own (``limit``),
    which is also the default; None when neither sets one."""
    value = _seconds(params, "idle_timeout")
    if value is None:
        return limit
    if limit is not None and value > limit:
        raise RequestError(
            f"idle_timeout {value:g} s is over this daemon's limit of {limit:g} s (STOCKADE_SANDBOX_IDLE_TIMEOUT)"
        )
    return value


def _policy(value: Any) -> Policy:
    """A request's ``policy`` (none, or ``{}``, is the default one: ``coerce_policy`` says so)."""
    if value is None or isinstance(value, dict):
        return coerce_policy(value)
    raise RequestError("policy must be an object of Policy fields")


def _stdin(params: dict[str, Any]) -> bytes:
    if params.get("stdin_b64") is not None:
        return _b64(params, "stdin_b64")
    value = params.get("stdin")
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    raise RequestError("stdin must be a string")


def _timeout(params: dict[str, Any]) -> float | None:
    """A call's own ``timeout``: seconds (the policy's bound still applies), or None."""
    return _seconds(params, "timeout")


def _seconds(params: dict[str, Any], name: str) -> float | None:
    """``params[name]`` as a positive, finite number of seconds, or None when absent."""
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise RequestError(f"{name} must be a positive number of seconds, not {value!r}"[:200])
    return float(value)


def _optional_str(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None or isinstance(value, str):
        return value
    raise RequestError(f"{name} must be a string")


def _language(params: dict[str, Any]) -> str:
    value = params.get("language", "python")
    if isinstance(value, str):
        return value
    raise RequestError("language must be a string")


def _env(params: dict[str, Any]) -> dict[str, str] | None:
    env = params.get("env")
    if env is None:
        return None
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise RequestError("env must map strings to strings")
    return env


def _max_bytes(params: dict[str, Any]) -> int | None:
    value = params.get("max_bytes")
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return value
    raise RequestError("max_bytes must be a non-negative integer")


def _path(params: dict[str, Any]) -> str:
    path = params.get("path")
    if not isinstance(path, str) or not path:
        raise RequestError("path must be a non-empty string")
    return path


def _b64(params: dict[str, Any], name: str) -> bytes:
    value = params.get(name)
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise RequestError(f"{name} is not valid base64") from None
