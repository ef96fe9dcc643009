"""stockade: run code and tools nobody has vetted behind real isolation boundaries.

    import stockade
    result = stockade.run_code("print(6 * 7)")
    result.stdout  # '42\n'

The public surface is listed in ``__all__``; attributes load lazily so that
``import stockade`` (and the CLI) stays cheap.
"""

from __future__ import annotations

import importlib

# Not ``from typing import ...``: typing pulls in re, enum and collections (~7 ms), and
# the CLI's run through a daemon imports this package and little else (cli_daemon.py).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "run": "sdk",
    "run_code": "sdk",
    "arun": "sdk_async",
    "arun_code": "sdk_async",
    "warm_up": "sdk",
    "Sandbox": "sdk",
    "AsyncSandbox": "sdk_async",
    "Interpreter": "sdk",
    "Policy": "policy",
    "Mount": "policy",
    "ExecResult": "result",
    "CellOutput": "result",
    "CellException": "result",
    "SecurityViolation": "result",
    "ResourceUsage": "result",
    "FileEvent": "watch",
    "FileWatch": "watch",
    "RuntimeManager": "runtimes.manager",
    "StockadeError": "errors",
    "PolicyError": "errors",
    "ConfigError": "errors",
    "RuntimeUnavailableError": "errors",
    "SandboxError": "errors",
    "SandboxStartError": "errors",
    "SandboxClosedError": "errors",
    "AgentError": "errors",
    "AgentProtocolError": "errors",
    "DaemonUnavailableError": "errors",
    "AuthenticationError": "errors",
    "RateLimitError": "errors",
}

__all__ = [
    "AgentError",
    "AgentProtocolError",
    "AsyncSandbox",
    "AuthenticationError",
    "CellException",
    "CellOutput",
    "ConfigError",
    "DaemonUnavailableError",
    "ExecResult",
    "FileEvent",
    "FileWatch",
    "Interpreter",
    "Mount",
    "Policy",
    "PolicyError",
    "RateLimitError",
    "ResourceUsage",
    "RuntimeManager",
    "RuntimeUnavailableError",
    "Sandbox",
    "SandboxClosedError",
    "SandboxError",
    "SandboxStartError",
    "SecurityViolation",
    "StockadeError",
    "__version__",
    "arun",
    "arun_code",
    "run",
    "run_code",
    "warm_up",
]

if TYPE_CHECKING:
    from .errors import (
        AgentError,
        AgentProtocolError,
        AuthenticationError,
        ConfigError,
        DaemonUnavailableError,
        PolicyError,
        RateLimitError,
        RuntimeUnavailableError,
        SandboxClosedError,
        SandboxError,
        SandboxStartError,
        StockadeError,
    )
    from .policy import Mount, Policy
    from .result import CellException, CellOutput, ExecResult, ResourceUsage, SecurityViolation
    from .runtimes.manager import RuntimeManager
    from .sdk import Interpreter, Sandbox, run, run_code, warm_up
    from .sdk_async import AsyncSandbox, arun, arun_code
    from .watch import FileEvent, FileWatch


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'stockade' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
