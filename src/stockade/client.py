"""Client for the stockade daemon's Unix-socket RPC.

    from stockade.client import Client, call_with_retry
    client = Client("/run/stockade/stockade.sock", auth_token=token)
    result = call_with_retry(lambda: client.execute(code="print(1)"))

Errors map to the ``StockadeError`` tree through the response's ``error_code``:
an unreachable daemon is ``DaemonUnavailableError`` (a ``ConnectionError``),
a refused signature ``AuthenticationError``, the rate limit ``RateLimitError``.
"""

from __future__ import annotations

import base64
import itertools
import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import (
    AgentError,
    AuthenticationError,
    DaemonUnavailableError,
    PolicyError,
    RateLimitError,
    RuntimeUnavailableError,
    SandboxError,
    StockadeError,
)
from .protocol import auth
from .result import ExecResult

T = TypeVar("T")
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO / SO_SNDTIMEO


class DaemonBusyError(SandboxError):
    """The daemon has no free sandbox slot and its queue is full."""


class NotFoundError(SandboxError, LookupError):
    """No such sandbox (or it belongs to another user)."""


_ERRORS: dict[str, type[StockadeError]] = {
    "auth": AuthenticationError,
    "rate_limit": RateLimitError,
    "busy": DaemonBusyError,
    "not_found": NotFoundError,
    "policy": PolicyError,
    "runtime_unavailable": RuntimeUnavailableError,
    "agent": AgentError,
}


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


