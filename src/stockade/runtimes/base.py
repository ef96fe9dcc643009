"""The runtime interface, and the host half of the guest agent protocol shared by every runtime.

A ``Runtime`` knows how to start, confine, connect and stop an isolate. Exec,
files and code are implemented once, in ``AgentSandbox``, by talking framed
JSON-RPC to the same guest agent in every isolate. A runtime subclass supplies
only the hooks: what to kill, what the isolate used, what it tried.

Sandboxes are resources: ``close()`` is idempotent and releases everything even
when the graceful path fails; they are context managers.
"""

from __future__ import annotations

import abc
import base64
import functools
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..agent import wire
from ..agent.sessions import INTERRUPT_GRACE_S
from ..environments import run_env
from ..errors import (
    AgentError,
    AgentProtocolError,
    CallTooLargeError,
    PolicyError,
    SandboxClosedError,
    SandboxError,
    agent_error,
    sandbox_os_error,
)
from ..limits import check_call_size
from ..policy import Policy
from ..result import EgressRequest, ExecResult, ResourceUsage, SecurityViolation, TerminationReason, new_id
from .agent_requests import code_request, exec_params, job_limits
from .cells import cell_fields
from .judgement import judge
from .loop_call import LoopCall, decode_message, loop_tools, settle_outcome
from .publish import AgentRelay, Forwarder, parse_publish
from .reaper import Reaper
from .spawned import Process
from .verdict import CallbackGuard, OutputCallback, PendingRun, Verdict, b64_field, read_verdict
from .violations import ViolationLog, ViolationReport

if TYPE_CHECKING:
    import asyncio

    from ..egress.workers import EgressWorker
    from .egress import Egress


# How long past the policy's timeout the host waits for the agent's own verdict
# before it kills the isolate itself.
HOST_TIMEOUT_GRACE_S = 2.0
UNBOUNDED = float("inf")  # exec(timeout=UNBOUNDED): run until it ends or the sandbox closes
_FOREVER_S = 10.0 * 365 * 24 * 3600
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

    def close(self) -> None:  # noqa: B027 - most runtimes hold nothing runtime-wide
        """Release runtime-wide resources (pools, helper processes)."""

    # -- one-shot isolates: taken, then disposed of (a pooled runtime overrides these) --------

    _reaper: Reaper | None = None

    def take_warm(self, policy: Policy) -> AgentSandbox | None:
        """A pre-built isolate for ``policy``, handed over without blocking, or None (no pool, no fit)."""
        return None

    def acquire(self, policy: Policy) -> AgentSandbox:
        """A fresh isolate for a one-shot run: a warm one when there is one, else started now."""
        return self.take_warm(policy) or self.start(policy)

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


