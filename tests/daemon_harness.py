"""A real daemon in a subprocess, on a temporary socket, for the daemon tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

TOKEN = "f" * 16 + "0123456789abcdef" * 3
STARTED: list[Daemon] = []  # every daemon a test started; tests/conftest.py cleans them up


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    socket_path: str
    log: IO[bytes]
    http_url: str | None = None  # with start_daemon(http=...): where its HTTP API listens

    @property
    def audit_log(self) -> str:
        return os.path.join(os.path.dirname(self.socket_path), "audit.log")

    def logs(self) -> str:
        self.log.flush()
        with open(self.log.name, "rb") as f:
            return f.read().decode(errors="replace")

    def cleanup(self) -> None:
        """Kill the daemon if it still runs, and remove its socket directory and log."""
        if self.proc.poll() is None:
            self.stop(signal.SIGKILL)
        self.log.close()
        with contextlib.suppress(OSError):
            os.unlink(self.log.name)
        if os.path.basename(os.path.dirname(self.socket_path)).startswith("stockade-d-"):
            shutil.rmtree(os.path.dirname(self.socket_path), ignore_errors=True)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # It would not stop: SIGABRT has its faulthandler (PYTHONFAULTHANDLER) write every
            # thread's stack into its log, which the failing test shows.
            self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            self.proc.kill()
            return self.proc.wait()


def start_daemon(
    env: dict[str, str] | None = None,
    socket_path: str | None = None,
    wait: bool = True,
    http: str | None = None,
    args: tuple[str, ...] = (),
) -> Daemon:
    """A daemon on a temporary socket (its audit log beside it); with ``http`` (HOST:PORT,
    port 0 for any), its HTTP API too, at ``daemon.http_url`` once it listens."""
    if socket_path is None:
        socket_path = os.path.join(tempfile.mkdtemp(prefix="stockade-d-"), "d.sock")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    full_env.update(
        {
            "STOCKADE_SOCKET": socket_path,
            "PYTHONFAULTHANDLER": "1",  # see Daemon.stop
            "STOCKADE_POOL_SIZE": "1",
            "STOCKADE_DAEMON_USER": "root",  # every runtime; once setup-users has run, it would become stockade
            "STOCKADE_AUDIT_LOG": os.path.join(os.path.dirname(socket_path), "audit.log"),
            **(env or {}),
        }
    )
    log = tempfile.NamedTemporaryFile(prefix="stockade-daemon-", suffix=".log", delete=False)
    argv = [sys.executable, "-m", "stockade.cli", "serve", *(["--http", http] if http else []), *args]
    proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=log, start_new_session=True)
    daemon = Daemon(proc, socket_path, log)
    STARTED.append(daemon)
    if wait:
        wait_for_socket(daemon)
        if http:
            wait_for_http(daemon)
    return daemon


def wait_for_http(daemon: Daemon, timeout: float = 30) -> str:
    """The daemon's HTTP API address, read from its log line once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in daemon.logs().splitlines():
            if "HTTP API on " in line:
                daemon.http_url = line.split("HTTP API on ", 1)[1].split()[0]
                return daemon.http_url
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}: {daemon.logs()}")
        time.sleep(0.02)
    raise RuntimeError(f"daemon's HTTP API did not listen within {timeout} s: {daemon.logs()}")


def wait_for_socket(daemon: Daemon, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {daemon.proc.returncode}: {daemon.logs()}")
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(daemon.socket_path)
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"daemon did not listen within {timeout} s: {daemon.logs()}")


def raw_exchange(socket_path: str, *lines: bytes, timeout: float = 10) -> list[bytes]:
    """Send request lines on one connection; return one reply line per request."""
    replies = []
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        f = s.makefile("rb")
        for line in lines:
            s.sendall(line)
            replies.append(f.readline().rstrip(b"\n"))
    return replies


def execute_in_background(socket_path: str, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list[Any]]:
    """``Client.execute(*args, **kwargs)`` in a thread of its own; its result lands in the list."""
    from stockade.client import Client

    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(Client(socket_path).execute(*args, **kwargs)))
    thread.start()
    return thread, results


def running_execution(socket_path: str, ready: Callable[[], bool] = lambda: True, timeout: float = 10) -> str:
    """The execution_id of the one ``execute`` that ``status`` lists, once it shows (and ``ready()``)."""
    from stockade.client import Client

    deadline = time.monotonic() + timeout
    with Client(socket_path) as client:
        while time.monotonic() < deadline:
            running = [s for s in client.status()["active_sandboxes"] if s["kind"] == "execute"]
            if running and ready():
                assert len(running) == 1, running
                return str(running[0]["execution_id"])
            time.sleep(0.02)
    raise AssertionError(f"no execute showed in status within {timeout:g} s")
