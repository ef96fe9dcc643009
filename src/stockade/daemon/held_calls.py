"""The calls made in a held sandbox: runs, files, interpreters; one at a time, in its turn.

A held sandbox runs one call at a time (its lock): a call waits its turn, bounded per owner
(``MAX_WAITING_CALLS``, ``MAX_WAITING_BYTES``); a call whose caller goes away is left to finish
in the isolate (a kept sandbox stays in step with its agent), and a run is told to the listeners
when it ends, whether or not its caller still waits. A mixin of ``Controller`` (controller.py),
beside ``HeldSandboxes`` (held.py), which makes, finds and ends the sandboxes.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import (
    AgentError,
    CallTooLargeError,
    DaemonBusyError,
    NotFoundError,
    SandboxOSError,
    sandbox_os_error,
    utf8_text,
)
from ..limits import check_call_size
from ..protocol.models import (
    Caller,
    DirListing,
    FileData,
    FileWritten,
    InterpreterClosed,
    InterpreterRef,
    Interrupted,
    InterruptRequest,
    ListDir,
    ReadFile,
    SandboxExec,
    SandboxRef,
    SandboxRunCode,
    WriteFile,
)
from ..result import ExecResult, new_id
from ..runtimes.agent_requests import code_request, exec_params
from ..runtimes.verdict import OutputCallback
from .answers import AnswerBudget, answer_size
from .held import Held
from .parts import ControllerCalls

T = TypeVar("T")

MAX_ERROR_CHARS = 2000  # of the error a run without a result is recorded with (the agent's words, maybe)

# The most one read_file answers (the client's answer line, base64, stays under its 64 MiB).
READ_FILE_MAX = 32 << 20

log = logging.getLogger("stockade.daemon")

# What one owner's calls waiting for their held sandboxes' turn may hold (a held sandbox runs one
# call at a time): so many calls, and so many bytes of their data (a file, stdin, code). Past
# either, "busy" at once: a waiting call keeps its request, and an HTTP client's that went away
# still waits.
MAX_WAITING_CALLS = 64
MAX_WAITING_BYTES = 64 << 20


class HeldCalls(ControllerCalls):
    """The calls of a ``Controller``'s held sandboxes."""

    # What the controller provides (controller.py, held.py).
    held: dict[str, Held]
    answers: AnswerBudget
    _settling: set[asyncio.Task[None]]  # calls given up by their callers, their sandbox's turn kept until they end
    _waiting: dict[str, tuple[int, int]]  # owner -> its calls waiting for a held sandbox's turn, their bytes
    _expired: OrderedDict[str, tuple[str, str]]  # sandbox id -> (owner, why it was closed)

    if TYPE_CHECKING:  # HeldSandboxes' (held.py), which this works beside (no stub of them here shadows them)

        def _lookup(self, request: SandboxRef, caller: Caller) -> Held: ...
        def _watch_idle(self, held: Held, delay: float | None = None) -> None: ...
        def _close_later(self, held: Held, ended: str, why: str) -> None: ...

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
        method, params = _held_params(request)  # a request the agent cannot take is refused here
        if held.calls or not _take_now(held.lock):
            return None
        held.calls += 1
        self._track(+1)

        started, execution_id = time.monotonic(), new_id()

        def deliver(outcome: ExecResult | Exception) -> None:
            self._observe_held(caller, held, outcome, started, execution_id)
            done(outcome)

        finish = settle_once(deliver, functools.partial(self._held_call_ended, held))
        try:
            stdin = request.stdin_bytes()
            held.sandbox.start_run(method, params, stdin, request.env, request.timeout, None, finish, execution_id)
        except BaseException:
            self._held_call_ended(held)
            raise
        return lambda: None

    def _observe_held(
        self, caller: Caller, held: Held, outcome: ExecResult | Exception, started: float, execution_id: str
    ) -> None:
        """Tell the listeners of a held sandbox's run, one without a result too (the agent's
        error, no such program) under the id its run had: what the isolate was refused meanwhile
        opens its next report (its next run's, or its end's)."""
        if not isinstance(outcome, ExecResult):
            outcome = ExecResult(
                execution_id=execution_id,
                success=False,
                termination_reason="error",
                error=f"{type(outcome).__name__}: {outcome}"[:MAX_ERROR_CHARS],
                execution_time_seconds=round(time.monotonic() - started, 6),
                runtime_used=held.sandbox.runtime_name,
                policy_digest=held.sandbox.policy.digest,
            )
        self._observe(caller, held.agent_id, outcome, held)

    def _held_call_ended(self, held: Held) -> None:
        still_held = self.held.get(held.sandbox_id) is held
        # An isolate the call found ended (a kill for a violation, a run that took it down, its
        # processes killed from outside) is no sandbox: closed now, its slot freed, rather than held
        # until its idle timeout while every call is answered that it has ended. Out of the held
        # before its turn passes on: a call waiting for it is told why. (An isolate elsewhere, a Ray
        # node's, may not know.)
        ended = getattr(held.sandbox, "ended", None) if still_held else None
        if ended:
            log.info("closing sandbox %s of %s: %s", held.sandbox_id, held.caller.owner, ended)
            self._close_later(held, "lost", f"sandbox {held.sandbox_id!r} has ended: {ended}")
        held.lock.release()
        held.calls -= 1
        held.last_used = time.monotonic()
        self._track(-1)
        if still_held and not ended:
            self._watch_idle(held)

    async def _held_call(
        self,
        request: SandboxRef,
        caller: Caller,
        call: Callable[[Held], Awaitable[T]],
        large_answer: bool = False,
    ) -> T:
        """``call`` on the held sandbox ``request`` names, in its turn (one call at a time reaches its
        agent). ``large_answer``: refused if its caller's unread answers filled their share while it
        waited (daemon/answers.py)."""
        held = self._lookup(request, caller)
        owner = caller.owner
        carries = _carried(request)
        calls, held_bytes = self._waiting.get(owner, (0, 0))
        # held.calls: the one running and those waiting (the lock reads free while it is handed on).
        if held.calls and (calls >= MAX_WAITING_CALLS or held_bytes + carries > MAX_WAITING_BYTES):
            raise DaemonBusyError(
                f"{calls} calls of {owner}'s already wait for their sandboxes' turn, holding {held_bytes >> 20} MiB "
                f"(at most {MAX_WAITING_CALLS} calls and {MAX_WAITING_BYTES >> 20} MiB): wait for them to end "
                "(a held sandbox runs one call at a time)"
            )
        held.calls += 1  # from here, waiting for the lock included: not idle
        self._waiting[owner] = (calls + 1, held_bytes + carries)
        try:
            await held.lock.acquire()
        except BaseException:
            held.calls -= 1
            raise
        finally:
            calls, held_bytes = self._waiting[owner]
            if calls > 1:
                self._waiting[owner] = (calls - 1, held_bytes - carries)
            else:
                del self._waiting[owner]
        self._track(+1)
        ended_later = False
        try:
            if self.held.get(held.sandbox_id) is not held:  # closed while this call waited its turn
                expired = self._expired.get(held.sandbox_id)
                raise NotFoundError(expired[1] if expired is not None else f"sandbox {held.sandbox_id!r} was closed")
            if large_answer:
                self.answers.refuse_new(caller.owner)
            return await call(held)
        except asyncio.CancelledError:
            # Its caller went away: the call is left to finish in the isolate (its answer read
            # and dropped). The sandbox's turn passes on once it has, so that the next call in
            # line is served then, not refused because the agent is still busy.
            ended_later = True
            task = asyncio.get_running_loop().create_task(self._end_when_settled(held))
            self._settling.add(task)  # referenced until it ends (the shutdown's kill ends it)
            task.add_done_callback(self._settling.discard)
            raise
        finally:
            if not ended_later:
                self._held_call_ended(held)

    async def _end_when_settled(self, held: Held) -> None:
        try:
            await held.sandbox.settled()
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
            outcome: asyncio.Future[ExecResult | Exception] = asyncio.get_running_loop().create_future()
            started, execution_id = time.monotonic(), new_id()

            def deliver(answer: ExecResult | Exception) -> None:
                # Told when the run ends, whether or not its caller still waits: one that hung up
                # has its run finish in the isolate (_held_call), and the run is recorded then.
                self._observe_held(caller, held, answer, started, execution_id)
                if not outcome.done():
                    outcome.set_result(answer)

            sandbox = held.sandbox
            sandbox.start_run(method, params, stdin, request.env, request.timeout, on_output, deliver, execution_id)
            answer = await outcome
            if isinstance(answer, Exception):
                raise answer
            return answer

        return await self._held_call(request, caller, run, large_answer=True)

    async def write_file(self, request: WriteFile, caller: Caller) -> FileWritten:
        data = request.data_bytes()
        check_call_size("write_file data", data)  # before it waits its turn holding the data

        async def write(held: Held) -> None:
            await self._file_call(request.path, held.sandbox.awrite_file(request.path, data, request.mode))

        await self._held_call(request, caller, write)
        return FileWritten(path=request.path, size=len(data))

    async def read_file(self, request: ReadFile, caller: Caller) -> FileData:
        # Bounded: the whole answer is one line the daemon holds in memory, base64 and all.
        # A larger file comes by download (a tar stream in pieces of one call each).
        limit = READ_FILE_MAX if request.max_bytes is None else min(request.max_bytes, READ_FILE_MAX)

        async def read(held: Held) -> bytes:
            data = await self._file_call(request.path, held.sandbox.aread_file(request.path, limit + 1))
            if len(data) > limit and (request.max_bytes is None or request.max_bytes > READ_FILE_MAX):
                raise CallTooLargeError(
                    f"{request.path} is larger than the {READ_FILE_MAX >> 20} MiB one read_file answers through "
                    "the daemon: download it (the SDK's download, a tar stream in pieces; over HTTP, "
                    "split it first with a command, `split -b 16M`), or read its first bytes with max_bytes"
                )
            return data[:limit]

        raw = await self._held_call(request, caller, read)
        # Its answer may wait in memory until its client reads it.
        self.answers.check(answer_size(len(raw)), caller.owner)
        return FileData(path=request.path, data=base64.b64encode(raw).decode())

    async def list_dir(self, request: ListDir, caller: Caller) -> DirListing:
        async def listing(held: Held) -> list[dict[str, Any]]:
            entries = await self._file_call(request.path, held.sandbox.alist_dir(request.path))
            # A name that is not UTF-8 (os.listdir's surrogates) as its bytes' escapes: JSON carries text.
            return [{**e, "name": utf8_text(e["name"])} for e in entries]

        return DirListing(path=request.path, entries=await self._held_call(request, caller, listing))

    async def _file_call(self, path: str, call: Awaitable[T]) -> T:
        """A file call on a held sandbox: an OS error the agent reports with its errno is
        raised as that errno's ``SandboxOSError`` (``IsADirectoryError``...), which the
        answer carries beside its code, so that clients raise the same class."""
        try:
            return await call
        except AgentError as exc:
            error = sandbox_os_error(exc)
            if isinstance(error, SandboxOSError) and error.filename is None:
                error.filename = path
            if error is exc:
                raise
            raise error from None

    async def close_interpreter(self, request: InterpreterRef, caller: Caller) -> InterpreterClosed:
        async def close(held: Held) -> bool:
            return await held.sandbox.aclose_interpreter(request.session)

        closed = await self._held_call(request, caller, close)
        return InterpreterClosed(sandbox_id=request.sandbox_id, session=request.session, closed=closed)

    async def interrupt(self, request: InterruptRequest, caller: Caller) -> Interrupted:
        """Interrupt the sandbox's run in progress (``request.session``: only that interpreter's
        cell), without waiting for it (it holds the sandbox's turn)."""
        held = self._lookup(request, caller)
        return Interrupted(sandbox_id=held.sandbox_id, interrupted=await held.sandbox.ainterrupt(request.session))


def _carried(request: SandboxRef) -> int:
    """The bytes of data ``request`` holds while it waits its sandbox's turn: what it was sent
    (text, base64, code) and what that decodes to (a file's bytes, stdin)."""
    sent = sum(len(getattr(request, name, None) or "") for name in ("data", "stdin", "stdin_b64", "code"))
    decoded = getattr(request, "data_bytes", None) or getattr(request, "stdin_bytes", None)
    return sent + (len(decoded()) if decoded is not None else 0)


def _held_params(request: SandboxExec | SandboxRunCode) -> tuple[str, dict[str, Any]]:
    """The agent's request for a held sandbox's run (a session's cell: ``run_cell``)."""
    if isinstance(request, SandboxExec):
        return "exec", exec_params(request.command, request.cwd)
    return code_request(request.code, request.language, request.session, request.stdin_bytes())


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


def settle_once(
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
