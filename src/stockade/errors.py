"""One error tree for stockade.

    StockadeError
    ├── PolicyError (ValueError)           a policy field is out of range or malformed
    ├── RuntimeUnavailableError (RuntimeError)
    │                                      no runtime on this host can serve the request
    ├── InvalidRequestError (ValueError)  a request's fields are missing or malformed
    │   └── MethodNotFoundError            no such method
    ├── SandboxError (RuntimeError)
    │   ├── SandboxStartError              the isolate could not be built
    │   ├── SandboxClosedError             the sandbox was used after aclose()/close()
    │   ├── CallTooLargeError (+InvalidRequestError)  code, stdin or file data over one call's limit
    │   ├── NotFoundError (LookupError)    no such sandbox or running execution (or another owner's)
    │   │   └── SandboxLostError           the sandbox belonged to a daemon instance that has stopped
    │   ├── DaemonBusyError                no free sandbox slot, and the queue is full
    │   ├── RunCancelledError              the run was cancelled before it started
    │   ├── TransferError                  a directory upload or download failed (transfer.py)
    │   │   ├── TransferTooLargeError      over max_bytes or max_files; nothing sent or written
    │   │   └── UnsafeArchiveError         the archive from the sandbox holds what the host will not write
    │   └── AgentError                     the guest agent answered with an error
    │       ├── AgentProtocolError         the guest broke the wire protocol
    │       └── SandboxOSError (OSError)   a file call failed in the sandbox with an errno
    │           ├── PathNotFoundError (+NotFoundError, FileNotFoundError)  ENOENT
    │           ├── PathExistsError (FileExistsError)                      EEXIST
    │           ├── PathIsADirectoryError (IsADirectoryError)              EISDIR
    │           ├── PathNotADirectoryError (NotADirectoryError)            ENOTDIR
    │           └── PathPermissionError (PermissionError)                  EACCES, EPERM
    ├── DaemonUnavailableError (ConnectionError)  unreachable, or shutting down: worth a retry
    │   └── AnswerLostError                the connection broke after the request went out: it may have run
    ├── AuthenticationError (PermissionError)
    ├── RateLimitError
    └── InternalError                      a fault in stockade itself (logged where it happened)

Across a wire (the Unix socket's ``error_code``, the HTTP API's ``code``) an
error travels as a code from ``ERROR_CODES``, never as a class name, and each
door turns the code back into the same class: ``error_code`` and
``error_from_code`` are the one table every server and client uses.

Limits that a run hits (timeout, memory, output) are not errors: they are
reported in ``ExecResult.termination_reason``. Errors mean stockade could not
do what was asked. Low-level errors are translated once, where they happen.
"""

from __future__ import annotations

import errno as _errno
import os

TYPE_CHECKING = False  # not typing's: the CLI imports this module before it starts the zygote (cli.py)
if TYPE_CHECKING:
    from typing import Any, TypeGuard


class StockadeError(Exception):
    """Root of every error stockade raises."""


class PolicyError(StockadeError, ValueError):
    """A policy value is invalid; the message names the field. A Policy's own check also
    says where each problem is: ``problems``, (path under the policy, message) pairs."""

    problems: tuple[tuple[tuple[str | int, ...], str], ...] = ()


class ConfigError(PolicyError):
    """A STOCKADE_* setting is malformed; the message names the variable."""


class RuntimeUnavailableError(StockadeError, RuntimeError):
    """The requested runtime or isolation level cannot run on this host (says why)."""


class SandboxError(StockadeError, RuntimeError):
    """Something went wrong with a sandbox."""


class SandboxStartError(SandboxError):
    """Building the isolate failed; the message names the failing step."""


class SandboxClosedError(SandboxError):
    """The sandbox is closed."""


