"""The client's socket time limits (daemon_peer.timeval)."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from stockade.daemon_peer import connect, timeval

TIMEVAL = struct.Struct("@ll")


def test_a_timeout_is_seconds_and_microseconds() -> None:
    assert TIMEVAL.unpack(timeval(2.25)) == (2, 250_000)


def test_a_zero_timeout_is_never_no_limit() -> None:
    # To the kernel an all-zero SO_SNDTIMEO means "wait forever": the opposite of what 0 asks.
    assert TIMEVAL.unpack(timeval(0.0)) == (0, 1)


def test_connect_sets_the_send_limit_it_was_given(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            connect(sock, path, 0.0)
            assert sock.gettimeout() is None  # blocking, bounded by the kernel
            sent = TIMEVAL.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, TIMEVAL.size))
            assert sent != (0, 0)
