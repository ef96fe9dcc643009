"""What ``Client`` and ``AsyncClient`` share: where the daemon is, the token, the bounds,
the retry policy, and what each RPC method sends, as (method, params, timeout).

A request is built as the daemon's own model (``protocol/models.py``), so a
bad argument is refused here, before anything is sent, with the daemon's own
words.
"""

from __future__ import annotations

import base64
import itertools
import socket
from collections.abc import Callable
from typing import Any, TypedDict, TypeVar

from ..daemon_peer import impostor
from ..errors import AuthenticationError, StockadeError
from ..limits import argv_list, check_call_size
from ..policy import Policy, policy_of
from ..protocol.models import (
    CancelRequest,
    ExecuteRequest,
    InterpreterRef,
    InterruptRequest,
    ListDir,
    ReadFile,
    Request,
    SandboxCreate,
    SandboxExec,
    SandboxPublish,
    SandboxRef,
    SandboxRunCode,
    WriteFile,
    parse,
)
from .retry import NO_RETRY, ConnectionLost, Retry, unreachable

PolicyArg = Policy | dict[str, Any] | None
_T = TypeVar("_T")
_EXECUTE_KEYWORDS = ("command", "code", "language", "policy", "stdin", "on_output")
_SANDBOX_KEYWORDS = ("policy", "keep", "idle_timeout", "publish")


def _policy_with(
    call: str, policy: PolicyArg, timeout: float | None, fields: dict[str, Any] | None, own: tuple[str, ...]
) -> PolicyArg:
    """``policy`` with a call's ``timeout`` (its ``timeout_seconds``) and policy fields, as the SDK's
    ``run`` and ``Sandbox`` take them; as given when there are none (the daemon checks it)."""
    if timeout is None and not fields:
        return policy
    return policy_of(call, policy, fields or {}, timeout, own)


Sent = tuple[str, dict[str, Any] | None, float | None]  # (method, params, timeout)

_R = TypeVar("_R", bound=Request)


class RunOptions(TypedDict, total=False):
    """What a held sandbox's ``run_code`` takes as keywords (and ``exec``, with ``cwd``)."""

    stdin: str | bytes | None  # bytes go as ``stdin_b64``
    env: dict[str, str] | None
    timeout: float | None  # seconds, at most the sandbox's policy's
    on_output: Callable[[str, bytes], None] | None  # streamed (stream, data) chunks


class ExecOptions(RunOptions, total=False):
    cwd: str | None


class CodeOptions(RunOptions, total=False):
    session: str | None  # run the code as a cell of this stateful interpreter


_CODE_OPTIONS = frozenset(CodeOptions.__annotations__)
_EXEC_OPTIONS = frozenset(ExecOptions.__annotations__)