class AgentSandbox(abc.ABC):
    """A live isolate with a guest agent on ``self.conn``."""

    runtime_name: str
    scratch_dir = "/tmp"  # a writable directory inside the isolate

    def __init__(self, policy: Policy, conn: socket.socket, cold_start_ms: float) -> None:
        self.policy = policy
        self.conn = conn
        self.cold_start_ms = cold_start_ms
        # PATH, PYTHONPATH and the cache directories of the policy's Python environment, which
        # the runtime mounts at environments.ENV_ROOT (a pooled isolate's shape fixes it).
        self.environment_env = run_env(path=BASE_ENV["PATH"]) if policy.environment_id else {}
        self.unenforced_limits: list[str] = []
        self._next_id = 0
        self._lock = threading.Lock()
        self._interrupt_lock = threading.Lock()  # an interrupt's frame never splits a request's
        self._request_sent = False
        self._loop_call: LoopCall | None = None  # the run in progress on an event loop
        self._running = ""  # the method of the request in flight (or last sent)
        self._interrupt_sent = False  # that request was interrupted already
        self.forwarders: list[Forwarder | AgentRelay] = []  # published ports, closed with the isolate
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
        # The current run's violations, bounded (violations.py); the runtime feeds it.
        self.violation_log = ViolationLog()

    # ---- runtime hooks -----------------------------------------------------------

    def usage(self, peak: bool = True) -> IsolateUsage:
        """Counters of the isolate as a whole (cumulative); ``peak=False`` skips the peak memory."""
        return IsolateUsage()

    def _collect_violations(self) -> None:
        """Take in every violation the isolate has made so far: a runtime whose reports
        are not handed over as they happen (gVisor's log) reads what is pending."""
        return None

    def take_report(self) -> tuple[ViolationReport, list[EgressRequest]]:
        """What the isolate did since the last run's report, for work that is not a run (a spawned
        MCP server's tool call): the violations it was refused, and its egress requests."""
        egress = self.egress.take()[0] if self.egress is not None else []
        self._collect_violations()
        return self.violation_log.take(), egress

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

    def _count_violation(self, name: str, blocked: bool, build: Callable[[], SecurityViolation]) -> None:
        """A runtime saw a violation named ``name``: count it in the run's report (``build``
        makes its record while the report has room), and end the isolate if the policy says
        so. Called from the runtime's own thread (a supervisor, a log reader)."""
        refused = self.violation_log.tally(name, blocked, build)
        if blocked and self._kill_reason is None and self._violations_end_run(refused):
            self._mark_dead("violation")

    def _violations_end_run(self, refused: int) -> bool:
        """``on_violation="kill"`` ends a run at its first refused call; ``max_violations``
        ends it once it has made more than that many (a flood)."""
        limit = self.policy.max_violations
        return refused > 0 and (self.policy.on_violation == "kill" or (limit is not None and refused > limit))

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

    # ---- public API -------------------------------------------------------------------

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
        return self._run("exec", exec_params(argv, cwd), stdin, env, timeout, on_output)

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
        return self._run(*code_request(code, language, session, stdin), stdin, env, timeout, on_output)

    def spawn(
        self,
        argv: list[str],
        *,
        stdin: bytes | str = b"",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> Process:
        """Start ``argv`` in the background; its handle (``runtimes/spawned.py``). It runs until it
        ends, is killed, or the sandbox closes; other calls go on meanwhile."""
        raw = stdin.encode() if isinstance(stdin, str) else stdin
        check_call_size("stdin", raw)
        params = {
            **exec_params(argv, cwd),
            "env": {**self.environment_env, **self.policy.environment, **(env or {})},
            "stdin": base64.b64encode(raw).decode() if raw else "",
            "limits": job_limits(self.policy),
        }
        said = self.proc_call("spawn", params)
        return Process(self, str(said.get("handle")), int(said.get("pid", 0)), list(argv))

    def publish(self, spec: int | str) -> tuple[str, int]:
        """Forward a host loopback port to ``spec``'s port on this isolate's own loopback
        (``runtimes/publish.py``); the host address and port. Runtimes that can reach their
        isolate's network namespace override ``_forwarder``."""
        address, host_port, port = parse_publish(spec)
        if self._closed or self._dead:
            raise SandboxClosedError("the sandbox is closed") if self._closed else SandboxError(self._death())
        if self.policy.network_policy != "loopback":
            raise PolicyError(
                "publishing a port needs network_policy='loopback': the isolate has no loopback otherwise"
            )
        forwarder = self._forwarder(address, host_port, port)
        self.forwarders.append(forwarder)
        return forwarder.address

    def _forwarder(self, address: str, host_port: int, port: int) -> Forwarder | AgentRelay:
        # The isolate's loopback is out of a host thread's reach (gVisor's netstack, a guest
        # kernel): relayed through the agent. The process runtime joins it instead.
        return AgentRelay(self, address, host_port, port)

    def processes(self) -> list[dict[str, Any]]:
        """The background processes the agent holds: ``{handle, pid, argv, running, exit_code}``."""
        listed = self.proc_call("proc_list", {}).get("processes")
        return listed if isinstance(listed, list) else []

    def proc_call(self, method: str, params: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """A background-process call to the agent; its answer as an object (a garbled one is refused)."""
        said = self._agent_call(method, params, timeout)
        if not isinstance(said, dict):
            raise AgentProtocolError(f"the agent's answer to {method} is not an object")
        if method == "proc_read" and self.egress is not None and self.egress.redactor:
            for stream in ("stdout", "stderr"):  # a background process's output leaves redacted too
                if isinstance(said.get(stream), str):
                    said[stream] = base64.b64encode(self._redacted(b64_field(said[stream]))).decode()
        return said

    def close_interpreter(self, session: str) -> bool:
        """End ``session``'s interpreter as a program ends; its next cell starts a fresh one."""
        reply = self._agent_call("close_interpreter", {"session": session}, 30.0)
        return isinstance(reply, dict) and reply.get("closed") is True

    def interrupt(self) -> bool:
        """Interrupt the run in progress from another thread: SIGINT to it (a cell raises
        KeyboardInterrupt and its interpreter keeps its state; a command gets Ctrl-C). False
        when nothing was running."""
        with self._interrupt_lock:
            call = self._loop_call  # a run driven by an event loop: this is called in its thread
            sent = self._request_sent or (call is not None and not call.unsent and not call.ended)
            if not sent or self._running not in _INTERRUPTIBLE or self._interrupt_sent or self._dead or self._closed:
                return False  # nothing to interrupt, or this run was interrupted already
            # One small frame per run, and only when the socket has room at once: an agent that
            # stops reading can never make this wait (it may be the daemon's event loop).
            _, room, _ = select.select([], [self.conn], [], 0)
            if not room:
                return False
            try:
                wire.write_all(self.conn.fileno(), wire.encode_message(wire.notification("interrupt", {})))
            except OSError:
                return False
            self._interrupt_sent = True
            return True

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

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644, append: bool = False) -> None:
        raw = data.encode() if isinstance(data, str) else data
        check_call_size("write_file data", raw)
        params: dict[str, Any] = {"path": path, "data": base64.b64encode(raw).decode(), "mode": mode}
        if append:
            params["append"] = True
        self._file_call("write_file", params)

    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """The file's bytes: all of them, or the first ``max_bytes``.

        A file larger than one protocol frame comes in pieces. It is read up to
        the size it had when the first piece was read, so code that keeps the
        file growing cannot keep the host reading.
        """
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
            raise ValueError("max_bytes must be a non-negative integer")
        got = bytearray()
        size: int | None = None
        while True:
            piece = wire.MAX_FILE_PIECE if max_bytes is None else min(wire.MAX_FILE_PIECE, max_bytes - len(got))
            data, more, now_size = self._read_piece(path, len(got), piece)
            got += data
            size = now_size if size is None else size
            if not more or not data or (max_bytes is not None and len(got) >= max_bytes) or len(got) >= size:
                return self._redacted(bytes(got))
            if max_bytes is None and len(got) >= MAX_WHOLE_READ:
                # The size is the agent's word: an untrusted agent could say any. A whole read stops here.
                raise SandboxError(f"{path} is larger than {MAX_WHOLE_READ} bytes: read it with max_bytes, in parts")

    def _file_call(self, method: str, params: dict[str, Any]) -> Any:
        """A file call to the agent; a path that does not exist there is ``PathNotFoundError``.

        The agent reports an OS error's errno as data. It is untrusted: a false
        ENOENT only changes which error the caller gets, never what happens.
        """
        try:
            return self._agent_call(method, params, 30.0)
        except AgentError as exc:
            mapped = sandbox_os_error(exc)  # FileNotFoundError, IsADirectoryError, ... as the agent's errno says
            if mapped is exc:
                raise
            raise mapped from None

    def _read_piece(self, path: str, offset: int, max_bytes: int) -> tuple[bytes, bool, int]:
        reply = self._file_call("read_file", {"path": path, "offset": offset, "max_bytes": max_bytes})
        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, str):
            raise self._broke_protocol("read_file reply has no data")
        try:
            piece = b64_field(data)
        except AgentProtocolError as exc:
            raise self._broke_protocol(str(exc)) from None
        if len(piece) > max_bytes:
            raise self._broke_protocol(f"read_file sent {len(piece)} bytes where at most {max_bytes} were asked for")
        size = reply.get("size")
        return piece, reply.get("truncated") is True, size if isinstance(size, int) and size >= 0 else 0

    def list_dir(self, path: str) -> list[dict[str, Any]]:
        reply = self._file_call("list_dir", {"path": path})
        entries = reply.get("entries") if isinstance(reply, dict) else None
        if not isinstance(entries, list):
            raise self._broke_protocol("list_dir reply has no entries")
        return entries

    def ping(self, timeout: float = 10.0) -> dict[str, Any]:
        reply = self._agent_call("ping", {}, timeout)
        return reply if isinstance(reply, dict) else {}

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for forwarder in self.forwarders:
            forwarder.close()
        if self.egress is not None:
            self.egress.close()
        try:
            self.kill()
        finally:
            try:
                self.conn.close()
            finally:
                self._release()

    def __enter__(self) -> AgentSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten sandbox must not outlive its handle
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:  # noqa: BLE001, S110 - nothing to report to at interpreter teardown
                pass

    # ---- running --------------------------------------------------------------------------

    def _run(
        self,
        method: str,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None,
    ) -> ExecResult:
        run = self._begin_run(params, stdin, env, timeout, on_output)
        guard = CallbackGuard(on_output)
        try:
            reply: Any = self._call(method, run.params, run.wait, guard.callback)
        except _RUN_ENDINGS as exc:
            reply = exc
        return self._settle_run(run, guard, reply)

    async def arun_request(
        self,
        method: str,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None = None,
    ) -> ExecResult:
        """An agent run request (``exec_params`` or ``code_params``), awaited: ``start_run``'s
        async form, and the async twin of ``_run``."""
        import asyncio

        outcome: asyncio.Future[ExecResult] = asyncio.get_running_loop().create_future()
        settle = functools.partial(settle_outcome, outcome)
        call = self.start_run(method, params, stdin, env, timeout, on_output, settle)
        try:
            return await outcome
        finally:
            if not outcome.done():  # cancelled while the agent runs: stop waiting for it
                call.abort()

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
        """``_run`` on the running event loop, in its callbacks: the request is sent now and
        ``done`` gets the result (or the exception that stopped the run) from the loop's
        reader callback, in the turn the agent's answer arrives: no task is woken for it.

        A request that cannot start (a closed or dead sandbox, another call in
        progress) raises here; once started, ``done`` is called exactly once,
        never before this returns, unless ``abort`` is called first.
        ``execution_id`` is the result's, when the caller has named the run already.
        """
        run = self._begin_run(params, stdin, env, timeout, on_output, execution_id)
        guard = CallbackGuard(on_output)

        def answered(reply: Any) -> None:
            try:
                result = self._settle_run(run, guard, reply)
            except Exception as exc:  # noqa: BLE001 - handed to the caller, as an awaited run would raise it
                done(exc)
                return
            done(result)

        running_loop, _ = loop_tools()
        return self._call_on_loop(running_loop(), method, run.params, run.wait, guard.callback, answered)

    def _settle_run(self, run: PendingRun, guard: CallbackGuard, reply: Any) -> ExecResult:
        """The result of a run from the agent's reply, or from the exception that ended the call.

        A timeout, a lost or garbled connection ends the isolate and is a verdict
        (a result that says so); any other exception (the agent's own error, the
        caller's output callback) is raised.
        """
        if isinstance(reply, _RUN_ENDINGS):
            return self._finish_run(run, None, self._ended(reply))
        if isinstance(reply, Exception):
            raise reply
        try:
            verdict = read_verdict(reply)
        except AgentProtocolError as exc:
            return self._finish_run(run, None, self._ended(exc))
        return guard.check(self._finish_run(run, verdict, None))

    def _begin_run(
        self,
        params: dict[str, Any],
        stdin: bytes | str,
        env: dict[str, str] | None,
        timeout: float | None,
        on_output: OutputCallback | None,
        execution_id: str | None = None,
    ) -> PendingRun:
        policy = self.policy
        execution_id = execution_id or new_id()
        raw_stdin = stdin.encode() if isinstance(stdin, str) else stdin
        check_call_size("stdin", raw_stdin)  # before anything is sent or counted (limits.py)
        check_call_size("code", params.get("code"))
        if timeout == UNBOUNDED:
            # A long-lived component: no deadline, output streamed and never cut.
            params.update(
                {
                    "env": {**self.environment_env, **policy.environment, **(env or {})},
                    "stdin": base64.b64encode(raw_stdin).decode() if raw_stdin else "",
                    "stream": True,
                    "collect": False,
                    "limits": job_limits(policy),
                }
            )
            wait = _FOREVER_S
        else:
            if timeout is not None and timeout > policy.timeout_seconds:
                raise PolicyError(
                    f"timeout={timeout:g} is above the policy's timeout_seconds={policy.timeout_seconds:g}: "
                    "a call may shorten its run, not lengthen it (raise timeout_seconds in the policy)"
                )
            timeout = timeout or policy.timeout_seconds
            wait = timeout + HOST_TIMEOUT_GRACE_S
            if "session" in params:
                wait += INTERRUPT_GRACE_S  # a cell past its timeout is interrupted first, then killed
            if self.one_shot:
                params["last"] = True
            params.update(
                {
                    "env": {**self.environment_env, **policy.environment, **(env or {})},
                    "timeout": timeout,
                    "max_output_bytes": policy.max_output_bytes,
                    "stdin": base64.b64encode(raw_stdin).decode() if raw_stdin else "",
                    "stream": on_output is not None,
                    "limits": job_limits(policy, timeout),
                }
            )
        before, self.baseline = self.baseline or self.usage(peak=False), None
        self._collect_violations()
        # What was reported since the last run (a process that run left running) opens this
        # run's report, marked: a call made between runs is not a call reported nowhere.
        self.violation_log.begin_run()
        return PendingRun(params, wait, before, time.monotonic(), execution_id)

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

    def _agent_call(self, method: str, params: dict[str, Any], timeout: float) -> Any:
        """``_call`` for requests other than runs: an agent that garbles its answer or
        stops answering ends the isolate, and the caller gets a ``SandboxError``."""
        try:
            return self._call(method, params, timeout)
        except AgentProtocolError as exc:
            said = self._kill_vanished()
            if not said:
                raise
            raise AgentProtocolError(f"{exc}{said}") from None
        except (TimeoutError, EOFError, OSError) as exc:
            said = self._kill_vanished()
            raise SandboxError(f"the isolate stopped answering ({method}): {exc}; it was killed{said}") from None

    def _kill_vanished(self) -> str:
        """Kill an isolate whose agent is gone or garbled; return `` (<runtime> said: ...)`` or ""."""
        words = self.last_words()  # read before the kill: the runtime's log is its account
        self._mark_dead(None)
        return f" ({self.runtime_name} said: {words})" if words else ""

    def _broke_protocol(self, what: str) -> AgentProtocolError:
        """The agent answered with something no honest agent sends: the isolate is killed."""
        self._mark_dead(None)
        return AgentProtocolError(f"{what}; the isolate was killed")

    def _finish_run(self, run: PendingRun, verdict: Verdict | None, error: str | None) -> ExecResult:
        elapsed = time.monotonic() - run.started
        after = self.usage()
        # The worker's account first: every refusal it reported before it is counted by then.
        egress = self.egress.take() if self.egress is not None else None
        self._collect_violations()
        report = self.violation_log.take()
        timeout = run.params.get("timeout")  # the run's own, when it had one shorter than the policy's
        limit = float(timeout) if isinstance(timeout, (int, float)) else self.policy.timeout_seconds
        return self._result(verdict, error, elapsed, run.before, after, report, run.execution_id, limit, egress)

    def _result(
        self,
        verdict: Verdict | None,
        error: str | None,
        elapsed: float,
        before: IsolateUsage,
        after: IsolateUsage,
        report: ViolationReport,
        execution_id: str,
        timeout_s: float | None = None,
        egress_taken: tuple[list[EgressRequest], int] | None = None,
    ) -> ExecResult:
        said = verdict or Verdict()  # no verdict: the agent said nothing
        judged = judge(
            self.policy, said, error, before, after, report,
            killed_for=self._kill_reason, cancelled=self._cancelled, timeout_s=timeout_s,
        )  # fmt: skip
        reason, error, exit_code = judged.reason, judged.error, said.exit_code
        stdout, stderr = judged.stdout, judged.stderr
        cpu = None
        if after.cpu_seconds is not None and before.cpu_seconds is not None:
            cpu = max(0.0, after.cpu_seconds - before.cpu_seconds)
        cell = cell_fields(said.cell, said.interpreter_lost, error)
        egress: dict[str, Any] = {}
        if self.egress is not None:
            # A secret's value never leaves in a result: output, a cell's results, the error.
            stdout, stderr = self._redacted(stdout), self._redacted(stderr)
            cell = self.egress.redact_fields(cell)
            records, dropped = egress_taken or ([], 0)
            egress = {"egress_requests": records, "egress_requests_dropped": dropped,
                      "secrets_redacted": self.egress.redactor.take_count()}  # fmt: skip
        return ExecResult(
            execution_id=execution_id,
            success=reason == "completed" and exit_code == 0,
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
            stdout_bytes=stdout,
            stderr_bytes=stderr,
            exit_code=exit_code,
            termination_reason=reason,
            security_violations=report.records,
            violation_counts=report.counts,
            violations_dropped=report.dropped,
            execution_time_seconds=round(elapsed, 6),
            cold_start_time_ms=round(self.cold_start_ms, 3),
            resource_usage=ResourceUsage(cpu_seconds=cpu, memory_peak_mb=after.memory_peak_mb),
            runtime_used=self.runtime_name,
            policy_digest=self.policy.digest,
            unenforced_limits=list(self.unenforced_limits),
            **cell,
            **egress,
        )

    def _mark_dead(self, reason: TerminationReason | None) -> None:
        if reason and self._kill_reason is None:
            self._kill_reason = reason
        self._dead = True
        self.kill()

    # ---- JSON-RPC over the agent connection -------------------------------------------

    def _call(
        self, method: str, params: dict[str, Any], timeout: float, on_output: OutputCallback | None = None
    ) -> Any:
        with self._lock:
            msg_id, frame = self._request(method, params)
            with self._interrupt_lock:
                self.conn.sendall(frame)
                self._request_sent = True  # from here an interrupt may follow it
                self._running, self._interrupt_sent = method, False
            try:
                deadline = time.monotonic() + timeout
                while True:
                    done, result = self._reply(self._read_message(deadline), msg_id, on_output)
                    if done:
                        return result
            finally:
                with self._interrupt_lock:
                    self._request_sent = False

    def _call_on_loop(
        self,
        loop: asyncio.AbstractEventLoop,
        method: str,
        params: dict[str, Any],
        timeout: float,
        on_output: OutputCallback | None,
        done: Callable[[Any], None],
    ) -> LoopCall:
        """Like ``_call``, in the loop's callbacks: ``done`` gets the reply's result or the exception."""
        if not self._lock.acquire(blocking=False):
            raise SandboxError("another call to this sandbox is in progress")
        try:
            msg_id, frame = self._request(method, params)
        except BaseException:
            self._lock.release()
            raise

        def on_message(payload: bytes) -> tuple[bool, Any]:
            return self._reply(decode_message(payload), msg_id, on_output)

        def release() -> None:
            self._loop_call = None
            self._lock.release()

        with self._interrupt_lock:
            self._running, self._interrupt_sent = method, False
        self._loop_call = LoopCall(loop, self.conn, frame, timeout, on_message, done, release)
        return self._loop_call

    def _request(self, method: str, params: dict[str, Any]) -> tuple[int, bytes]:
        if self._closed:
            raise SandboxClosedError("the sandbox is closed")
        if self._dead:
            raise SandboxError(f"{self._death()}; start a new sandbox")
        self._next_id += 1
        try:
            return self._next_id, wire.encode_message(wire.request(method, params, self._next_id))
        except wire.FrameError:
            # Nothing was sent: the isolate is untouched and the caller may retry smaller.
            raise CallTooLargeError(
                f"the {method} request is too large for the agent protocol's {wire.MAX_FRAME}-byte frame: "
                f"keep stdin, code and file data under {wire.MAX_DATA_BYTES} bytes per call"
            ) from None

    def _death(self) -> str:
        """Why the isolate ended, for a call that finds it dead: a run's result said so already,
        unless it was killed for a call made between runs (reported nowhere else)."""
        if self._kill_reason != "violation":
            return "the isolate has ended (killed, out of memory or timed out)"
        self._collect_violations()
        names = self.violation_log.names()
        named = f" ({', '.join(names)})" if names else ""
        return f"the isolate was killed after a policy violation{named}"

    def _reply(self, message: dict[str, Any], msg_id: int, on_output: OutputCallback | None) -> tuple[bool, Any]:
        """(True, result) for the reply to ``msg_id``; (False, None) after a notification; raises its error."""
        if "id" not in message:
            self._notification(message, on_output)
            return False, None
        if message.get("id") != msg_id:
            raise AgentProtocolError(f"reply for id {message.get('id')!r}, expected {msg_id}")
        if "error" in message:
            err = message["error"] if isinstance(message["error"], dict) else {}
            raise agent_error(err.get("code"), err.get("message", "agent error"), err.get("data"))
        return True, message.get("result")

    def _read_message(self, deadline: float) -> dict[str, Any]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the agent did not answer in time")
        ready, _, _ = select.select([self.conn], [], [], remaining)
        if not ready:
            raise TimeoutError("the agent did not answer in time")
        self.conn.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            payload = wire.read_frame(self.conn)
        except wire.FrameError as exc:
            raise AgentProtocolError(str(exc)) from None
        except TimeoutError:
            raise TimeoutError("the agent stalled in the middle of a frame") from None
        finally:
            self.conn.settimeout(None)
        return decode_message(payload)

    def _notification(self, message: dict[str, Any], on_output: OutputCallback | None) -> None:
        params = message.get("params")
        if not isinstance(params, dict):
            return
        if message.get("method") != "output":
            self._agent_notice(str(message.get("method")), params)
            return
        if on_output is None:
            return
        stream = params.get("stream")
        if stream in ("stdout", "stderr"):
            data = b64_field(params.get("data"))
            on_output(stream, self._redacted(data))


# How a call to the agent can end that is the isolate's end, not an error to raise.
MAX_WHOLE_READ = 4 << 30  # read_file without max_bytes: the largest scratch an isolate can have (disk_mb)
_INTERRUPTIBLE = ("exec", "run_code", "run_cell")  # requests that run something a SIGINT can stop
_RUN_ENDINGS = (TimeoutError, EOFError, OSError, AgentProtocolError)
