"""Client for the stockade daemon's Unix-socket RPC.

    from stockade.client import Client, call_with_retry
    client = Client("/run/stockade/stockade.sock", auth_token=token)
    result = call_with_retry(lambda: client.execute(code="print(1)"))

``AsyncClient`` has the same methods for asyncio callers, awaited.

Errors map to the ``StockadeError`` tree through the response's ``error_code``:
an unreachable daemon is ``DaemonUnavailableError`` (a ``ConnectionError``),
a refused signature ``AuthenticationError``, the rate limit ``RateLimitError``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypedDict, TypeVar, Unpack

from pydantic import BaseModel, ValidationError

from .errors import (
    AuthenticationError,
    DaemonBusyError,
    DaemonUnavailableError,
    NotFoundError,
    StockadeError,
    error_from_code,
)
from .limits import check_call_size
from .policy import Policy
from .protocol import auth
from .protocol.models import (
    CancelRequest,
    ExecuteRequest,
    ListDir,
    ReadFile,
    Request,
    SandboxCreate,
    SandboxExec,
    SandboxRef,
    SandboxRunCode,
    WriteFile,
    argv_list,
    parse,
)
from .result import ExecResult

__all__ = ["AsyncClient", "Client", "DaemonBusyError", "NotFoundError", "call_with_retry"]
PolicyArg = Policy | dict[str, Any] | None

T = TypeVar("T")
_R = TypeVar("_R", bound=Request)
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO / SO_SNDTIMEO


class RunOptions(TypedDict, total=False):
    """What a held sandbox's ``run_code`` takes as keywords (and ``exec``, with ``cwd``)."""

    stdin: str | bytes | None  # bytes go as ``stdin_b64``
    env: dict[str, str] | None
    timeout: float | None  # seconds, at most the sandbox's policy's
    on_output: Callable[[str, bytes], None] | None  # streamed (stream, data) chunks


class ExecOptions(RunOptions, total=False):
    cwd: str | None


_RUN_OPTIONS = frozenset(RunOptions.__annotations__)
_EXEC_OPTIONS = frozenset(ExecOptions.__annotations__)


class _Answer(BaseModel):
    """One line from the daemon: an answer, or output streamed ahead of it.

    Lines are read straight from their JSON bytes into this model: one pass
    of pydantic's parser instead of ``json.loads`` and then validation.
    """

    result: Any = None
    error: Any = None
    error_code: Any = None
    id: Any = None
    output: Any = None


class _ExecAnswer(_Answer):
    result: ExecResult | None = None