class Requests:
    """Where the daemon is, the token, the bound on a wait, the retry policy, and what
    each RPC method sends: (method, params, timeout)."""

    def __init__(
        self,
        socket_path: str | None = None,
        auth_token: str | None = None,
        timeout: float = 30.0,
        *,
        token_file: str | None = None,
        retry: Retry | None = Retry(),  # noqa: B008 - frozen: one shared default is safe
    ) -> None:
        if socket_path is None:
            from ..daemon.config import socket_path_from_env

            socket_path = socket_path_from_env()
        self.socket_path = socket_path
        if token_file is not None:
            if auth_token is not None:
                raise TypeError("give auth_token or token_file, not both")
            auth_token = read_token_file(token_file)
        elif auth_token is None:  # as the socket: the settings' (STOCKADE_AUTH_TOKEN), as the CLI takes it
            from ..settings import current

            auth_token = current().secret("auth_token")
        self._token = auth_token
        self.timeout = timeout
        if retry is not None and not isinstance(retry, Retry):
            raise TypeError(f"retry must be a Retry or None, not {type(retry).__name__}")
        self.retry = NO_RETRY if retry is None else retry
        self._ids = itertools.count(1)
        from ..settings import current

        self._daemon_user = current().daemon_user  # who else may listen as the daemon (daemon_peer.py)

    def _impostor(self, sock: socket.socket) -> ConnectionLost | None:
        """The error for a connection whose listener is no daemon's process (daemon_peer.py), or
        that is not connected after all (a connect cut short: tried again)."""
        try:
            why = impostor(sock, self.socket_path, self._daemon_user)
        except OSError as exc:
            return unreachable(self.socket_path, exc)
        return None if why is None else ConnectionLost(f"refused to talk to {why}", sent=False, retryable=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.socket_path!r}, auth={'hmac' if self._token else 'off'})"

    def _ping(self) -> Sent:
        return "ping", None, None

    def _selftest(self) -> Sent:
        return "selftest", None, max(self.timeout, 60)  # a real sandbox, started cold if need be

    def _execute(
        self,
        command: list[str] | None,
        code: str | None,
        language: str,
        policy: PolicyArg,
        stdin: str | bytes | None,
        timeout: float | None = None,
        policy_fields: dict[str, Any] | None = None,
    ) -> tuple[str, dict[str, Any], float]:
        policy = _policy_with("Client.execute", policy, timeout, policy_fields, _EXECUTE_KEYWORDS)
        fields: dict[str, Any] = {"command": None if command is None else argv_list(command), "code": code}
        request = _build(ExecuteRequest, "execute", language=language, policy=policy, **fields, **_stdin(stdin))
        request.check_sizes()  # refused before it is sent, as the daemon would refuse it
        return "execute", _params(request), request.policy.timeout_seconds + self.timeout

    def _cancel(self, execution_id: str) -> Sent:
        return "execute.cancel", _params(_build(CancelRequest, "execute.cancel", execution_id=execution_id)), None

    def _create(
        self,
        policy: PolicyArg,
        keep: bool,
        idle_timeout: float | None,
        timeout: float | None = None,
        policy_fields: dict[str, Any] | None = None,
    ) -> Sent:
        policy = _policy_with("Client.sandbox", policy, timeout, policy_fields, _SANDBOX_KEYWORDS)
        request = _build(SandboxCreate, "sandbox.create", policy=policy, keep=keep, idle_timeout=idle_timeout)
        return "sandbox.create", _params(request), max(self.timeout, 60)

    def _sandbox_exec(
        self, sandbox_id: str, command: list[str], options: ExecOptions
    ) -> tuple[str, dict[str, Any], float]:
        return self._sandbox_run(SandboxExec, "sandbox.exec", sandbox_id, {"command": argv_list(command)}, options)

    def _sandbox_run_code(
        self, sandbox_id: str, code: str, language: str, options: CodeOptions
    ) -> tuple[str, dict[str, Any], float]:
        fields = {"code": code, "language": language}
        return self._sandbox_run(SandboxRunCode, "sandbox.run_code", sandbox_id, fields, options)

    def _sandbox_run(
        self,
        model: type[SandboxExec | SandboxRunCode],
        method: str,
        sandbox_id: str,
        fields: dict[str, Any],
        options: ExecOptions | CodeOptions,
    ) -> tuple[str, dict[str, Any], float]:
        known = _EXEC_OPTIONS if model is SandboxExec else _CODE_OPTIONS
        if unknown := sorted(set(options) - known):
            # Keywords travel as a dict: a misspelt one would otherwise be dropped without a word.
            # Worded as Python words a call's unknown keyword, by the method's public name.
            from ..checked import nearest

            near = nearest(unknown[0], known)
            hint = f" (did you mean {near!r}?)" if near else ""
            many = f" (and {', '.join(map(repr, unknown[1:]))})" if unknown[1:] else ""
            raise TypeError(
                f"{method.removeprefix('sandbox.')}() got an unexpected keyword argument {unknown[0]!r}{hint}{many}; "
                f"it takes {', '.join(sorted(known))}"
            )
        given = {k: v for k, v in options.items() if k not in ("stdin", "on_output")}
        request = _build(model, method, sandbox_id=sandbox_id, **fields, **given, **_stdin(options.get("stdin")))
        request.check_sizes()  # refused before it is sent, as the daemon would refuse it
        # The sandbox's policy bounds a run the client did not bound; the client does not know it.
        timeout = request.timeout
        return method, _params(request), (600 if timeout is None else timeout) + self.timeout

    def _write_file(self, sandbox_id: str, path: str, data: bytes | str, mode: int) -> Sent:
        raw = data.encode() if isinstance(data, str) else data
        check_call_size("write_file data", raw)  # refused before it is sent, as the daemon would refuse it
        encoded = base64.b64encode(raw).decode()
        request = _build(WriteFile, "sandbox.write_file", sandbox_id=sandbox_id, path=path, data=encoded, mode=mode)
        return "sandbox.write_file", _params(request), None

    def _read_file(self, sandbox_id: str, path: str, max_bytes: int | None = None) -> Sent:
        request = _build(ReadFile, "sandbox.read_file", sandbox_id=sandbox_id, path=path, max_bytes=max_bytes)
        return "sandbox.read_file", _params(request), None

    def _list_dir(self, sandbox_id: str, path: str) -> Sent:
        return "sandbox.list_dir", _params(_build(ListDir, "sandbox.list_dir", sandbox_id=sandbox_id, path=path)), None

    def _close_interpreter(self, sandbox_id: str, session: str) -> Sent:
        request = _build(InterpreterRef, "sandbox.close_interpreter", sandbox_id=sandbox_id, session=session)
        return "sandbox.close_interpreter", _params(request), None

    def _publish(self, sandbox_id: str, spec: int | str) -> Sent:
        request = _build(SandboxPublish, "sandbox.publish", sandbox_id=sandbox_id, port=spec)
        return "sandbox.publish", _params(request), None

    def _interrupt(self, sandbox_id: str, session: str | None = None) -> Sent:
        fields = {"sandbox_id": sandbox_id, **({"session": session} if session is not None else {})}
        return "sandbox.interrupt", _params(_build(InterruptRequest, "sandbox.interrupt", **fields)), None

    def _close(self, sandbox_id: str) -> Sent:
        return "sandbox.close", _params(_build(SandboxRef, "sandbox.close", sandbox_id=sandbox_id)), None

    def _status(self) -> Sent:
        return "status", None, None

    def _runtimes(self) -> Sent:
        return "runtimes", None, max(self.timeout, 60)  # detecting a runtime may start one


