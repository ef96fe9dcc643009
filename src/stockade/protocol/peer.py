"""Who is at the other end of a Unix socket (SO_PEERCRED): the daemon's and the broker's first check."""

from __future__ import annotations

import contextlib
import os
import select
import socket
from dataclasses import dataclass

from ..daemon_peer import credentials


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """The peer's pid, uid and gid as the kernel recorded them at connect; OSError if unreadable."""
    return Peer(*credentials(sock))


_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5: a pidfd of the peer as it connected


def in_my_user_namespace(sock: socket.socket, pid: int) -> bool:
    """Whether the peer on ``sock`` (``pid``, as SO_PEERCRED named it: 0 for one in a pid namespace
    this process cannot see) is in this process's user namespace; False when that cannot be told.

    Told by its uid map, which any process may read (its ``ns/user`` link only one that may trace
    it: not the broker's user, the daemon's). Read from here, a process in this namespace shows this
    namespace's own map; one in a namespace an unprivileged user made shows a map of that user's
    uid alone, which is not this one's (the whole range at the top; many uids in a container).
    The peer is held by a pidfd where the kernel gives one: a peer that handed its socket on and
    exited cannot lend its pid to a process of this namespace while the map is read."""
    pidfd: int | None = None
    with contextlib.suppress(OSError):  # before Linux 6.5: by its pid
        pidfd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    try:
        if pidfd is not None:
            pid = _pid_of(pidfd)
        if pid <= 0:
            return False
        with open(f"/proc/{pid}/uid_map", "rb") as theirs, open("/proc/self/uid_map", "rb") as mine:
            same = theirs.read() == mine.read()
        return same and (pidfd is None or not _exited(pidfd))  # the map read was its own
    except OSError:
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _pid_of(pidfd: int) -> int:
    """The pid a pidfd refers to, in this pid namespace (-1 once it has exited; 0 if not seen here)."""
    with open(f"/proc/self/fdinfo/{pidfd}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    return 0


def _exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)  # readable once its process has exited
    return bool(poller.poll(0))
