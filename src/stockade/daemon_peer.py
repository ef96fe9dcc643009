"""A client's side of the daemon's socket: how it connects, and who may answer as the daemon.

A connect waits for room in the daemon's listen backlog (``connect``): a non-blocking one
fails at once while the backlog is full, which anyone who may connect can keep it, and the
command line took that failure for "no daemon" and ran the command in-process, outside the
daemon's limits and audit log.

A client sends the daemon code, file contents and signed requests. A socket path
is only a name: a daemon that is down leaves it to whoever can write its
directory (a ``--socket`` under /tmp, a directory shared with a group), and a
listener put there would get everything, its answers taken as the daemon's. So
each client connection asks the kernel who listens (``SO_PEERCRED``: the
credentials of the process that called ``listen``) and sends nothing to a
process that runs as nobody a daemon runs as: root, the client's own user (a
rootless daemon), or the daemon's user (``STOCKADE_DAEMON_USER``, else
``stockade`` where that account exists).

Imports nothing of stockade's: the lean command line (cli_daemon.py) uses it.
"""

from __future__ import annotations

import _socket
import errno
import os
import pwd
import struct

_UCRED = struct.Struct("3i")  # pid, uid, gid
_TIMEVAL = struct.Struct("@ll")  # struct timeval, for SO_RCVTIMEO / SO_SNDTIMEO
DEFAULT_DAEMON_USER = "stockade"  # daemon/privileges.py AUTO_USER
_known: dict[str | None, frozenset[int]] = {}  # (not functools.cache: the lean command line imports this)


def daemon_uids(daemon_user: str | None) -> frozenset[int]:
    """The uids a daemon may run as, for a client of this user with ``daemon_user`` set (or not)."""
    known = _known.get(daemon_user)
    if known is not None:
        return known
    uids = {0, os.geteuid()}
    for name in (daemon_user, DEFAULT_DAEMON_USER):
        if not name or name == "root":
            continue
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            if name.isdigit():
                uids.add(int(name))
    known = _known[daemon_user] = frozenset(uids)
    return known


def timeval(timeout: float) -> bytes:
    """``timeout`` seconds as a struct timeval for SO_RCVTIMEO / SO_SNDTIMEO; never all zero,
    which to the kernel means no limit at all."""
    seconds = int(timeout)
    return _TIMEVAL.pack(seconds, max(1 if seconds == 0 else 0, int((timeout - seconds) * 1e6)))


def connect(sock: _socket.socket, path: str, timeout: float) -> None:
    """Connect ``sock`` to the daemon's socket at ``path``, blocking: a full backlog is waited
    for (the kernel bounds the wait by SO_SNDTIMEO: ``timeout``; past it, ``BlockingIOError``).
    The socket is left blocking with SO_SNDTIMEO set; OSError as ``connect`` raises it."""
    sock.settimeout(None)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, timeval(timeout))
    sock.connect(path)
    try:
        sock.getpeername()
    except OSError as exc:  # a connect cut short by a signal is "done" to Python, and not connected
        raise OSError(errno.EAGAIN, "the daemon did not take the connection (interrupted)") from exc


def credentials(sock: _socket.socket) -> tuple[int, int, int]:
    """The pid, uid and gid of ``sock``'s peer as the kernel recorded them (at its connect, or its
    listen); OSError if unreadable. The daemon's and the broker's first check too (protocol/peer.py)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, _UCRED.size))
    if pid == 0 and uid == -1:  # what the kernel says of a socket with no peer: none to name
        raise OSError(errno.ENOTCONN, "not connected")
    return pid, uid, gid


def impostor(sock: _socket.socket, path: str, daemon_user: str | None) -> str | None:
    """Why the listener at the other end of ``sock`` (connected to ``path``) is no daemon to talk
    to; None when it runs as one of ``daemon_uids``."""
    pid, uid, _gid = credentials(sock)
    if uid in daemon_uids(daemon_user):
        return None
    return (
        f"the process listening on {path} (pid {pid}) runs as uid {uid}, not as root, this user or the daemon's "
        "(STOCKADE_DAEMON_USER): no daemon of stockade's, so nothing was sent to it"
    )
