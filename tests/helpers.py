"""Small helpers shared by the test suites."""

from __future__ import annotations

import os


def processes_with_arg(marker: str) -> list[int]:
    """Pids of every process on the host whose command line contains ``marker``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


def write_executable(path: str, text: str) -> str:
    """A script at ``path`` (its directories made), mode 0755; returns the path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path