class Client:
    """One connection to the daemon, opened lazily and reopened after a failure. Thread-safe."""

    def __init__(self, socket_path: str | None = None, auth_token: str | None = None, timeout: float = 30.0) -> None:
        if socket_path is None:
            from .daemon.config import socket_path_from_env

            socket_path = socket_path_from_env()
        self.socket_path = socket_path
        self._token = auth_token
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._sock_timeout: float | None = None
        self._buffer = b""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Client({self.socket_path!r}, auth={'hmac' if self._token else 'off'})"

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
        result = self._call(method, params, timeout, on_output, _ExecAnswer).result
        if not isinstance(result, ExecResult):
            raise StockadeError(f"the daemon's answer to {method} has no result")
        return result

    def _call(
        self,
        method: str,
        params: dict[str, Any] | None,
        timeout: float | None,
        on_output: Callable[[str, bytes], None] | None,
        answer_type: type[_Answer],
    ) -> _Answer:
        if on_output is not None:
            params = {**(params or {}), "stream": True}
        msg_id = next(self._ids)
        request: dict[str, Any] = {"method": method, "params": params or {}, "id": msg_id}
        if self._token:
            line = auth.signed_line(request, self._token) + b"\n"
        else:
            line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
        callback_error: Exception | None = None
        with self._lock:
            sock = self._connect()
            wait = timeout or self.timeout
            try:
                self._bound(sock, wait)
                try:
                    sock.sendall(line)
                except (BrokenPipeError, ConnectionResetError) as exc:
                    raise self._refusal(sock) or exc from None
                while True:
                    answer = _parse(self._read_line(sock), answer_type)
                    output = answer.output
                    if "result" in answer.model_fields_set or not isinstance(output, dict):
                        break
                    # {"id": ..., "output": {"stream", "data"}}: output streamed ahead of the answer.
                    # A callback that raises is not called again, and its exception waits for
                    # the answer: left unread, that would be taken for the next call's.
                    if on_output is not None and callback_error is None and answer.id == msg_id:
                        try:
                            on_output(str(output.get("stream")), base64.b64decode(str(output.get("data", ""))))
                        except Exception as exc:  # noqa: BLE001 - raised below, once the answer is read
                            callback_error = exc
                if answer.id != msg_id and "id" in answer.model_fields_set and answer.error_code is None:
                    raise StockadeError(f"the daemon answered request {answer.id!r}, not {msg_id}")
            except BlockingIOError:  # the kernel's bound on the wait (EAGAIN)
                self._drop()
                raise DaemonUnavailableError(f"the stockade daemon did not answer within {wait:g} s") from None
            except (OSError, EOFError) as exc:
                self._drop()
                raise DaemonUnavailableError(f"lost the connection to the stockade daemon: {exc}") from None
            except BaseException:
                self._drop()  # a half-read answer (Ctrl-C, a bad line) must not reach the next call
                raise
        if callback_error is not None:
            raise callback_error
        if answer.error is not None:
            cls = _ERRORS.get(str(answer.error_code or ""), StockadeError)
            raise cls(str(answer.error))
        return answer

    def _refusal(self, sock: socket.socket) -> StockadeError | None:
        """The error the daemon sent before it hung up, if it did.

        A daemon that will not serve a connection (a peer it does not allow,
        too many connections from one uid) answers once and closes it before
        reading. A request sent after that close fails with a broken pipe, but
        the answer that says why is still there to read.
        """
        try:
            answer = _parse(self._read_line(sock), _Answer)
        except (OSError, EOFError, StockadeError):
            return None
        if answer.error is None:
            return None
        return _ERRORS.get(str(answer.error_code or ""), StockadeError)(str(answer.error))

    def _read_line(self, sock: socket.socket) -> bytes:
        while b"\n" not in self._buffer:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the daemon closed the connection")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    # ---- methods --------------------------------------------------------------------

    def ping(self) -> str:
        return str(self.call("ping"))

    def selftest(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("selftest", timeout=max(self.timeout, 60))
        return result

    def execute(
        self,
        command: list[str] | None = None,
        *,
        code: str | None = None,
        language: str = "python",
        policy: dict[str, Any] | None = None,
        stdin: str | bytes | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
    ) -> ExecResult:
        params: dict[str, Any] = {"policy": policy or {}, "language": language}
        if command is not None:
            params["command"] = list(command)
        if code is not None:
            params["code"] = code
        if isinstance(stdin, bytes):
            params["stdin_b64"] = base64.b64encode(stdin).decode()
        elif stdin is not None:
            params["stdin"] = stdin
        wait = _run_timeout(policy) + self.timeout
        return self._run("execute", params, wait, on_output)

    def create_sandbox(self, policy: dict[str, Any] | None = None, keep: bool = False) -> str:
        result = self.call("sandbox.create", {"policy": policy or {}, "keep": keep}, timeout=max(self.timeout, 60))
        return str(result["sandbox_id"])

    def sandbox_exec(self, sandbox_id: str, command: list[str], **kwargs: Any) -> ExecResult:
        params = {"sandbox_id": sandbox_id, "command": list(command), **kwargs}
        return self._run("sandbox.exec", params, self.timeout + 600)

    def sandbox_run_code(self, sandbox_id: str, code: str, language: str = "python", **kwargs: Any) -> ExecResult:
        params = {"sandbox_id": sandbox_id, "code": code, "language": language, **kwargs}
        return self._run("sandbox.run_code", params, self.timeout + 600)

    def sandbox_write_file(self, sandbox_id: str, path: str, data: bytes | str, mode: int = 0o644) -> None:
        raw = data.encode() if isinstance(data, str) else data
        encoded = base64.b64encode(raw).decode()
        self.call("sandbox.write_file", {"sandbox_id": sandbox_id, "path": path, "data": encoded, "mode": mode})

    def sandbox_read_file(self, sandbox_id: str, path: str) -> bytes:
        result = self.call("sandbox.read_file", {"sandbox_id": sandbox_id, "path": path})
        return base64.b64decode(result["data"])

    def close_sandbox(self, sandbox_id: str) -> None:
        self.call("sandbox.close", {"sandbox_id": sandbox_id})

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    def runtimes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("runtimes", timeout=max(self.timeout, 60))
        return result


def _parse(line: bytes, answer_type: type[_Answer]) -> _Answer:
    try:
        # Fields this client does not know (a newer daemon's) are skipped, at any
        # depth: a client older than its daemon still reads its results.
        return answer_type.model_validate_json(line, extra="ignore")
    except ValidationError:
        raise StockadeError("the daemon sent an invalid response") from None


def _run_timeout(policy: dict[str, Any] | None) -> float:
    value = (policy or {}).get("timeout_seconds", 30)
    return float(value) if isinstance(value, (int, float)) else 30.0


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
