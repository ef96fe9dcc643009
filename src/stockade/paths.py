"""Default places, decided without pydantic (the lean command line asks for the socket's)."""

from __future__ import annotations

import os

DEFAULT_GUEST_PYTHON = "/usr/bin/python3"  # STOCKADE_GUEST_PYTHON's default: the isolates' interpreter


def default_socket_path() -> str:
    if os.getuid() == 0:
        return "/run/stockade/stockade.sock"
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/stockade-{os.getuid()}"
    return os.path.join(runtime_dir, "stockade.sock")


def default_config_dir() -> str:
    """Where ``isolation_config.json`` is looked up (``STOCKADE_CONFIG_DIR`` overrides it)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "stockade")


def default_state_dir() -> str:
    if os.getuid() == 0:
        return "/var/lib/stockade"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "stockade")
