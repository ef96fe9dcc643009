"""The public surface is exactly ``__all__``, and every name in it resolves."""

from __future__ import annotations

import subprocess
import sys

import stockade


def test_all_names_resolve() -> None:
    for name in stockade.__all__:
        assert getattr(stockade, name) is not None, name


def test_public_surface_is_stable() -> None:
    assert set(stockade.__all__) == {
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
    }


def test_errors_subclass_the_fitting_stdlib_types() -> None:
    assert issubclass(stockade.PolicyError, ValueError)
    assert issubclass(stockade.DaemonUnavailableError, ConnectionError)
    assert issubclass(stockade.AuthenticationError, PermissionError)
    for name in stockade.__all__:
        obj = getattr(stockade, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, stockade.StockadeError)


def test_import_is_lazy() -> None:
    # `import stockade` (and so the CLI's start) must not pull pydantic or the runtimes in.
    code = (
        "import sys, stockade, stockade.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith(('pydantic', 'stockade.runtimes'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
