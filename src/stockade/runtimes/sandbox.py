"""``AgentSandbox``: a live isolate and the host half of the guest agent protocol.

Exec, code, files and background processes are implemented once, here, by
talking framed JSON-RPC to the same guest agent in every isolate over one
async channel (``channel.py``). The async methods are the implementation; the
blocking ones run them to their end (``blocking.py``). A runtime subclass
supplies only the hooks: what to kill, what the isolate used, what it tried.

Sandboxes are resources: ``close()`` is idempotent and releases everything even
when the graceful path fails; they are context managers.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..environments import run_env
from ..errors import (
    AgentProtocolError,
    PolicyError,
    SandboxClosedError,
    SandboxError,
    start_error,
)
from ..limits import check_call_size, check_env, stdin_bytes
from ..policy import Policy
from ..result import ExecResult, SecurityViolation, TerminationReason, new_id
from .agent_requests import code_request, exec_params, run_params
from .base import BASE_ENV, IsolateUsage
from .blocking import run_blocking
from .channel import BLOCKING_CALLER, AgentChannel, awaited
from .loop_call import LoopCall
from .publish import AgentRelay, Forwarder
from .sandbox_files import AgentFiles
from .sandbox_processes import AgentProcesses
from .sandbox_results import AgentResults, accounts, settle_account
from .verdict import CallbackGuard, OutputCallback, PendingRun, read_verdict
from .violations import Leftovers, ViolationLog, merged, of_result

if TYPE_CHECKING:
    from ..egress.workers import EgressWorker
    from .egress import Egress

# How a call to the agent can end that is the isolate's end, not an error to raise.
_RUN_ENDINGS = (TimeoutError, EOFError, OSError, AgentProtocolError)
# Every isolate not yet closed: the ones still open when the interpreter exits are closed
# then (manager.py; a forgotten sandbox must not outlive its process, and ``__del__`` may
# never run).
open_isolates: weakref.WeakSet[AgentSandbox] = weakref.WeakSet()


class AgentSandbox(AgentFiles, AgentProcesses, AgentResults, abc.ABC):
    """A live isolate with a guest agent at the other end of ``self.channel``."""

    runtime_name: str
    node = "local"  # where it runs (placement/base.py's Isolate): this host
    scratch_dir = "/tmp"  # a writable directory inside the isolate

    def __init__(self, policy: Policy, conn: socket.socket, cold_start_ms: float) -> None:
        self.policy = policy
        self._owner_pid = os.getpid()  # a forked child holds a copy of this handle, not the sandbox
        self.channel = AgentChannel(conn, self._agent_notice, self._redacted, self._abandoned)
        self.cold_start_ms = cold_start_ms
        # PATH, PYTHONPATH and the cache directories of the policy's Python environment, which
        # the runtime mounts at environments.ENV_ROOT (a pooled isolate's shape fixes it).
        self.environment_env = run_env(path=BASE_ENV["PATH"]) if policy.environment_id else {}
        self.unenforced_limits: list[str] = []
        self.forwarders: list[Forwarder | AgentRelay] = []  # published ports, closed with the isolate
        self.forwarders_lock = threading.Lock()
        # Under network_policy "allowlist": the egress proxy's gate, its secrets and their redaction.
        self.egress: Egress | None = None
        self.roots_written = False  # the host's CA roots are in egress.CA_BUNDLE_PATH already (pool)
        self._closed = False
        self._dead = False  # the isolate ended (killed, OOM, agent gone)
        self._kill_reason: TerminationReason | None = None
        self._cancelled: str | None = None  # why its caller ended it (``cancel``)
        # Counters taken when a pooled isolate became ready: nothing runs in it
        # between then and its first request, so they stand in for a fresh read.
        self.baseline: IsolateUsage | None = None
        # Set by one-shot callers (run, run_code, execute): the isolate serves one
        # command and is then torn down, so its agent is told not to fork a runner
        # ahead for a next one; that fork would compete for the CPU with the caller.
        self.one_shot = False
        self._settling: concurrent.futures.Future[Any] | None = None  # the last run's account, taken off the loop
        self._settling_run: PendingRun | None = None  # the run that account is of
        # The last run's result from when its account is taken until its caller has it: one whose
        # caller gave up meanwhile (or whose output callback failed) is the next report's, with those
        # of earlier runs no caller had (``_unclaimed_before``).
        self._unclaimed: ExecResult | None = None
        self._unclaimed_before: Leftovers | None = None
        self._ended_by: str | None = None  # what the run that took the isolate down said, for the next call
        self.forks_counted = False  # its pids_limit is a cgroup's, which counts refused forks (job_limits)
        # The current run's violations, bounded (violations.py); the runtime feeds it.
        self.violation_log = ViolationLog()
        open_isolates.add(self)

    # ---- runtime hooks -----------------------------------------------------------

    def usage(self, peak: bool = True) -> IsolateUsage:
        """Counters of the isolate as a whole (cumulative); ``peak=False`` skips the peak memory."""
        return IsolateUsage()

    def _collect_violations(self) -> None:
        """Take in every violation the isolate has made so far: a runtime whose reports
        are not handed over as they happen (gVisor's log) reads what is pending."""
        return None

    def take_report(self) -> Leftovers:
        """What the isolate did since the last run's report, for work that is not a run (a spawned
        MCP server's tool call): the violations it was refused, and its egress requests."""
        egress, dropped = self.egress.take() if self.egress is not None else ([], 0)
        self._collect_violations()
        taken = Leftovers(self.violation_log.take(), egress, dropped)
        unclaimed, self._unclaimed = self._unclaimed, None
        before, self._unclaimed_before = self._unclaimed_before, None
        if unclaimed is not None:
            taken = merged(of_result(unclaimed), taken)
        return taken if before is None else merged(before, taken)

    async def atake_report(self) -> Leftovers:
        await self.settled()  # the last run's account first: what it did is its own
        return await asyncio.wrap_future(accounts().submit(self.take_report))  # the worker: a round trip

    def _take_egress(self) -> tuple[list[socket.socket], EgressWorker]:
        """The egress proxy's TCP listener and name service UDP socket, both on the isolate's own
        loopback, and the worker started to serve them; a runtime without them refuses network_policy
        allowlist."""
        raise PolicyError(f"network_policy 'allowlist' is not offered by the {self.runtime_name} runtime")

    def _redacted(self, data: bytes) -> bytes:
        """``data`` leaving the isolate, with any secret value of its egress taken out (egress.md)."""
        return self.egress.redactor.bytes(data) if self.egress is not None else data

    def isolate_pid(self) -> int | None:
        """The host pid of the isolate's first process, when the host can see it."""
        return None

    def last_words(self) -> str:
        """What the runtime itself logged (runsc, the VM console), for when the agent vanished."""
        return ""

    def _count_violation(
        self, name: str, blocked: bool, build: Callable[[], SecurityViolation], by_policy: bool = True, times: int = 1
    ) -> None:
        """A runtime saw a violation named ``name`` (``times`` of them): count it in the run's
        report (``build`` makes its record while the report has room), and end the isolate if
        the policy says so (``by_policy``: refused by the policy, not a call the runtime's kernel
        lacks). Called from the runtime's own thread (a supervisor, a log reader)."""
        refused = self.violation_log.tally(name, blocked, build, times)
        if blocked and self._kill_reason is None and self._violations_end_run(refused, by_policy):
            self._mark_dead("violation")

    def _violations_end_run(self, refused: int, by_policy: bool) -> bool:
        """``on_violation="kill"`` ends a run at its first call the policy refused;
        ``max_violations`` ends it once it has made more than that many refused calls of
        any kind (a flood)."""
        limit = self.policy.max_violations
        if limit is not None and refused > limit:
            return True
        return by_policy and refused > 0 and self.policy.on_violation == "kill"

    def _agent_notice(self, method: str, params: dict[str, Any]) -> None:
        """A notification from the agent other than output. Ignored by default: where the
        host watches the isolate itself (the process runtime, gVisor), the agent, which
        runs next to the code, has nothing to tell it that it would believe."""
        return None

    def cancel(self, why: str) -> None:
        """End the isolate for its caller: a run in progress ends as ``killed``, ``why`` its error."""
        if self._kill_reason is None:
            self._cancelled = why
        self._mark_dead("killed")

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill everything in the isolate now. Idempotent."""

    @abc.abstractmethod
    def _release(self) -> None:
        """Free every host resource of the isolate (after kill). Idempotent."""

    # ---- runs ---------------------------------------------------------------------------

    async def aexec(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        return await self.arun_request("exec", exec_params(argv, cwd), stdin, env, timeout, on_output)

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
        method, params = code_request(code, language, session, stdin)
        return await self.arun_request(method, params, stdin, env, timeout, on_output)

    def exec(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        return run_blocking(self.aexec(argv, stdin=stdin, env=env, cwd=cwd, timeout=timeout, on_output=on_output))

    def run_code(
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
        return run_blocking(
            self.arun_code(code, language, stdin=stdin, env=env, timeout=timeout, on_output=on_output, session=session)
        )

    async def settled(self) -> None:
        """Return once no call to the agent is in flight (a call given up is left to finish), and
        the last run's account is taken."""
        await self.channel.settled()
        if (taking := self._settling) is not None:
            await asyncio.wait([asyncio.wrap_future(taking)])

    def interrupt(self, session: str | None = None) -> bool:
        """Interrupt the run in progress from another thread: SIGINT to it (a cell raises
        KeyboardInterrupt and its interpreter keeps its state; a command gets Ctrl-C). False
        when nothing was running (``session``: when no cell of that interpreter was)."""
        if self._dead or self._closed:
            return False
        return self.channel.interrupt(session)

    async def ainterrupt(self, session: str | None = None) -> bool:
        """``interrupt``, for an awaiting caller (it never waits)."""
        return self.interrupt(session)

    async def aclose_interpreter(self, session: str) -> bool:
        """End ``session``'s interpreter as a program ends; its next cell starts a fresh one."""
        reply = await self._agent_call("close_interpreter", {"session": session}, 30.0)
        return isinstance(reply, dict) and reply.get("closed") is True

    def close_interpreter(self, session: str) -> bool:
        return run_blocking(self.aclose_interpreter(session))

    # ---- lifecycle --------------------------------------------------------------------------

    async def aping(self, timeout: float = 10.0) -> dict[str, Any]:
        reply = await self._agent_call("ping", {}, timeout)
        return reply if isinstance(reply, dict) else {}

    def ping(self, timeout: float = 10.0) -> dict[str, Any]:
        return run_blocking(self.aping(timeout))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def ended(self) -> str | None:
        """Why the isolate has ended of itself while its sandbox is not closed (a violation under
        ``on_violation: kill``, a run that took it down, its processes killed from outside); None
        while it runs, or when its caller ended it (``cancel``: a close, the daemon's stop)."""
        return self._death() if self._dead and not self._closed and self._cancelled is None else None

    def close(self) -> None:
        if self._closed:
            return
        if self._kill_reason is None:  # a call in flight (another thread's) reads why it ended
            self._cancelled, self._kill_reason = "the sandbox was closed during this call", "killed"
        with self.forwarders_lock:  # a publish that ends after this closes its own forwarder
            self._closed = True
            forwarders = list(self.forwarders)
        for forwarder in forwarders:
            forwarder.close()
        if self.egress is not None:
            self.egress.close()
        try:
            self.kill()
        finally:
            try:
                self.channel.close()
            finally:
                self._release()

    async def aclose(self) -> None:
        """``close`` in a thread (it waits for the isolate's processes and cgroups to go)."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> AgentSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten sandbox must not outlive its handle
        # ...in the process that made it: a forked child's exit must not end its parent's sandbox.
        if not getattr(self, "_closed", True) and getattr(self, "_owner_pid", None) == os.getpid():
            try:
                self.close()
            except Exception:  # noqa: BLE001, S110 - nothing to report to at interpreter teardown
                pass

    # ---- running --------------------------------------------------------------------------

    async def arun_request(
        self,
        method: str,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """An agent run request (``exec_params`` or ``code_params``), awaited."""
        result: ExecResult = await awaited(
            lambda done: self.start_run(method, params, stdin, env, timeout, on_output, done)
        )
        return result

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
    ) -> LoopCall:
        """A run on the running event loop, in its callbacks: the request is sent now and
        ``done`` gets the result (or the exception that stopped the run) from the loop's
        reader callback, in the turn the agent's answer arrives: no task is woken for it
        (the daemon's one-shot path; ``arun_request`` wraps it in a future).

        A request that cannot start (a closed or dead sandbox, another call in
        progress) raises here; once started, ``done`` is called exactly once,
        never before this returns, unless ``abort`` is called first.
        ``execution_id`` is the result's, when the caller has named the run already.
        """
        run = self._begin_run(params, stdin, env, timeout, on_output, execution_id)
        guard = CallbackGuard(on_output)

        # A blocking caller's loop is its own: nothing else waits on it.
        off_loop = self.egress is not None and not BLOCKING_CALLER.get()
        # This run's account (its usage, violations, egress) taken: the next run waits for it, from
        # the moment this one opens (the turn is free again before ``answered`` runs).
        account: concurrent.futures.Future[None] = concurrent.futures.Future()

        def settled(reply: Any, interrupted: bool) -> ExecResult | Exception:
            try:
                return self._settle_run(run, guard, reply, interrupted)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, as an awaited run would raise it
                return exc
            finally:
                settle_account(account)

        def hand(outcome: ExecResult | Exception) -> None:
            if outcome is self._unclaimed:
                self._unclaimed = None  # claimed
            done(outcome)

        def answered(reply: Any) -> None:
            run.answered = True  # its account is this callback's to take, whatever becomes of the call
            interrupted = self.channel.last_interrupted  # this run's: set as its call let go of the turn
            if not off_loop:
                hand(settled(reply, interrupted))
                return
            # The egress worker's account is a round trip to a process the isolate's own traffic may
            # keep busy (up to its timeout): asked from a thread of stockade's own, so that neither the
            # loop (a daemon's, serving every other caller) nor its default pool waits on it. The next
            # run waits for it (_open_run): it takes the records and violations up to its own start.
            try:
                taking = accounts().submit(settled, reply, interrupted)
            except RuntimeError:  # the interpreter is going: no thread starts now, the loop waits instead
                hand(settled(reply, interrupted))
                return
            asyncio.wrap_future(taking, loop=loop).add_done_callback(deliver)

        def deliver(taken: asyncio.Future[ExecResult | Exception]) -> None:
            if call.aborted:  # its caller went away meanwhile: what the run did stays for the next report
                return
            if taken.cancelled():
                done(SandboxError("the run ended but its result was lost: its account was cancelled"))
            elif (failed := taken.exception()) is not None:
                done(SandboxError(f"the run ended but its result was lost: {failed!r}"))
            else:
                hand(taken.result())

        loop = asyncio.get_running_loop()
        call = self.channel.start(
            loop, method, run.params, run.wait, guard.callback, answered, lambda: self._open_run(run, account)
        )
        return call

    def _settle_run(self, run: PendingRun, guard: CallbackGuard, reply: Any, interrupted: bool) -> ExecResult:
        """The result of a run from the agent's reply, or from the exception that ended the call.

        A timeout, a lost or garbled connection ends the isolate and is a verdict
        (a result that says so); any other exception (the agent's own error, the
        caller's output callback) is raised.
        """
        if isinstance(reply, Exception) and not isinstance(reply, _RUN_ENDINGS):
            raise start_error(reply)  # no such program: FileNotFoundError, as subprocess.run raises
        if isinstance(reply, _RUN_ENDINGS):
            verdict, error = None, self._ended(reply)
        else:
            try:
                verdict, error = read_verdict(reply), None
            except AgentProtocolError as exc:
                verdict, error = None, self._ended(exc)
        # Kept until its caller has it (``hand``), before the account is said to be taken.
        if (earlier := self._unclaimed) is not None:  # a run before it whose caller never had it
            kept = self._unclaimed_before
            self._unclaimed_before = of_result(earlier) if kept is None else merged(kept, of_result(earlier))
        result = self._unclaimed = self._finish_run(run, verdict, error, interrupted)
        return guard.check(result) if verdict is not None else result

    def _begin_run(
        self,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None,
        execution_id: str | None = None,
    ) -> PendingRun:
        self._check_usable()
        if on_output is not None and not callable(on_output):
            raise TypeError(f"on_output must be a callable (stream, data), not {type(on_output).__name__}")
        execution_id = execution_id or new_id()
        raw_stdin = stdin_bytes(stdin)
        check_call_size("stdin", raw_stdin)  # before anything is sent or counted (limits.py)
        check_call_size("code", params.get("code"))
        check_env(env)
        env = {**self.environment_env, **self.policy.environment, **(env or {})}
        wait = run_params(
            params, self.policy, raw_stdin, env, timeout, on_output is not None, self.one_shot, self.forks_counted
        )
        return PendingRun(params, wait, IsolateUsage(), 0.0, execution_id)  # opened by _open_run

    def _open_run(self, run: PendingRun, account: concurrent.futures.Future[None]) -> None:
        """The run's turn has come (a blocking caller may have waited for it): its counters and
        its violation report start here, not before, so that they are its own."""
        self._check_usable()
        self._await_account()
        run.before, self.baseline = self.baseline or self.usage(peak=False), None
        self._collect_violations()
        # What was reported since the last run (a process that run left running) opens this
        # run's report, marked: a call made between runs is not a call reported nowhere.
        self.violation_log.begin_run()
        run.started = time.monotonic()
        self._settling, self._settling_run = account, run

    async def _agent_call(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        """A request other than a run: an agent that garbles its answer or stops answering
        ends the isolate, and the caller gets a ``SandboxError``."""
        self._check_usable()
        try:
            return await self.channel.call(method, params, timeout, check=self._check_usable)
        except AgentProtocolError as exc:
            said = self._kill_vanished()
            if not said:
                raise
            raise AgentProtocolError(f"{exc}{said}") from None
        except (TimeoutError, EOFError, OSError) as exc:
            if self._closed:  # closed under it (another thread)
                raise SandboxClosedError(f"the sandbox was closed during this call ({method})") from None
            said = self._kill_vanished()
            raise SandboxError(f"the isolate stopped answering ({method}): {exc}; it was killed{said}") from None

    def _abandoned(self, method: str) -> None:
        if not self._dead and not self._closed:
            self.cancel(f"its caller stopped waiting for {method} before the agent answered, which ended the isolate")
        run, account = self._settling_run, self._settling
        if run is not None and account is not None and not run.answered:
            # Given up before its answer: no result takes its account. What it did (its violations,
            # its egress) stays for the next report (``take_report``), which need not wait for it.
            settle_account(account)

    def _check_usable(self) -> None:
        if self._closed:
            raise SandboxClosedError("the sandbox is closed")
        if self._dead:
            raise SandboxError(f"{self._death()}; start a new sandbox")

    def _ended(self, exc: BaseException) -> str | None:
        """The isolate stopped answering: kill it, and say why (None for a timeout, which is a verdict)."""
        if isinstance(exc, TimeoutError):
            self._mark_dead("timeout")
            return None
        if self._kill_reason == "violation":
            return None  # the host killed it for a violation: expected, and the result says which
        if self._cancelled is not None:
            return self._cancelled  # its caller ended it: that is the whole story
        said = self._kill_vanished()
        if isinstance(exc, AgentProtocolError):
            return f"the isolate's agent broke the protocol ({exc}); the isolate was killed{said}"
        return f"the isolate ended unexpectedly: {exc}{said}"

    def _kill_vanished(self) -> str:
        """Kill an isolate whose agent is gone or garbled; return `` (<runtime> said: ...)`` or ""."""
        words = self.last_words()  # read before the kill: the runtime's log is its account
        self._mark_dead(None)
        return f" ({self.runtime_name} said: {words})" if words else ""

    def _broke_protocol(self, what: str) -> AgentProtocolError:
        """The agent answered with something no honest agent sends: the isolate is killed."""
        self._mark_dead(None)
        return AgentProtocolError(f"{what}; the isolate was killed")

    def _mark_dead(self, reason: TerminationReason | None) -> None:
        if reason and self._kill_reason is None:
            self._kill_reason = reason
        self._dead = True
        self.kill()

    def _death(self) -> str:
        """Why the isolate ended, for a call that finds it dead: a run's result said so already,
        unless it was killed for a call made between runs (reported nowhere else)."""
        if self._cancelled is not None:
            return f"the isolate was ended: {self._cancelled}"
        if self._kill_reason != "violation":
            return f"the isolate ended during a run ({self._ended_by})" if self._ended_by else "the isolate has ended"
        self._collect_violations()
        names = self.violation_log.names()
        named = f" ({', '.join(names)})" if names else ""
        return f"the isolate was killed after a policy violation{named}"
