"""Connections that never ask anything cannot hold the HTTP API, nor the daemon's descriptors.

Before, uvicorn waited for a connection's request head for ever, and its concurrency limit only
answered requests that had come: 1,100 idle connections (no byte sent, so no token checked) made
every client's request a 503, and ~20,000 used up the daemon's descriptors, its Unix socket
included.
"""

from __future__ import annotations

import http.client
import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from stockade.client import Client
from stockade.ratelimit import peer_network
from stockade.server.connections import MAX_PER_PEER
from tests.daemon_harness import Daemon, start_daemon

HEADER_TIMEOUT_S = 2


@pytest.fixture
def daemon(process_runtime: str) -> Iterator[Daemon]:
    started = start_daemon(http="127.0.0.1:0", env={"STOCKADE_HTTP_HEADER_TIMEOUT": str(HEADER_TIMEOUT_S)})
    yield started
    assert started.stop() == 0, started.logs()


def _address(daemon: Daemon) -> tuple[str, int]:
    assert daemon.http_url is not None
    host, port = daemon.http_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _connect(address: tuple[str, int], source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(address, timeout=10, source_address=(source, 0))
    return sock


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def _closed_now(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_connection_that_sends_no_request_head_is_closed_after_the_header_timeout(daemon: Daemon) -> None:
    address = _address(daemon)
    idle = _connect(address)
    partial = _connect(address)
    partial.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a head never finished
    started = time.monotonic()
    try:
        assert _closed_by_server(idle, HEADER_TIMEOUT_S + 10) and _closed_by_server(partial, 10)
        assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.5
    finally:
        idle.close()
        partial.close()
    # A kept-alive connection gets the same time for its next head, and is served meanwhile.
    kept = http.client.HTTPConnection(*address, timeout=30)
    try:
        for _ in range(2):
            kept.request("GET", "/health")
            answer = kept.getresponse()
            assert answer.status == 200 and answer.read()
        assert kept.sock is not None and _closed_by_server(kept.sock, HEADER_TIMEOUT_S + 10)
    finally:
        kept.close()


def test_idle_connections_from_one_network_neither_lock_others_out_nor_use_up_descriptors(daemon: Daemon) -> None:
    address = _address(daemon)
    before = _fds(daemon.proc.pid)
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_PER_PEER + 200):
            held.append(_connect(address))
        time.sleep(0.5)
        # Those past the cap were closed at once, unheard; the rest stay until the header timeout.
        closed = sum(_closed_now(s) for s in held)
        assert closed == 200, closed
        assert _fds(daemon.proc.pid) <= before + MAX_PER_PEER + 10
        # A client of another network is served meanwhile (the attacker's /24 is full, not the server),
        with httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.1.1"), timeout=30) as other:
            assert other.get(f"{daemon.http_url}/health").status_code == 200
        # and so is the Unix socket.
        with Client(daemon.socket_path) as rpc:
            assert rpc.execute(code="print(1)").stdout == "1\n"
    finally:
        for sock in held:
            sock.close()
    assert f"closed 1 connection(s) unheard ({MAX_PER_PEER} connections open from 127.0.0.0/24)" in daemon.logs()


def test_clients_are_counted_by_network() -> None:
    assert peer_network("10.1.2.3") == peer_network("10.1.2.200") == "10.1.2.0/24"
    assert peer_network("10.1.3.3") != peer_network("10.1.2.3")
    assert peer_network("::ffff:10.1.2.9") == "10.1.2.0/24"
    assert peer_network("2001:db8:1:2::5") == peer_network("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert peer_network(None) == ""