class _Requests:
    """What ``Client`` and ``AsyncClient`` share: where the daemon is, the token, the
    bound on a wait, and what each RPC method sends: (method, params, timeout)."""

    def __init__(
        self,
        socket_path: str | None = None,
        auth_token: str | None = None,
        timeout: float = 30.0,
        *,
        token_file: str | None = None,
    ) -> None:
        if socket_path is None:
            from .daemon.config import socket_path_from_env

            socket_path = socket_path_from_env()
        self.socket_path = socket_path
        if token_file is not None:
            if auth_token is not None:
                raise TypeError("give auth_token or token_file, not both")
            auth_token = read_token_file(token_file)
        self._token = auth_token
        self.timeout = timeout
        self._ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.socket_path!r}, auth={'hmac' if self._token else 'off'})"

    # What each method sends, as (method, params, timeout): the request is built as the
    # daemon's own model (protocol/models.py), so a bad argument is refused here, before
    # anything is sent, with the daemon's own words.

    def _ping(self) -> tuple[str, dict[str, Any] | None, float | None]:
        return "ping", None, None

    def _selftest(self) -> tuple[str, dict[str, Any] | None, float | None]:
        return "selftest", None, max(self.timeout, 60)  # a real sandbox, started cold if need be

    def _execute(
        self,
        command: list[str] | None,
        code: str | None,
        language: str,
        policy: PolicyArg,
        stdin: str | bytes | None,
    ) -> tuple[str, dict[str, Any], float]:
        fields: dict[str, Any] = {"command": None if command is None else argv_list(command), "code": code}
        request = _build(ExecuteRequest, "execute", language=language, policy=policy, **fields, **_stdin(stdin))
        request.check_sizes()  # refused before it is sent, as the daemon would refuse it
        return "execute", _params(request), request.policy.timeout_seconds + self.timeout

    def _cancel(self, execution_id: str) -> tuple[str, dict[str, Any], float | None]:
        return "execute.cancel", _params(_build(CancelRequest, "execute.cancel", execution_id=execution_id)), None

    def _create(self, policy: PolicyArg, keep: bool, idle_timeout: float | None) -> tuple[str, dict[str, Any], float]:
        request = _build(SandboxCreate, "sandbox.create", policy=policy, keep=keep, idle_timeout=idle_timeout)
        return "sandbox.create", _params(request), max(self.timeout, 60)

    def _sandbox_exec(
        self, sandbox_id: str, command: list[str], options: ExecOptions
    ) -> tuple[str, dict[str, Any], float]:
        return self._sandbox_run(SandboxExec, "sandbox.exec", sandbox_id, {"command": argv_list(command)}, options)

    def _sandbox_run_code(
        self, sandbox_id: str, code: str, language: str, options: RunOptions
    ) -> tuple[str, dict[str, Any], float]:
        fields = {"code": code, "language": language}
        return self._sandbox_run(SandboxRunCode, "sandbox.run_code", sandbox_id, fields, options)

    def _sandbox_run(
        self,
        model: type[SandboxExec | SandboxRunCode],
        method: str,
        sandbox_id: str,
        fields: dict[str, Any],
        options: RunOptions,
    ) -> tuple[str, dict[str, Any], float]:
        known = _EXEC_OPTIONS if model is SandboxExec else _RUN_OPTIONS
        if unknown := sorted(set(options) - known):
            # Keywords travel as a dict: a misspelt one would otherwise be dropped without a word.
            raise TypeError(f"{method} got unexpected keyword arguments: {', '.join(unknown)}")
        given = {k: v for k, v in options.items() if k not in ("stdin", "on_output")}
        request = _build(model, method, sandbox_id=sandbox_id, **fields, **given, **_stdin(options.get("stdin")))
        request.check_sizes()  # refused before it is sent, as the daemon would refuse it
        # The sandbox's policy bounds a run the client did not bound; the client does not know it.
        timeout = request.timeout
        return method, _params(request), (600 if timeout is None else timeout) + self.timeout

    def _write_file(
        self, sandbox_id: str, path: str, data: bytes | str, mode: int
    ) -> tuple[str, dict[str, Any], float | None]:
        raw = data.encode() if isinstance(data, str) else data
        check_call_size("write_file data", raw)  # refused before it is sent, as the daemon would refuse it
        encoded = base64.b64encode(raw).decode()
        request = _build(WriteFile, "sandbox.write_file", sandbox_id=sandbox_id, path=path, data=encoded, mode=mode)
        return "sandbox.write_file", _params(request), None

    def _read_file(self, sandbox_id: str, path: str) -> tuple[str, dict[str, Any], float | None]:
        return (
            "sandbox.read_file",
            _params(_build(ReadFile, "sandbox.read_file", sandbox_id=sandbox_id, path=path)),
            None,
        )

    def _list_dir(self, sandbox_id: str, path: str) -> tuple[str, dict[str, Any], float | None]:
        return "sandbox.list_dir", _params(_build(ListDir, "sandbox.list_dir", sandbox_id=sandbox_id, path=path)), None

    def _close(self, sandbox_id: str) -> tuple[str, dict[str, Any], float | None]:
        return "sandbox.close", _params(_build(SandboxRef, "sandbox.close", sandbox_id=sandbox_id)), None

    def _status(self) -> tuple[str, dict[str, Any] | None, float | None]:
        return "status", None, None

    def _runtimes(self) -> tuple[str, dict[str, Any] | None, float | None]:
        return "runtimes", None, max(self.timeout, 60)  # detecting a runtime may start one


