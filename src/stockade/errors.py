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
    │   ├── DaemonBusyError                no free sandbox slot, and the queue is full
    │   ├── RunCancelledError              the run was cancelled before it started
    │   └── AgentError                     the guest agent answered with an error
    │       ├── AgentProtocolError         the guest broke the wire protocol
    │       └── PathNotFoundError (+NotFoundError)  a file call's path does not exist in the sandbox
    ├── DaemonUnavailableError (ConnectionError)  unreachable, or shutting down: worth a retry
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

from typing import Any


class StockadeError(Exception):
    """Root of every error stockade raises."""


class PolicyError(StockadeError, ValueError):
    """A policy value is invalid; the message names the field."""


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


class DaemonBusyError(SandboxError):
    """The daemon has no free sandbox slot and its queue is full."""


class RunCancelledError(SandboxError):
    """The run was cancelled before its isolate started."""


class InternalError(StockadeError):
    """A fault in stockade itself, not in the request or the sandbox."""


class PathNotFoundError(NotFoundError, AgentError):
    """A file call's path does not exist in the sandbox (``path_not_found``, HTTP 404)."""


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
    "rate_limit": RateLimitError,
    "busy": DaemonBusyError,
    "unavailable": DaemonUnavailableError,
    "not_found": NotFoundError,
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
    "rate_limit": 429,
    "busy": 503,
    "unavailable": 503,
    "not_found": 404,
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


def public_message(exc: BaseException) -> str:
    """What a caller is told of ``exc``: its message, or for a fault in stockade itself
    (``internal``) only its class, since the message may hold the daemon's internals."""
    return str(exc) if error_code(exc) != "internal" else f"Internal error: {type(exc).__name__}"


def error_from_code(code: Any, message: str) -> StockadeError:
    """The error a client raises for a wire error: the class of ``code`` (an unknown
    code, from a newer daemon: ``StockadeError`` itself)."""
    cls = ERROR_CODES.get(code, StockadeError) if isinstance(code, str) else StockadeError
    return cls(message)


_AGENT_ERRORS: dict[int, type[AgentError]] = {
    -32700: AgentProtocolError,
    -32600: AgentProtocolError,
}


def agent_error(code: Any, message: Any, data: Any = None) -> AgentError:
    """Build the error for a JSON-RPC error object received from a guest."""
    code = code if isinstance(code, int) else -32603
    cls = _AGENT_ERRORS.get(code, AgentError)
    return cls(str(message)[:2000], code, data)
