"""One error tree for stockade.

    StockadeError
    ├── PolicyError (ValueError)           a policy field is out of range or malformed
    ├── RuntimeUnavailableError (RuntimeError)
    │                                      no runtime on this host can serve the request
    ├── SandboxError (RuntimeError)
    │   ├── SandboxStartError              the isolate could not be built
    │   ├── SandboxClosedError             the sandbox was used after aclose()/close()
    │   └── AgentError                     the guest agent answered with an error
    │       └── AgentProtocolError         the guest broke the wire protocol
    ├── DaemonUnavailableError (ConnectionError)
    ├── AuthenticationError (PermissionError)
    └── RateLimitError

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


_AGENT_ERRORS: dict[int, type[AgentError]] = {
    -32700: AgentProtocolError,
    -32600: AgentProtocolError,
}


def agent_error(code: Any, message: Any, data: Any = None) -> AgentError:
    """Build the error for a JSON-RPC error object received from a guest."""
    code = code if isinstance(code, int) else -32603
    cls = _AGENT_ERRORS.get(code, AgentError)
    return cls(str(message)[:2000], code, data)