class SandboxHandle:
    """What both handles on a held sandbox keep: its id, whether it was closed, what the daemon
    said of it (its runtime, its policy's digest, its memory limit, which its scratch disk counts
    in: a download checks it), and the ports published through it (port inside -> (host address,
    host port), as ``Sandbox.published``)."""

    scratch_dir = "/tmp"  # a directory inside that code may write, on every runtime (as Sandbox's)

    def __init__(
        self, sandbox_id: str, memory_mb: int | None = None, *, runtime: str | None = None,
        policy_digest: str | None = None,
    ) -> None:  # fmt: skip
        self.sandbox_id = sandbox_id
        self.memory_mb = memory_mb
        self.runtime = runtime
        self.policy_digest = policy_digest
        self.closed = False
        self.published: dict[int, tuple[str, int]] = {}

    def _note_published(self, answer: dict[str, Any]) -> tuple[str, int]:
        address = published_address(answer)
        self.published[answered(answer, "port", int)] = address
        return address

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.sandbox_id!r}{', closed' if self.closed else ''})"


def described(answer: dict[str, Any]) -> dict[str, Any]:
    """A handle's fields from a ``sandbox.create`` or ``sandbox.get`` answer."""
    return {
        "sandbox_id": answered(answer, "sandbox_id", str), "memory_mb": answer.get("memory_mb"),
        "runtime": answer.get("runtime"), "policy_digest": answer.get("policy_digest"),
    }  # fmt: skip


def published_address(answer: dict[str, Any]) -> tuple[str, int]:
    """The host address and port of a ``sandbox.publish`` answer."""
    return answered(answer, "address", str), answered(answer, "host_port", int)


def answered(answer: Any, name: str, kind: type[_T]) -> _T:
    """``answer[name]``, which must be a ``kind``: the StockadeError that says so otherwise (a daemon's
    answer of the wrong shape raised KeyError, ValueError or binascii.Error from here, or went on)."""
    value = answer.get(name) if isinstance(answer, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StockadeError(f"the daemon sent an invalid response: no {name} ({kind.__name__}) in its answer")
    return value


def answered_bytes(answer: Any, name: str) -> bytes:
    """``answer[name]`` decoded from base64 (a file's data, a process's output)."""
    try:
        return base64.b64decode(answered(answer, name, str), validate=True)
    except ValueError:  # binascii.Error
        raise StockadeError(f"the daemon sent an invalid response: {name} is not base64") from None


def _build(model: type[_R], method: str, **fields: Any) -> _R:
    """A request model from a client call's arguments (None: the field's default)."""
    policy = fields.get("policy")
    if isinstance(policy, Policy):
        fields["policy"] = policy.to_dict()
    request: _R = parse(model, {k: v for k, v in fields.items() if v is not None}, f"{method} request")
    return request


def _params(request: Request) -> dict[str, Any]:
    """A request as the params to send: only what differs from the defaults (less to sign and read)."""
    return request.model_dump(mode="json", exclude_defaults=True)


def _stdin(stdin: str | bytes | None) -> dict[str, Any]:
    if isinstance(stdin, bytes):
        return {"stdin_b64": base64.b64encode(stdin).decode()} if stdin else {}
    return {"stdin": stdin} if stdin else {}


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
