"""The handshake of an isolate the zygote made: what it sends back on the host socket.

"P" and the isolate's pid (opened here as a pidfd), then "R" with its seccomp
listener and, under an egress allowlist, its egress sockets as descriptors; or
"E" and a frame naming what failed in setup. A handshake that does not finish
in ``HANDSHAKE_TIMEOUT_S`` ends the isolate.
"""

from __future__ import annotations

import os
import signal
import socket
import struct

from ...agent import wire
from ...errors import SandboxStartError

HANDSHAKE_TIMEOUT_S = 10.0


def receive_isolate(host: socket.socket) -> tuple[int, int, list[socket.socket]]:
    """The isolate's pidfd, its seccomp listener, and (network_policy allowlist) its egress sockets."""
    host.settimeout(HANDSHAKE_TIMEOUT_S)
    try:
        first = wire.recv_exact(host, 1)
        if first == b"E":
            raise SandboxStartError(_setup_error(host))
        if first != b"P":
            raise SandboxStartError("the isolate sent an unexpected handshake")
        (pid,) = struct.unpack("<I", wire.recv_exact(host, 4))
        pidfd = os.pidfd_open(pid)
        try:
            msg, fds, _flags, _addr = socket.recv_fds(host, 1, 3)
            if msg == b"E" or msg != b"R" or len(fds) not in (1, 3):
                for fd in fds:
                    os.close(fd)
                if msg == b"E":
                    raise SandboxStartError(_setup_error(host))
                raise SandboxStartError("the isolate died during setup")
        except BaseException:
            kill_pidfd(pidfd)
            os.close(pidfd)
            raise
        return pidfd, fds[0], [socket.socket(fileno=fd) for fd in fds[1:]]
    except TimeoutError:
        raise SandboxStartError(f"the isolate did not finish setup within {HANDSHAKE_TIMEOUT_S:g} s") from None
    except (EOFError, ProcessLookupError):
        raise SandboxStartError("the isolate died during setup") from None
    finally:
        host.settimeout(None)


def _setup_error(host: socket.socket) -> str:
    try:
        message = wire.decode_payload(wire.read_frame(host))
        return f"isolate setup failed: {message.get('error')}"
    except Exception:  # noqa: BLE001
        return "isolate setup failed (no detail)"


def pid_of(pidfd: int) -> int | None:
    """The pid a pidfd refers to (its fdinfo), None once that process is gone."""
    try:
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            for line in f:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    return pid if pid > 0 else None
    except (OSError, ValueError, IndexError):
        return None
    return None


def kill_pidfd(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