def _build(model: type[_R], method: str, **fields: Any) -> _R:
    """A request model from a client call's arguments (None: the field's default)."""
    policy = fields.get("policy")
    if isinstance(policy, Policy):
        fields["policy"] = policy.model_dump(mode="json")
    request: _R = parse(model, {k: v for k, v in fields.items() if v is not None}, f"{method} request")
    return request


def _params(request: Request) -> dict[str, Any]:
    """A request as the params to send: only what differs from the defaults (less to sign and read)."""
    return request.model_dump(mode="json", exclude_defaults=True)


def _stdin(stdin: str | bytes | None) -> dict[str, Any]:
    if isinstance(stdin, bytes):
        return {"stdin_b64": base64.b64encode(stdin).decode()} if stdin else {}
    return {"stdin": stdin} if stdin else {}


class Client(_Requests):
    """One connection to the daemon, opened lazily and reopened after a failure. Thread-safe."""

    def __init__(
        self,
        socket_path: str | None = None,
        auth_token: str | None = None,
        timeout: float = 30.0,
        *,
        token_file: str | None = None,
    ) -> None:
        super().__init__(socket_path, auth_token, timeout, token_file=token_file)
        self._sock: socket.socket | None = None
        self._sock_timeout: float | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    # ---- transport ----------------------------------------------------------------------

    def _connect(self) -> socket.socket:
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                sock.close()
                raise DaemonUnavailableError(
                    f"cannot reach the stockade daemon at {self.socket_path}: {exc.strerror or exc}"
                ) from None
            # Blocking from here on, with the wait bounded by the kernel
            # (SO_RCVTIMEO, SO_SNDTIMEO): a Python timeout would poll() before
            # every send and receive, two more system calls on each request.
            sock.settimeout(None)
            self._sock, self._buffer, self._sock_timeout = sock, b"", None
        return self._sock

    def _bound(self, sock: socket.socket, timeout: float) -> None:
        """Bound each send and receive on ``sock`` to ``timeout`` seconds (set only when it changes)."""
        if timeout == self._sock_timeout:
            return
        seconds = int(timeout)
        limit = _TIMEVAL.pack(seconds, max(1 if seconds == 0 else 0, int((timeout - seconds) * 1e6)))
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
        return self._call(method, params, timeout, on_output, _Answer).result

    def _run(
        self, method: str, params: dict[str, Any], timeout: float, on_output: Callable[[str, bytes], None] | None = None
    ) -> ExecResult:
        return _exec_result(method, self._call(method, params, timeout, on_output, _ExecAnswer))

    def _call(
        self,
        method: str,
        params: dict[str, Any] | None,
        timeout: float | None,
        on_output: Callable[[str, bytes], None] | None,
        answer_type: type[_Answer],
    ) -> _Answer:
        msg_id = next(self._ids)
        line = _request_line(method, params, msg_id, self._token, streamed=on_output is not None)
        reply = _Reply(msg_id, on_output)
        with self._lock:
            sock = self._connect()
            wait = timeout or self.timeout
            try:
                self._bound(sock, wait)
                try:
                    sock.sendall(line)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise self._refusal(sock) or exc from None
                while not reply.take(answer := _parse(self._read_line(sock), answer_type)):
                    pass
            except BlockingIOError:  # the kernel's bound on the wait (EAGAIN)
                self._drop()
                raise DaemonUnavailableError(f"the stockade daemon did not answer within {wait:g} s") from None
            except (OSError, EOFError) as exc:
                self._drop()
                raise DaemonUnavailableError(f"lost the connection to the stockade daemon: {exc}") from None
            except BaseException:
                self._drop()  # a half-read answer (Ctrl-C, a bad line) must not reach the next call
                raise
        return reply.outcome(answer)

    def _refusal(self, sock: socket.socket) -> StockadeError | None:
        """The error the daemon sent before it hung up, if it did.

        A daemon that will not serve a connection (a peer it does not allow,
        too many connections from one uid) answers once and closes it before
        reading. A request sent after that close fails with a broken pipe, but
        the answer that says why is still there to read.
        """
        try:
            return _failure(_parse(self._read_line(sock), _Answer))
        except (OSError, EOFError, StockadeError):
            return None

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    # ---- methods (what each sends: _Requests) -------------------------------------------

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
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> ExecResult:
        return self._run(*self._execute(command, code, language, policy, stdin), on_output)

    def cancel_execution(self, execution_id: str) -> None:
        """End a running ``execute`` (from any connection; ids from ``status`` or a result's
        ``execution_id``): it is answered ``killed``. ``NotFoundError`` if it is not running."""
        self.call(*self._cancel(execution_id))

    def sandbox(self, policy: PolicyArg = None, keep: bool = False, idle_timeout: float | None = None) -> RemoteSandbox:
        """A held sandbox, as a handle that closes it on ``with`` exit (``create_sandbox``'s arguments)::

        with client.sandbox({"memory_mb": 256}) as sb:
            sb.write_file("/work/x.py", "print(6 * 7)")
            sb.exec(["python3", "/work/x.py"]).stdout
        """
        return RemoteSandbox(self, self.create_sandbox(policy, keep, idle_timeout))

    def create_sandbox(self, policy: PolicyArg = None, keep: bool = False, idle_timeout: float | None = None) -> str:
        """A held sandbox's id. ``keep``: it outlives this connection; ``idle_timeout``: seconds
        without a call before the daemon closes it (default and most: the daemon's setting)."""
        return str(self.call(*self._create(policy, keep, idle_timeout))["sandbox_id"])

    def sandbox_exec(self, sandbox_id: str, command: list[str], **options: Unpack[ExecOptions]) -> ExecResult:
        """``command`` in a held sandbox; ``stdin`` (text or bytes), ``env``, ``cwd``, ``timeout``, ``on_output``."""
        return self._run(*self._sandbox_exec(sandbox_id, command, options), options.get("on_output"))

    def sandbox_run_code(
        self, sandbox_id: str, code: str, language: str = "python", **options: Unpack[RunOptions]
    ) -> ExecResult:
        return self._run(*self._sandbox_run_code(sandbox_id, code, language, options), options.get("on_output"))

    def sandbox_write_file(self, sandbox_id: str, path: str, data: bytes | str, mode: int = 0o644) -> None:
        self.call(*self._write_file(sandbox_id, path, data, mode))

    def sandbox_read_file(self, sandbox_id: str, path: str) -> bytes:
        return base64.b64decode(self.call(*self._read_file(sandbox_id, path))["data"])

    def sandbox_list_dir(self, sandbox_id: str, path: str) -> list[dict[str, Any]]:
        """A directory's entries in a held sandbox, as the SDK's ``Sandbox.list_dir`` gives them."""
        entries: list[dict[str, Any]] = self.call(*self._list_dir(sandbox_id, path))["entries"]
        return entries

    def close_sandbox(self, sandbox_id: str) -> None:
        self.call(*self._close(sandbox_id))

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call(*self._status())
        return result

    def runtimes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call(*self._runtimes())
        return result


