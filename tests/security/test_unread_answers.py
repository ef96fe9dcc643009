"""Answers a client asks for and never reads: the daemon holds a bounded amount of them.

A held sandbox's ``read_file`` answers up to 32 MiB at once, a run's up to ~25 MiB (7 MiB of
output that is not UTF-8, as text and as bytes). Connections that ask and never read would leave
each answer in the daemon's memory; many of them, from any local user who may use the daemon, or
HTTP clients, would take the host's memory. The daemon refuses further large answers "busy" while
what waits unread passes its budget, and new work of a caller whose unread answers fill its share
(daemon/answers.py); it serves them again once they have been read or their connections are gone.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from stockade.client import Client
from stockade.daemon.answers import OWNER_SHARE, answer_size
from stockade.errors import DaemonBusyError
from stockade.policy import MAX_OUTPUT_BYTES
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


# A run whose answer is as large as one can be: its output cut at the most a policy keeps, bytes
# that are not UTF-8 (as text with replacement characters, and again as base64).
BIG_RUN = {"command": ["sh", "-c", "head -c 8000000 /dev/urandom"], "policy": {"max_output_bytes": MAX_OUTPUT_BYTES}}
RUN_HOGS = 24  # the daemon's 8 slots and its queue of 16: all of them admitted at once


def _first_bytes(conns: list[socket.socket]) -> list[bytes]:
    said = []
    for conn in conns:  # the first bytes of what each got, the rest left unread
        conn.settimeout(120)
        said.append(conn.recv(200))
    return said


def test_run_answers_nobody_reads_stop_their_callers_new_work(process_runtime: str) -> None:
    # Its queue waits long: on a loaded machine 8 cold isolates and their answers take their time.
    daemon = start_daemon(env={"STOCKADE_QUEUE_TIMEOUT": "300"})
    hogs: list[socket.socket] = []
    try:
        for _ in range(RUN_HOGS):
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            conn.connect(daemon.socket_path)
            conn.sendall(json.dumps({"method": "execute", "params": BIG_RUN, "id": 1}).encode() + b"\n")
            hogs.append(conn)
        said = _first_bytes(hogs)
        answered = [s for s in said if s.startswith(b'{"result": {"execution_id"')]
        refused = [s for s in said if b"read those answers first" in s]
        assert len(answered) + len(refused) == RUN_HOGS, said
        # A queued run starts only while its caller's unread answers are under its share: the 8
        # running at once, and those that started before the share filled (~25 MiB each).
        assert 8 <= len(answered) <= 8 + OWNER_SHARE // (24 << 20) + 1, said
        with Client(daemon.socket_path, timeout=60) as client:
            with pytest.raises(DaemonBusyError, match=r"for uid 0 that have not been read yet .*: read those answers"):
                client.execute(code="print(1)")
            assert client.status()["max_sandboxes"] == 8  # a control or status call is still taken
        for conn in hogs:
            conn.close()
        deadline = time.monotonic() + 30
        with Client(daemon.socket_path, timeout=60) as client:
            while True:  # their connections gone, their answers with them
                try:
                    assert client.execute(code="print(1)").stdout == "1\n"
                    break
                except DaemonBusyError:
                    assert time.monotonic() < deadline, "the unread answers' room never came back"
                    time.sleep(0.2)
    finally:
        for conn in hogs:
            conn.close()
        assert daemon.stop() == 0, daemon.logs()


def test_http_answers_nobody_reads_stop_new_http_work(process_runtime: str) -> None:
    # Its clients' connections are not dropped for their stall while the test lasts (below).
    d = start_daemon(http="127.0.0.1:0", env={"STOCKADE_HTTP_STALL_TIMEOUT": "600"})
    assert d.http_url is not None
    host, port = d.http_url.split("//", 1)[1].rsplit(":", 1)
    hogs: list[socket.socket] = []
    try:
        with httpx.Client(base_url=d.http_url, timeout=60) as http:
            policy = {"max_output_bytes": MAX_OUTPUT_BYTES}
            sandboxes = [http.post("/api/v1/sandboxes", json={"policy": policy}).json()["sandbox_id"] for _ in range(6)]
            body = json.dumps({"command": BIG_RUN["command"]}).encode()
            for sid in sandboxes:  # ~25 MiB each, unread: more than the HTTP API's share
                conn = socket.create_connection((host, int(port)))
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                head = f"POST /api/v1/sandboxes/{sid}/exec HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                conn.sendall(head.encode() + body)
                hogs.append(conn)
            deadline = time.monotonic() + 120
            work = {"agent_id": "a", "command": ["true"]}
            while (refused := http.post("/api/v1/sandbox/execute", json=work)).status_code == 200:
                assert time.monotonic() < deadline, "new HTTP work was still taken"
                time.sleep(0.1)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "for http that have not been read yet" in refused.json()["error"], refused.text
            # Control and status calls are still taken: the caller can look, and close what it holds.
            assert http.get("/api/v1/sandbox/status").status_code == 200
            assert http.get(f"/api/v1/sandboxes/{sandboxes[0]}").status_code == 200
            assert all(s.startswith(b"HTTP/1.1 200") for s in _first_bytes(hogs))  # made, and waiting
            for conn in hogs:
                conn.close()
            hogs = []
            deadline = time.monotonic() + 30
            while http.post("/api/v1/sandbox/execute", json=work).status_code != 200:  # their answers gone
                assert time.monotonic() < deadline, "the unread answers' room never came back"
                time.sleep(0.2)
    finally:
        for conn in hogs:
            conn.close()
        assert d.stop() == 0, d.logs()


def test_an_http_client_that_stops_reading_is_dropped_with_its_answer(process_runtime: str) -> None:
    # Without it, one client that asks and never reads (hung, or gone without a word) holds its
    # answer, and the HTTP API's share of unread answers, for as long as its connection is open.
    d = start_daemon(http="127.0.0.1:0", env={"STOCKADE_HTTP_STALL_TIMEOUT": "2"})
    assert d.http_url is not None
    host, port = d.http_url.split("//", 1)[1].rsplit(":", 1)
    try:
        with httpx.Client(base_url=d.http_url, timeout=60) as http:
            policy = {"max_output_bytes": MAX_OUTPUT_BYTES}
            sid = http.post("/api/v1/sandboxes", json={"policy": policy}).json()["sandbox_id"]
            body = json.dumps({"command": BIG_RUN["command"]}).encode()
            conn = socket.create_connection((host, int(port)))
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            head = f"POST /api/v1/sandboxes/{sid}/exec HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            conn.sendall(head.encode() + body)
            with conn:
                conn.settimeout(120)
                assert conn.recv(12, socket.MSG_PEEK) == b"HTTP/1.1 200"  # made; none of it taken
                time.sleep(8)  # past the stall timeout, and the kernel's next probe of the closed window
                got, ended = 0, None
                conn.settimeout(30)
                try:
                    while piece := conn.recv(1 << 20):
                        got += len(piece)
                        if got >= 1 << 20:
                            break  # it is still sending
                    else:
                        ended = "closed"
                except ConnectionResetError:
                    ended = "reset"
                except TimeoutError:
                    ended = "still open"
                # The daemon dropped the connection: what was in flight, not the ~25 MiB answer.
                assert ended in ("closed", "reset") and got < 1 << 20, (ended, got)
            assert http.post("/api/v1/sandbox/execute", json={"agent_id": "a", "command": ["true"]}).status_code == 200
    finally:
        assert d.stop() == 0, d.logs()
