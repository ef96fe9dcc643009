"""Answers a client asks for and never reads: the daemon holds a bounded amount of them.

A held sandbox's ``read_file`` answers up to 32 MiB at once. Connections that ask and never read
would leave each answer in the daemon's memory; many of them, from any local user who may use the
daemon, would take the host's memory. The daemon refuses further large answers "busy" while what
waits unread passes its budget (daemon/answers.py), and serves them again once it has been read or
its connections are gone.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from stockade.client import Client
from stockade.daemon.answers import OWNER_SHARE, answer_size
from stockade.errors import DaemonBusyError
from tests.daemon_harness import Daemon, start_daemon

FILE_MB = 32
HOGS = 4 * OWNER_SHARE // (FILE_MB << 20)  # 12 connections: a uid may open 64


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    d = start_daemon()
    yield d
    assert d.stop() == 0, d.logs()


def _ask_and_never_read(path: str, sandbox_id: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.connect(path)
    request = {"method": "sandbox.read_file", "params": {"sandbox_id": sandbox_id, "path": "/work/big"}, "id": 1}
    conn.sendall(json.dumps(request).encode() + b"\n")
    return conn


def test_answers_nobody_reads_are_bounded_and_served_again_once_gone(daemon: Daemon) -> None:
    policy = {"disk_mb": 128, "max_file_size_bytes": 1 << 27, "memory_mb": 512}
    with Client(daemon.socket_path, timeout=120) as client, client.sandbox(policy) as sb:
        assert sb.exec(["sh", "-c", f"head -c {FILE_MB << 20} /dev/urandom > /work/big"]).success
        hogs: list[socket.socket] = []
        try:
            # Four times as many unread answers as one caller may leave (one sandbox answers them in
            # turn, each written out before the next is made): the ones past it are refused.
            hogs = [_ask_and_never_read(daemon.socket_path, sb.sandbox_id) for _ in range(HOGS)]
            deadline = time.monotonic() + 60
            with pytest.raises(DaemonBusyError, match="have not been read yet"):
                while time.monotonic() < deadline:  # until the daemon has made theirs
                    assert len(sb.read_file("/work/big")) == FILE_MB << 20
            assert sb.read_file("/work/big", max_bytes=10) != b""  # a small answer still fits
            said = []
            for conn in hogs:  # the first bytes of what each got, the rest left unread
                conn.settimeout(60)
                said.append(conn.recv(200))
            answered = [s for s in said if s.startswith(b'{"result": {"path"')]
            refused = [s for s in said if b"have not been read yet" in s]
            # At most one caller's share was made (unbounded: HOGS * 43 MiB).
            assert len(answered) + len(refused) == HOGS, said
            assert 0 < len(answered) <= OWNER_SHARE // answer_size(FILE_MB << 20) + 1, said
        finally:
            for conn in hogs:
                conn.close()
        deadline = time.monotonic() + 30
        while True:  # their connections gone, their answers with them
            try:
                assert len(sb.read_file("/work/big")) == FILE_MB << 20
                break
            except DaemonBusyError:
                assert time.monotonic() < deadline, "the unread answers' room never came back"
                time.sleep(0.2)
