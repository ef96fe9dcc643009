"""Who is at the other end of a Unix socket (SO_PEERCRED): the daemon's and the broker's first check."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    """The peer's pid, uid and gid as the kernel recorded them at connect; OSError if unreadable."""
    return Peer(*_PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)))