class AgentError(SandboxError):
    """The guest agent refused or failed a request.

    ``code`` is the JSON-RPC error code. The guest is untrusted: its message is
    shown as data, and the class is chosen from the code by an explicit table,
    never from a name the guest sends.
    """

    def __init__(self, message: str, code: int = -32603, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


class AgentProtocolError(AgentError):
    """The guest sent something that is not valid framed JSON-RPC."""


class DaemonUnavailableError(StockadeError, ConnectionError):
    """The stockade daemon cannot be reached."""


class AnswerLostError(DaemonUnavailableError):
    """The connection to the daemon broke after a request went out and before its answer:
    the request may have run. A client sends such a request (an ``execute``...) again
    only when told to (``Retry(resend_unsafe=True)``)."""


class AuthenticationError(StockadeError, PermissionError):
    """The daemon refused the request's credentials."""


class RateLimitError(StockadeError):
    """The daemon's per-client rate limit was exceeded."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InvalidRequestError(StockadeError, ValueError):
    """A request is malformed; the message names the field."""


class MethodNotFoundError(InvalidRequestError):
    """The daemon has no such method."""


class CallTooLargeError(SandboxError, InvalidRequestError):
    """Code, stdin or file data larger than one call carries; nothing was sent."""


class NotFoundError(SandboxError, LookupError):
    """No such sandbox or running execution (another owner's is reported the same way)."""


class SandboxLostError(NotFoundError):
    """The sandbox belonged to another daemon instance, which has stopped: a daemon's
    sandboxes end with it (``sandbox_lost``). The message names both instances."""


class DaemonBusyError(SandboxError):
    """The daemon has no free sandbox slot and its queue is full."""


class RunCancelledError(SandboxError):
    """The run was cancelled before its isolate started."""


class TransferError(SandboxError):
    """An upload or download could not be done; the message says why (tar's own words where it spoke)."""


class TransferTooLargeError(TransferError):
    """The archive is over ``max_bytes`` (or a download over ``max_files``); nothing was sent or written."""


class UnsafeArchiveError(TransferError):
    """The archive from the sandbox holds what the host will not write (a link, a device, a name outside)."""


class InternalError(StockadeError):
    """A fault in stockade itself, not in the request or the sandbox."""


class SandboxOSError(AgentError, OSError):
    """A file call failed in the sandbox with an OS error: ``errno`` says which.

    Also an ``OSError``, and the subclasses below are the stdlib's class for
    their errno too (``FileNotFoundError``, ``IsADirectoryError``...), so code
    written for local files catches them. ``str()`` is the message as sent
    (not the stdlib's ``[Errno N]`` form); ``filename`` is the path, where the
    raiser knows it. The errno comes from the untrusted agent: a false one
    only changes which class the caller gets.
    """

    default_errno: int | None = None

    def __init__(self, message: str, code: int = -32603, data: Any = None, errno: int | None = None) -> None:
        super().__init__(message, code, data)
        if errno is None and isinstance(data, dict) and _is_errno(data.get("errno")):
            errno = data["errno"]
        self.errno = errno if errno is not None else self.default_errno
        self.strerror = os.strerror(self.errno) if self.errno is not None else None

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PathNotFoundError(NotFoundError, SandboxOSError, FileNotFoundError):
    """A file call's path does not exist in the sandbox (``path_not_found``, HTTP 404)."""

    default_errno = _errno.ENOENT


class PathExistsError(SandboxOSError, FileExistsError):
    """A file call's path exists where it must not (EEXIST)."""

    default_errno = _errno.EEXIST


class PathIsADirectoryError(SandboxOSError, IsADirectoryError):
    """A file call's path is a directory where a file was needed (EISDIR)."""

    default_errno = _errno.EISDIR


class PathNotADirectoryError(SandboxOSError, NotADirectoryError):
    """A file call's path (or a part of it) is not a directory where one was needed (ENOTDIR)."""

    default_errno = _errno.ENOTDIR


class PathPermissionError(SandboxOSError, PermissionError):
    """The sandbox's own permissions refused a file call (EACCES, EPERM)."""

    default_errno = _errno.EACCES


# errno -> the class a file call's OS error is raised as (any other errno: SandboxOSError).
_OS_ERRORS: dict[int, type[SandboxOSError]] = {
    _errno.ENOENT: PathNotFoundError,
    _errno.EEXIST: PathExistsError,
    _errno.EISDIR: PathIsADirectoryError,
    _errno.ENOTDIR: PathNotADirectoryError,
    _errno.EACCES: PathPermissionError,
    _errno.EPERM: PathPermissionError,
}


def _is_errno(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 4096


def sandbox_os_error(exc: AgentError) -> AgentError:
    """A file call's ``AgentError`` as the class of the errno the agent reported with it
    (``{"errno": N}`` in its data); ``exc`` itself when it reported none."""
    number = exc.data.get("errno") if isinstance(exc.data, dict) else None
    if type(exc) is not AgentError or not _is_errno(number):
        return exc
    return _OS_ERRORS.get(number, SandboxOSError)(str(exc), exc.code, exc.data, errno=number)


def os_error_named(name: str, message: str, filename: str) -> SandboxOSError:
    """The OS error a sandbox's program reported by errno name (``"ENOENT"``), as its class
    (``PathNotFoundError``...); an unknown name, as EIO."""
    number = getattr(_errno, name, None) if name.startswith("E") and name.isupper() else None
    number = number if _is_errno(number) else _errno.EIO
    error = _OS_ERRORS.get(number, SandboxOSError)(message, errno=number)
    error.filename = filename
    return error


def start_error(exc: BaseException) -> BaseException:
    """A run's or spawn's ``AgentError`` for a program or working directory that is not there (or
    not allowed) as the OS error class subprocess would raise (``PathNotFoundError``, a
    ``FileNotFoundError``); any other exception as it is."""
    if isinstance(exc, AgentError) and isinstance(exc.data, dict) and exc.data.get("what") in ("exec", "cwd"):
        return sandbox_os_error(exc)
    return exc


# code -> class, as errors travel between doors and clients. Codes are the
# wire's words and never change meaning; the first code of a class is the one
# it is sent as.
ERROR_CODES: dict[str, type[StockadeError]] = {
    "invalid_params": InvalidRequestError,
    "invalid_request": InvalidRequestError,
    "method_not_found": MethodNotFoundError,
    "too_large": CallTooLargeError,
    "policy": PolicyError,
    "auth": AuthenticationError,
    # A large request refused unread on a connection that carried no signed request yet, its uid
    # having failed authentication lately: a signed client proves the connection (a ping) and
    # sends it again (rpc/server.py AUTH_PENALTY_S).
    "unproven": AuthenticationError,
    "rate_limit": RateLimitError,
    "busy": DaemonBusyError,
    "unavailable": DaemonUnavailableError,
    "not_found": NotFoundError,
    "sandbox_lost": SandboxLostError,
    "path_not_found": PathNotFoundError,
    "cancelled": RunCancelledError,
    "runtime_unavailable": RuntimeUnavailableError,
    "agent": AgentError,
    "sandbox": SandboxError,
    "internal": InternalError,
}
_CODE_OF: dict[type[StockadeError], str] = {}
for _code, _cls in ERROR_CODES.items():
    _CODE_OF.setdefault(_cls, _code)
_CODE_OF[ConfigError] = "policy"

# The HTTP status each code is answered with by the HTTP API.
HTTP_STATUS: dict[str, int] = {
    "invalid_request": 400,
    "invalid_params": 422,
    "method_not_found": 404,
    "too_large": 413,
    "policy": 422,
    "auth": 401,
    "unproven": 401,
    "rate_limit": 429,
    "busy": 503,
    "unavailable": 503,
    "not_found": 404,
    "sandbox_lost": 404,
    "path_not_found": 404,
    "cancelled": 409,
    "runtime_unavailable": 422,
    "agent": 400,
    "sandbox": 500,
    "internal": 500,
}


def error_code(exc: BaseException) -> str:
    """The wire code of ``exc``: its nearest class in ``ERROR_CODES``; ``internal`` for
    anything outside the tree (a fault in stockade, to be logged by the caller)."""
    for cls in type(exc).__mro__:
        code = _CODE_OF.get(cls)
        if code is not None:
            return code
    return "internal"


# What a terminal acts on or hides: C0 controls but tab and newline, DEL, C1 controls; and what
# reorders or hides text: every Default_Ignorable_Code_Point of Unicode's DerivedCoreProperties
# (bidirectional overrides and isolates, zero-width and invisible characters, fillers, a soft
# hyphen, variation selectors, the tag characters, and the unassigned ones kept for more of them:
# each can spell text a model reads and a person does not see, as a pair used as 0 and 1 can),
# interlinear annotations, and the line and paragraph separators some viewers break lines at.
_controls: dict[int, str] = {}  # built at the first use (4,000 entries: not a cost of every import)


def _control_table() -> dict[int, str]:
    if not _controls:
        table = {c: f"\\x{c:02x}" for c in [*range(0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0), 0xAD]}
        ignorable = [0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, *range(0x180B, 0x1810), *range(0x200B, 0x2010)]
        ignorable += [*range(0x202A, 0x202F), *range(0x2060, 0x2070), 0x3164, *range(0xFE00, 0xFE10), 0xFEFF]
        ignorable += [0xFFA0, *range(0xFFF0, 0xFFF9), *range(0x1BCA0, 0x1BCA4), *range(0x1D173, 0x1D17B)]
        ignorable += [*range(0xE0000, 0xE1000)]
        table.update({c: f"\\u{c:04x}" if c <= 0xFFFF else f"\\U{c:08x}" for c in ignorable})
        table.update({c: f"\\u{c:04x}" for c in [*range(0xFFF9, 0xFFFC), 0x2028, 0x2029]})
        _controls.update(table)
    return _controls


def printable(text: str) -> str:
    """``text`` from an isolate (a server's stderr, a name it chose) safe to quote in a message a
    terminal or a log shows: what would erase, hide, reorder or forge what surrounds it written as
    ``\\xNN``/``\\uNNNN``, and each line after the first indented, so that none can pass for a
    line of stockade's own."""
    return text.translate(_control_table()).replace("\n", "\n    ")


def without_controls(text: str) -> str:
    """``text`` from an isolate shown whole (a tool's output, its description): its lines and tabs
    kept, what a terminal would act on or hide written as ``\\xNN``/``\\uNNNN`` (``printable``'s)."""
    return text.translate(_control_table())


def utf8_text(text: str) -> str:
    """``text`` as UTF-8 can carry it. A lone surrogate (a name that was not UTF-8, read as
    ``os.listdir`` reads it; a JSON escape an isolate wrote) becomes a backslash escape of its
    byte (``\\xff``) or of itself, so that no answer holding it fails to encode."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


AUTH_FAILED = "Authentication failed"  # all a daemon says of a refused signature, to anyone
RATE_LIMITED = "Rate limit exceeded"  # a socket's answer past its uid's rate (code rate_limit)
UNPROVEN = "unproven"  # the code of a large request refused unread (ERROR_CODES)


def refused_signature(message: str, signed: bool) -> str:
    """A daemon's ``AUTH_FAILED`` with what the client, which knows whether it signed, can tell
    its user; any other refusal coded ``auth`` (a uid not allowed, an admin's call) as it is."""
    if message != AUTH_FAILED:
        return message
    if signed:
        return f"{message}: the daemon refused this signature (another token than its own, or a request too old)"
    return (
        f"{message}: the daemon requires signed requests: give its token "
        "(--token-file FILE, STOCKADE_AUTH_TOKEN, or Client(token_file=...))"
    )


def public_message(exc: BaseException) -> str:
    """What a caller is told of ``exc``: its message, or for a fault in stockade itself
    (``internal``) only its class, since the message may hold the daemon's internals."""
    # Text UTF-8 can carry: a message may quote what an isolate said (a path, a server's words).
    return utf8_text(str(exc)) if error_code(exc) != "internal" else f"Internal error: {type(exc).__name__}"


def error_from_code(code: Any, message: str, errno: Any = None) -> StockadeError:
    """The error a client raises for a wire error: the class of ``code`` (an unknown
    code, from a newer daemon: ``StockadeError`` itself). A file call's ``agent``
    error that came with an ``errno`` is that errno's ``SandboxOSError``."""
    cls = ERROR_CODES.get(code, StockadeError) if isinstance(code, str) else StockadeError
    if cls is AgentError and _is_errno(errno):
        return _OS_ERRORS.get(errno, SandboxOSError)(message, errno=errno)
    return cls(message)


def wire_errno(exc: BaseException) -> int | None:
    """The errno an error answer carries beside its code: a ``SandboxOSError``'s (None: none)."""
    number = exc.errno if isinstance(exc, SandboxOSError) else None
    return number if _is_errno(number) else None


_AGENT_ERRORS: dict[int, type[AgentError]] = {
    -32700: AgentProtocolError,
    -32600: AgentProtocolError,
}


def agent_error(code: Any, message: Any, data: Any = None) -> AgentError:
    """Build the error for a JSON-RPC error object received from a guest: its message is the
    isolate's words, escaped (``printable``) wherever it is quoted or logged."""
    code = code if isinstance(code, int) else -32603
    cls = _AGENT_ERRORS.get(code, AgentError)
    return cls(printable(str(message)[:2000]), code, data)
