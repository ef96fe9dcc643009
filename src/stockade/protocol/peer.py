"""Who is at the other end of a Unix socket (SO_PEERCRED): the daemon's and the broker's first check."""

from __future__ import annotations

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
