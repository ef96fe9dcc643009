"""``Client``: the daemon's RPC on one blocking Unix-socket connection (its sandbox handles:
``remote_sandbox.py``)."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Unpack

from ..daemon_peer import connect, timeval
from ..errors import UNPROVEN, StockadeError
from ..limits import publish_specs
from ..result import ExecResult
from .answers import LINE_LIMIT, Answer, ExecAnswer, Reply, exec_result, naming, parse, request_line
from .remote_sandbox import RemoteSandbox
from .requests import (
    CodeOptions,
    ExecOptions,
    PolicyArg,
    Requests,
    answered,
    answered_bytes,
    described,
    published_address,
)
from .retry import Attempts, ConnectionLost, Retry, hung_up_before_sending, lost_after_sending, unanswered, unreachable


class _NothingSent(Exception):
    """The daemon had hung up the connection: the send failed before a byte went out."""


class Client(Requests):
    """One connection to the daemon, opened lazily and reopened after a failure. Thread-safe.

    A connection the daemon hung up since its last answer (a restart) is
    replaced at once; a daemon that cannot be reached, or a connection that
    breaks, is tried again as ``retry`` says (``Retry()``: three attempts, 1 s
    then 2 s apart; ``None``: one), never re-sending a request that may have
    run unless it allows that (``client/retry.py``).
    """

    def __init__(
        self,
        socket_path: str | None = None,
        auth_token: str | None = None,
        timeout: float = 30.0,
        *,
        token_file: str | None = None,
        retry: Retry | None = Retry(),  # noqa: B008 - frozen: one shared default is safe
    ) -> None:
        super().__init__(socket_path, auth_token, timeout, token_file=token_file, retry=retry)
        self._sock: socket.socket | None = None
        self._sock_timeout: float | None = None
        self._answered = False  # the connection has carried an answer: one that fails now went stale
        self._buffer = b""
        self._lock = threading.Lock()

    # ---- transport ----------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                connect(sock, self.socket_path, self.timeout)  # a full backlog is waited for
            except OSError as exc:
                sock.close()
                raise unreachable(self.socket_path, exc) from None
            if (refused := self._impostor(sock)) is not None:
                sock.close()
                raise refused
            # connect() left it blocking, each wait bounded by the kernel
            # (SO_RCVTIMEO, SO_SNDTIMEO): a Python timeout would poll() before
            # every send and receive, two more system calls on each request.
            self._sock, self._buffer, self._sock_timeout, self._answered = sock, b"", None, False
        return self._sock

    def _bound(self, sock: socket.socket, timeout: float) -> None:
        """Bound each send and receive on ``sock`` to ``timeout`` seconds (set only when it changes)."""
        if timeout == self._sock_timeout:
            return
        limit = timeval(timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self._sock_timeout = timeout

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> Any:
        """Send one request and return its result, or raise the mapped error.

        With ``on_output`` the request asks for streamed output: each chunk the
        daemon sends ahead of the answer is handed to it as (stream, bytes).
        """
        return self._call(method, params, timeout, on_output, Answer).result

    def _run(
        self, method: str, params: dict[str, Any], timeout: float, on_output: Callable[[str, bytes], None] | None = None
    ) -> ExecResult:
        return exec_result(method, self._call(method, params, timeout, on_output, ExecAnswer))

    def _call(
        self,
        method: str,
        params: dict[str, Any] | None,
        timeout: float | None,
        on_output: Callable[[str, bytes], None] | None,
        answer_type: type[Answer],
    ) -> Answer:
        attempts: Attempts | None = None  # made at the first failure: nothing to pay on the usual call
        wait = timeout or self.timeout
        proofs, prove = 0, False
        while True:
            # Each attempt is signed afresh: a nonce the daemon saw would be refused as a replay.
            reply = Reply(next(self._ids), on_output, signed=self._token is not None)
            line = request_line(method, params, reply.msg_id, self._token, streamed=on_output is not None)
            try:
                if prove:  # a signed ping proves the connection the request then goes on
                    self._ping_signed(wait)
                answer = self._exchange(line, reply, wait, answer_type, method)
            except ConnectionLost as lost:
                attempts = attempts or Attempts(self.retry, method)
                pause = attempts.after_lost(lost)
            else:
                if answer.error is None:
                    return reply.outcome(answer)
                # Refused unread (a process of this uid failed authentication lately): proved, then
                # sent again; twice at most (the connection may be lost between the two).
                prove = answer.error_code == UNPROVEN and self._token is not None and proofs < 2
                if prove:
                    proofs += 1
                    continue
                attempts = attempts or Attempts(self.retry, method)
                refused = attempts.after_refusal(answer.error_code, answer.error)
                if refused is None:
                    return reply.outcome(answer)
                pause = refused
            time.sleep(pause)

    def _ping_signed(self, wait: float) -> None:
        reply = Reply(next(self._ids), None, signed=True)
        line = request_line("ping", {}, reply.msg_id, self._token, streamed=False)
        reply.outcome(self._exchange(line, reply, wait, Answer, "ping"))

    def _exchange(self, line: bytes, reply: Reply, wait: float, answer_type: type[Answer], method: str) -> Answer:
        """One attempt: ``line`` sent, its answer read (``ConnectionLost`` when either fails)."""
        with self._lock:
            try:
                deadline = time.monotonic() + wait
                sock = self._send(line, wait, deadline)
                if isinstance(sock, Answer):
                    return sock  # the daemon's refusal, sent before it hung up
                while not reply.take(answer := parse(self._read_line(sock, deadline), answer_type)):
                    self._within(sock, deadline)
                self._answered = True
                return answer
            except ConnectionLost:
                self._drop()
                raise
            except BlockingIOError:  # the kernel's bound on the wait (EAGAIN)
                self._drop()
                raise unanswered(method, wait) from None
            except (OSError, EOFError) as exc:
                self._drop()
                raise lost_after_sending(self.socket_path, exc) from None
            except BaseException:
                self._drop()  # a half-read answer (Ctrl-C, a bad line) must not reach the next call
                raise

    def _send(self, line: bytes, wait: float, deadline: float) -> socket.socket | Answer:
        """Send ``line``: on the kept connection, or on a new one when the daemon hung that
        one up since its last answer (it restarted, or stopped: a new connection says
        which). The socket to read the answer from; or the refusal the daemon sent
        before it hung up (a peer it does not serve, too many connections)."""
        while True:
            stale = self._sock is not None and self._answered
            sock = self._connect()
            self._bound(sock, wait)
            try:
                _send_all(sock, line, functools.partial(self._within, sock, deadline))
                return sock
            except _NothingSent:
                refusal = self._refusal(sock)
                self._drop()
                if refusal is not None:
                    return refusal
                if not stale:
                    raise hung_up_before_sending(self.socket_path) from None

    def _refusal(self, sock: socket.socket) -> Answer | None:
        """The error the daemon sent before it hung up, if it did.

        A daemon that will not serve a connection (a peer it does not allow,
        too many connections from one uid) answers once and closes it before
        reading. A request sent after that close fails with a broken pipe, but
        the answer that says why is still there to read.
        """
        try:
            answer = parse(self._read_line(sock, time.monotonic() + (self._sock_timeout or self.timeout)), Answer)
        except (OSError, EOFError, StockadeError):
            return None
        return answer if answer.error is not None else None

    def _within(self, sock: socket.socket, deadline: float) -> None:
        """Bound the next receive by what is left of the answer's wait: output ahead of the answer,
        or an answer that comes in pieces, restarts no clock (a daemon that trickles cannot hold
        the call past its timeout). The kernel's bound says it (EAGAIN), as for the first."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise BlockingIOError("the answer's wait is over")
        self._bound(sock, left)

    def _read_line(self, sock: socket.socket, deadline: float) -> bytes:
        # Each chunk searched once, and kept in a list: a long answer (a file's data) costs
        # its length, not its length times the number of chunks it came in.
        end = self._buffer.find(b"\n")
        if end >= 0:
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            return line
        chunks, size = [self._buffer], len(self._buffer)
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            end = chunk.find(b"\n")
            if end >= 0:
                chunks.append(chunk[:end])
                self._buffer = chunk[end + 1 :]
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > LINE_LIMIT:
                self._drop()  # the rest of that line is still coming: the connection is of no more use
                raise StockadeError(f"the daemon sent an answer longer than {LINE_LIMIT} bytes")
            self._within(sock, deadline)

    # ---- methods (what each sends: Requests) --------------------------------------------

    def ping(self) -> str:
        return str(self.call(*self._ping()))

    def selftest(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call(*self._selftest())
        return result

    def execute(
        self,
        command: list[str] | None = None,
        *,
        code: str | None = None,
        language: str = "python",
        policy: PolicyArg = None,
        stdin: str | bytes | None = None,
        timeout: float | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
        **policy_fields: Any,
    ) -> ExecResult:
        """A one-shot run. Not sent again once it may have reached the daemon (``AnswerLostError``),
        unless ``Retry(resend_unsafe=True)``."""
        return self._run(*self._execute(command, code, language, policy, stdin, timeout, policy_fields), on_output)

    def cancel_execution(self, execution_id: str) -> None:
        """End a running ``execute`` (from any connection; ids from ``status`` or a result's
        ``execution_id``): it is answered ``killed``. ``NotFoundError`` if it is not running."""
        self.call(*self._cancel(execution_id))

    def sandbox(
        self,
        policy: PolicyArg = None,
        keep: bool = False,
        idle_timeout: float | None = None,
        *,
        publish: Sequence[int | str] = (),
        timeout: float | None = None,
        **policy_fields: Any,
    ) -> RemoteSandbox:
        """A held sandbox, as a handle that closes it on ``with`` exit (``create_sandbox``'s arguments;
        ``publish``: ports to publish at once, as ``RemoteSandbox.publish`` does)::

        with client.sandbox({"memory_mb": 256}) as sb:
            sb.write_file("/work/x.py", "print(6 * 7)")
            sb.exec(["python3", "/work/x.py"]).stdout
        """
        made = self.call(*self._create(policy, keep, idle_timeout, timeout, policy_fields))
        handle = RemoteSandbox(self, **described(made))
        try:
            for spec in publish_specs(publish):
                handle.publish(spec)
        except BaseException:
            handle.close()
            raise
        return handle

    def connect_sandbox(self, sandbox_id: str) -> RemoteSandbox:
        """A handle on a held sandbox made earlier (``create_sandbox(keep=True)``), by this process
        or another of the same caller (E2B's ``Sandbox.connect``, Modal's ``Sandbox.from_id``).
        ``NotFoundError`` when the caller holds no such sandbox, ``SandboxLostError`` when it
        was a daemon's that has stopped since. ``with`` closes it; without, it stays."""
        made = self.call("sandbox.get", {"sandbox_id": sandbox_id})
        return RemoteSandbox(self, **described(made))

    def create_sandbox(
        self,
        policy: PolicyArg = None,
        keep: bool = False,
        idle_timeout: float | None = None,
        *,
        timeout: float | None = None,
        **policy_fields: Any,
    ) -> str:
        """A held sandbox's id. ``keep``: it outlives this connection; ``idle_timeout``: seconds
        without a call before the daemon closes it (default and most: the daemon's setting).
        A sandbox ends with its daemon: after a restart, a call on it raises ``SandboxLostError``."""
        return answered(self.call(*self._create(policy, keep, idle_timeout, timeout, policy_fields)), "sandbox_id", str)

    def sandbox_exec(self, sandbox_id: str, command: list[str], **options: Unpack[ExecOptions]) -> ExecResult:
        """``command`` in a held sandbox; ``stdin`` (text or bytes), ``env``, ``cwd``, ``timeout``, ``on_output``."""
        return self._run(*self._sandbox_exec(sandbox_id, command, options), options.get("on_output"))

    def sandbox_run_code(
        self, sandbox_id: str, code: str, language: str = "python", **options: Unpack[CodeOptions]
    ) -> ExecResult:
        """Run code in a held sandbox; ``session=NAME``: as a cell of that stateful interpreter."""
        return self._run(*self._sandbox_run_code(sandbox_id, code, language, options), options.get("on_output"))

    def sandbox_write_file(self, sandbox_id: str, path: str, data: bytes | str, mode: int = 0o644) -> None:
        """Write a file in a held sandbox; an OS error there raises its stdlib class (``IsADirectoryError``...)."""
        with naming(path):
            self.call(*self._write_file(sandbox_id, path, data, mode))

    def sandbox_read_file(self, sandbox_id: str, path: str, max_bytes: int | None = None) -> bytes:
        """A file of a held sandbox (its first ``max_bytes``); a missing one raises ``PathNotFoundError``,
        a ``FileNotFoundError``."""
        with naming(path):
            return answered_bytes(self.call(*self._read_file(sandbox_id, path, max_bytes)), "data")

    def sandbox_list_dir(self, sandbox_id: str, path: str) -> list[dict[str, Any]]:
        """A directory's entries in a held sandbox, as the SDK's ``Sandbox.list_dir`` gives them."""
        with naming(path):
            entries: list[dict[str, Any]] = answered(self.call(*self._list_dir(sandbox_id, path)), "entries", list)
        return entries

    def close_interpreter(self, sandbox_id: str, session: str) -> bool:
        """End a session's interpreter in a held sandbox; False when it had none running."""
        closed = answered(self.call(*self._close_interpreter(sandbox_id, session)), "closed", bool)
        return closed

    def sandbox_publish(self, sandbox_id: str, spec: int | str) -> tuple[str, int]:
        """Forward a loopback port of the daemon's host to a port on a held sandbox's loopback, until
        the sandbox closes (``Sandbox.publish``'s ``spec``): the host address and port."""
        return published_address(self.call(*self._publish(sandbox_id, spec)))

    def interrupt_sandbox(self, sandbox_id: str, session: str | None = None) -> bool:
        """Interrupt a held sandbox's run in progress (SIGINT); False when nothing runs
        (``session``: when no cell of that interpreter runs).

        Sent on a connection of its own: this client's may be waiting for that run.
        """
        with Client(self.socket_path, self._token, self.timeout, retry=None) as other:
            interrupted = answered(other.call(*other._interrupt(sandbox_id, session)), "interrupted", bool)
        return interrupted

    def close_sandbox(self, sandbox_id: str) -> None:
        self.call(*self._close(sandbox_id))

    def status(self) -> dict[str, Any]:
        """What runs, and the daemon's ``instance_id`` (a restart changes it)."""
        result: dict[str, Any] = self.call(*self._status())
        return result

    def runtimes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call(*self._runtimes())
        return result


# What one send takes of a request: the kernel's bound on a send (SO_SNDTIMEO) starts again with each
# buffer it waits for, so a send of MBs to a daemon that reads a little at a time is bounded by nothing.
_SEND_PIECE = 64 << 10


def _send_all(sock: socket.socket, line: bytes, within: Callable[[], None]) -> None:
    """``sock.sendall(line)``, telling a connection hung up before a byte went out
    (``_NothingSent``: the request never reached the daemon) from one that broke after; each
    piece after the first sent within what is left of the call's wait (``within``: a daemon that
    reads slowly held a long request past it, each send bounded alone)."""
    view = memoryview(line)
    try:
        sent = sock.send(view[:_SEND_PIECE])
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise _NothingSent from exc
    while sent < len(line):  # a long request: a failure from here on is one after some of it went out
        within()
        sent += sock.send(view[sent : sent + _SEND_PIECE])