# An answer is one line: a file's data (up to 5 MiB, base64) or a run's output
# (JSON escapes can take six bytes a character) stay well under this.
_LINE_LIMIT = 64 << 20


class AsyncClient(_Requests):
    """``Client`` for asyncio: the same methods, awaited; the event loop is never blocked.

        async with AsyncClient("/run/stockade/stockade.sock", auth_token=token) as client:
            result = await client.execute(code="print(1)")

    One connection, opened on first use and reopened after a failure. Calls on
    one client go out one at a time, each answered before the next is sent (a
    lock keeps them in order on the connection): for runs in parallel, use a
    client each. A call that times out or is cancelled drops the connection,
    so that its late answer is never taken for the next call's.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        auth_token: str | None = None,
        timeout: float = 30.0,
        *,
        token_file: str | None = None,
    ) -> None:
        super().__init__(socket_path, auth_token, timeout, token_file=token_file)
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        writer = self._writer
        self._drop()
        if writer is not None:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is None or self._writer is None:
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(self.socket_path, limit=_LINE_LIMIT)
            except OSError as exc:
                raise DaemonUnavailableError(
                    f"cannot reach the stockade daemon at {self.socket_path}: {exc.strerror or exc}"
                ) from None
        return self._reader, self._writer

    async def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> Any:
        """As ``Client.call``: one request, its result or the mapped error."""
        return (await self._call(method, params, timeout, on_output, _Answer)).result

    async def _run(
        self, method: str, params: dict[str, Any], timeout: float, on_output: Callable[[str, bytes], None] | None = None
    ) -> ExecResult:
        return _exec_result(method, await self._call(method, params, timeout, on_output, _ExecAnswer))

    async def _call(
        self,
        method: str,
        params: dict[str, Any] | None,
        timeout: float | None,
        on_output: Callable[[str, bytes], None] | None,
        answer_type: type[_Answer],
    ) -> _Answer:
        msg_id = next(self._ids)
        line = _request_line(method, params, msg_id, self._token, streamed=on_output is not None)
        wait = timeout or self.timeout
        async with self._lock:
            reader, writer = await self._connect()
            try:
                reply = _Reply(msg_id, on_output)
                answer = await asyncio.wait_for(self._exchange(reader, writer, line, reply, answer_type), wait)
            except TimeoutError:
                self._drop()
                raise DaemonUnavailableError(f"the stockade daemon did not answer within {wait:g} s") from None
            except (OSError, EOFError) as exc:
                self._drop()
                raise DaemonUnavailableError(f"lost the connection to the stockade daemon: {exc}") from None
            except BaseException:
                self._drop()  # cancelled, or a bad line: a half-read answer must not reach the next call
                raise
        return reply.outcome(answer)

    @staticmethod
    async def _exchange(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        line: bytes,
        reply: _Reply,
        answer_type: type[_Answer],
    ) -> _Answer:
        writer.write(line)
        try:
            await writer.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            # Refused and hung up on before the request went out: the reason may be waiting.
            try:
                refusal = _failure(_parse(await _read_answer_line(reader), _Answer))
            except (OSError, EOFError, StockadeError):
                refusal = None
            raise refusal or exc from None
        while not reply.take(answer := _parse(await _read_answer_line(reader), answer_type)):
            pass
        return answer

    # ---- methods (what each sends: _Requests) -------------------------------------------

    async def ping(self) -> str:
        return str(await self.call(*self._ping()))

    async def selftest(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(*self._selftest())
        return result

    async def execute(
        self,
        command: list[str] | None = None,
        *,
        code: str | None = None,
        language: str = "python",
        policy: PolicyArg = None,
        stdin: str | bytes | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> ExecResult:
        return await self._run(*self._execute(command, code, language, policy, stdin), on_output)

    async def cancel_execution(self, execution_id: str) -> None:
        await self.call(*self._cancel(execution_id))

    @contextlib.asynccontextmanager
    async def sandbox(
        self, policy: PolicyArg = None, keep: bool = False, idle_timeout: float | None = None
    ) -> AsyncIterator[AsyncRemoteSandbox]:
        """``Client.sandbox`` for asyncio: ``async with client.sandbox(policy) as sb: await sb.exec([...])``."""
        handle = AsyncRemoteSandbox(self, await self.create_sandbox(policy, keep, idle_timeout))
        try:
            yield handle
        finally:
            await handle.close()

    async def create_sandbox(
        self, policy: PolicyArg = None, keep: bool = False, idle_timeout: float | None = None
    ) -> str:
        return str((await self.call(*self._create(policy, keep, idle_timeout)))["sandbox_id"])

    async def sandbox_exec(self, sandbox_id: str, command: list[str], **options: Unpack[ExecOptions]) -> ExecResult:
        return await self._run(*self._sandbox_exec(sandbox_id, command, options), options.get("on_output"))

    async def sandbox_run_code(
        self, sandbox_id: str, code: str, language: str = "python", **options: Unpack[RunOptions]
    ) -> ExecResult:
        return await self._run(*self._sandbox_run_code(sandbox_id, code, language, options), options.get("on_output"))

    async def sandbox_write_file(self, sandbox_id: str, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self.call(*self._write_file(sandbox_id, path, data, mode))

    async def sandbox_read_file(self, sandbox_id: str, path: str) -> bytes:
        return base64.b64decode((await self.call(*self._read_file(sandbox_id, path)))["data"])

    async def sandbox_list_dir(self, sandbox_id: str, path: str) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = (await self.call(*self._list_dir(sandbox_id, path)))["entries"]
        return entries

    async def close_sandbox(self, sandbox_id: str) -> None:
        await self.call(*self._close(sandbox_id))

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.call(*self._status())
        return result

    async def runtimes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.call(*self._runtimes())
        return result


class _Handle:
    """What both handles on a held sandbox keep: its id, and whether it was closed."""

    def __init__(self, sandbox_id: str) -> None:
        self.sandbox_id = sandbox_id
        self.closed = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sandbox_id!r}{', closed' if self.closed else ''})"


class RemoteSandbox(_Handle):
    """A sandbox the daemon holds, by its id, with the SDK ``Sandbox``'s methods.

    ``close`` is idempotent, and closing a sandbox the daemon already closed
    (its idle timeout, its connection's end) is not an error.
    """

    def __init__(self, client: Client, sandbox_id: str) -> None:
        super().__init__(sandbox_id)
        self.client = client

    def __enter__(self) -> RemoteSandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec(self, command: list[str], **options: Unpack[ExecOptions]) -> ExecResult:
        return self.client.sandbox_exec(self.sandbox_id, command, **options)

    def run_code(self, code: str, language: str = "python", **options: Unpack[RunOptions]) -> ExecResult:
        return self.client.sandbox_run_code(self.sandbox_id, code, language, **options)

    def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        self.client.sandbox_write_file(self.sandbox_id, path, data, mode)

    def read_file(self, path: str) -> bytes:
        return self.client.sandbox_read_file(self.sandbox_id, path)

    def list_dir(self, path: str) -> list[dict[str, Any]]:
        return self.client.sandbox_list_dir(self.sandbox_id, path)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(NotFoundError):
            self.client.close_sandbox(self.sandbox_id)


class AsyncRemoteSandbox(_Handle):
    """``RemoteSandbox`` for an ``AsyncClient``: the same methods, awaited."""

    def __init__(self, client: AsyncClient, sandbox_id: str) -> None:
        super().__init__(sandbox_id)
        self.client = client

    async def exec(self, command: list[str], **options: Unpack[ExecOptions]) -> ExecResult:
        return await self.client.sandbox_exec(self.sandbox_id, command, **options)

    async def run_code(self, code: str, language: str = "python", **options: Unpack[RunOptions]) -> ExecResult:
        return await self.client.sandbox_run_code(self.sandbox_id, code, language, **options)

    async def write_file(self, path: str, data: bytes | str, mode: int = 0o644) -> None:
        await self.client.sandbox_write_file(self.sandbox_id, path, data, mode)

    async def read_file(self, path: str) -> bytes:
        return await self.client.sandbox_read_file(self.sandbox_id, path)

    async def list_dir(self, path: str) -> list[dict[str, Any]]:
        return await self.client.sandbox_list_dir(self.sandbox_id, path)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(NotFoundError):
            await self.client.close_sandbox(self.sandbox_id)


async def _read_answer_line(reader: asyncio.StreamReader) -> bytes:
    try:
        return (await reader.readuntil(b"\n"))[:-1]
    except asyncio.IncompleteReadError:
        raise EOFError("the daemon closed the connection") from None
    except asyncio.LimitOverrunError:
        raise StockadeError(f"the daemon sent an answer longer than {_LINE_LIMIT} bytes") from None


def _request_line(method: str, params: dict[str, Any] | None, msg_id: int, token: str | None, streamed: bool) -> bytes:
    """One request, signed when there is a token, as the line to send."""
    if streamed:
        params = {**(params or {}), "stream": True}
    request: dict[str, Any] = {"method": method, "params": params or {}, "id": msg_id}
    if token:
        return auth.signed_line(request, token) + b"\n"
    return json.dumps(request, separators=(",", ":")).encode() + b"\n"


class _Reply:
    """The lines of one call's reply, as both clients read them: output streamed ahead
    of the answer (``{"id", "output": {"stream", "data"}}``) goes to ``on_output``,
    then the answer ends it."""

    def __init__(self, msg_id: int, on_output: Callable[[str, bytes], None] | None) -> None:
        self.msg_id = msg_id
        self.on_output = on_output
        self.callback_error: Exception | None = None

    def take(self, answer: _Answer) -> bool:
        """Take one line; True once it is the answer."""
        output = answer.output
        if not isinstance(output, dict) or "result" in answer.model_fields_set:
            # An error about the connection itself (a refusal) carries no id; anything else must be ours.
            if answer.id != self.msg_id and "id" in answer.model_fields_set and answer.error_code is None:
                raise StockadeError(f"the daemon answered request {answer.id!r}, not {self.msg_id}")
            return True
        # A callback that raises is not called again, and its exception waits for
        # the answer: left unread, that would be taken for the next call's.
        if self.on_output is not None and self.callback_error is None and answer.id == self.msg_id:
            try:
                self.on_output(str(output.get("stream")), base64.b64decode(str(output.get("data", ""))))
            except Exception as exc:  # noqa: BLE001 - raised by outcome(), once the answer is read
                self.callback_error = exc
        return False

    def outcome(self, answer: _Answer) -> _Answer:
        """The answer, or what to raise instead: the callback's exception, then the daemon's error."""
        if self.callback_error is not None:
            raise self.callback_error
        if (failure := _failure(answer)) is not None:
            raise failure
        return answer


def _exec_result(method: str, answer: _Answer) -> ExecResult:
    """A run's answer as its ``ExecResult`` (an answer without one is an error)."""
    if not isinstance(answer.result, ExecResult):
        raise StockadeError(f"the daemon's answer to {method} has no result")
    return answer.result


def _failure(answer: _Answer) -> StockadeError | None:
    """The error an answer carries, as its class in the ``StockadeError`` tree (the shared table)."""
    if answer.error is None:
        return None
    return error_from_code(answer.error_code, str(answer.error))


def _parse(line: bytes, answer_type: type[_Answer]) -> _Answer:
    try:
        # Fields this client does not know (a newer daemon's) are skipped, at any
        # depth: a client older than its daemon still reads its results.
        return answer_type.model_validate_json(line, extra="ignore")
    except ValidationError:
        raise StockadeError("the daemon sent an invalid response") from None


def read_token_file(path: str) -> str:
    """A token from its file (``stockade token new --file``), its trailing newline dropped."""
    try:
        with open(path) as f:
            token = f.read().strip()
    except OSError as exc:
        raise AuthenticationError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not token:
        raise AuthenticationError(f"the token file {path} is empty")
    return token


def call_with_retry(fn: Callable[[], T], max_retries: int = 3, backoff: float = 1.0) -> T:
    """Call ``fn``; on a connection failure retry with exponential backoff (seed 000).

    Only ``DaemonUnavailableError`` is retried: an authentication, rate-limit or
    policy error would fail the same way again.
    """
    for attempt in range(max(1, max_retries)):
        try:
            return fn()
        except DaemonUnavailableError:
            if attempt >= max_retries - 1:
                raise
            time.sleep(backoff * (2**attempt))
    raise AssertionError("unreachable")
