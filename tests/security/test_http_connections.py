"""Connections that never ask anything cannot hold the HTTP API, nor the daemon's descriptors.

Before, uvicorn waited for a connection's request head for ever, and its concurrency limit only
answered requests that had come: 1,100 idle connections (no byte sent, so no token checked) made
every client's request a 503, and ~20,000 used up the daemon's descriptors, its Unix socket
included.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from stockade.client import Client
from stockade.ratelimit import peer_network
from stockade.server.connections import MAX_PER_NETWORK
from tests.daemon_harness import Daemon, start_daemon

HEADER_TIMEOUT_S = 2


@pytest.fixture
def daemon(process_runtime: str, request: pytest.FixtureRequest) -> Iterator[Daemon]:
    # A test that holds connections while it checks them wants them held longer than the rest.
    timeout = getattr(request, "param", HEADER_TIMEOUT_S)
    started = start_daemon(http="127.0.0.1:0", env={"STOCKADE_HTTP_HEADER_TIMEOUT": str(timeout)})
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


def _answer(sock: socket.socket) -> bytes:
    """One whole answer read from ``sock``: its head and the body its Content-Length says."""
    said = b""
    while b"\r\n\r\n" not in said:
        more = sock.recv(65536)
        if not more:
            return said
        said += more
    head, _, body = said.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    length = int(lengths[0]) if lengths else 0
    while len(body) < length and (more := sock.recv(65536)):
        body += more
    return head + b"\r\n\r\n" + body


def _refused_now(sock: socket.socket) -> bool:
    """Whether the server has answered ``sock`` 503 as it opened (read without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(64, socket.MSG_PEEK).startswith(b"HTTP/1.1 503 Service Unavailable")
    except BlockingIOError:
        return False


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
    # A kept-alive connection gets the same time for its next head, and is served meanwhile. (A
    # part of a head cancels uvicorn's own keep-alive timer: only the header timeout closes it.)
    kept = http.client.HTTPConnection(*address, timeout=30)
    try:
        for _ in range(2):
            kept.request("GET", "/health")
            answer = kept.getresponse()
            assert answer.status == 200 and answer.read()
        assert kept.sock is not None
        kept.sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        assert _closed_by_server(kept.sock, HEADER_TIMEOUT_S + 10)
    finally:
        kept.close()


def test_a_body_that_never_comes_holds_nothing(daemon: Daemon) -> None:
    """Found by review: a whole head and then no body held a connection for ever, an open route's
    (no token) included: the head timeout ends at the head."""
    address = _address(daemon)
    stalled = _connect(address)  # an open route takes no body: refused before any is awaited
    try:
        stalled.sendall(b"POST /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\n")
        stalled.settimeout(10)
        assert stalled.recv(65536).startswith(b"HTTP/1.1 422"), "answered at once"
    finally:
        stalled.close()
    slow = _connect(address)  # a route that takes one: it must come in time
    try:
        slow.sendall(b"POST /api/v1/sandboxes HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 10\r\n\r\n{")  # fmt: skip
        started = time.monotonic()
        slow.settimeout(HEADER_TIMEOUT_S + 20)
        said = _answer(slow)
        assert said.startswith(b"HTTP/1.1 422") and b"did not arrive within" in said, said
        assert time.monotonic() - started >= HEADER_TIMEOUT_S - 0.5
    finally:
        slow.close()


@pytest.mark.parametrize("daemon", [60], indirect=True)
def test_idle_connections_from_one_network_neither_lock_others_out_nor_use_up_descriptors(daemon: Daemon) -> None:
    address = _address(daemon)
    before = _fds(daemon.proc.pid)
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_PER_NETWORK + 200):
            held.append(_connect(address))
        # Those past the cap are answered 503 at once, unheard; the rest stay until the header timeout.
        deadline = time.monotonic() + 20
        while (refused := sum(_refused_now(s) for s in held)) < 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert refused == 200 and not any(_refused_now(s) for s in held[:MAX_PER_NETWORK]), refused
        assert _fds(daemon.proc.pid) <= before + MAX_PER_NETWORK + 10
        # Another address of the loopback is the same network (any local user may send from any of
        # 127.0.0.0/8: counted by /24, 1,026 connections from nine of them took every slot there is),
        assert not _refused_now(held[0])
        other = _connect(address, source="127.0.1.1")
        try:
            assert _answer(other).startswith(b"HTTP/1.1 503 ")
        finally:
            other.close()
        # and the Unix socket is served meanwhile.
        with Client(daemon.socket_path) as rpc:
            assert rpc.execute(code="print(1)").stdout == "1\n"
    finally:
        for sock in held:
            sock.close()
    assert f"closed 1 connection(s) unheard ({MAX_PER_NETWORK} connections open from loopback)" in daemon.logs()


def test_the_cap_per_network_is_a_setting(process_runtime: str) -> None:
    started = start_daemon(http="127.0.0.1:0", env={"STOCKADE_HTTP_MAX_PER_NETWORK": "3"})
    try:
        held = [_connect(_address(started)) for _ in range(5)]
        deadline = time.monotonic() + 20
        while sum(_refused_now(s) for s in held) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [_refused_now(s) for s in held] == [False, False, False, True, True]
        for sock in held:
            sock.close()
    finally:
        assert started.stop() == 0, started.logs()


def test_clients_are_counted_by_network() -> None:
    assert peer_network("10.1.2.3") == peer_network("10.1.2.200") == "10.1.2.0/24"
    assert peer_network("10.1.3.3") != peer_network("10.1.2.3")
    assert peer_network("::ffff:10.1.2.9") == "10.1.2.0/24"
    assert peer_network("2001:db8:1:2::5") == peer_network("2001:db8:1:2:ffff::1") == "2001:db8:1:2::/64"
    assert peer_network(None) == ""
    assert peer_network("127.0.0.1") == peer_network("127.9.8.7") == peer_network("::1") == "loopback"


def test_upgrade_requests_leave_no_connection_counted_behind(process_runtime: str) -> None:
    """A WebSocket upgrade was handed to uvicorn's WebSocket protocol, which dropped the HTTP one
    without its end: its connection stayed counted, and 128 such requests shut the client's
    network out until a restart. There is no WebSocket here: each is refused, as a request
    asking for any other protocol is (422: its body would not reach the route, a file written empty)."""
    started = start_daemon(http="127.0.0.1:0", env={"STOCKADE_HTTP_MAX_PER_NETWORK": "3"})
    try:
        upgrade = (b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
        for _ in range(8):
            sock = _connect(_address(started))
            sock.sendall(upgrade)
            answer = _answer(sock)
            assert answer.startswith(b"HTTP/1.1 422 ") and b"no upgrade" in answer, answer  # nor busy (503)
            sock.close()
        deadline = time.monotonic() + 10  # the server sees each close: a few ms, on a loaded host longer
        while (status := httpx.get(f"{started.http_url}/health", timeout=30).status_code) != 200:
            assert time.monotonic() < deadline, f"/health still answered {status}: connections counted behind"
            time.sleep(0.1)
        assert "Unsupported upgrade" not in started.logs()
    finally:
        assert started.stop() == 0, started.logs()


def test_a_request_head_is_held_to_64_kib(daemon: Daemon) -> None:
    """httptools gathers a header whole before handing it on and uvicorn keeps every one: a head of
    24 MiB of short headers took 400 MiB of the daemon's memory, four at once 1.5 GiB."""
    many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 20_000
    one = b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"b" * (1 << 20)
    for head in (many, one):
        sock = _connect(_address(daemon))
        try:
            with contextlib.suppress(OSError):  # the server may close before all of it is sent
                sock.sendall(head)
            said = _answer(sock)
            assert said.startswith(b"HTTP/1.1 431 "), head[:40]
            assert json.loads(said.partition(b"\r\n\r\n")[2])["code"] == "too_large", said  # whole, in the table
        finally:
            sock.close()
    # A request just under the cap with the next one pipelined behind it, in one read: two heads,
    # each under the cap (counted as one from where the last read ended, the second was refused).
    sock = _connect(_address(daemon))
    try:
        first = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 64_000 + b"\r\n\r\n"
        second = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"b" * 4_000 + b"\r\n\r\n"
        sock.sendall(first + second)
        said = b""
        while said.count(b"HTTP/1.1 ") < 2 and (more := sock.recv(65536)):  # both answers, in any reads
            said += more
        assert [said.count(b"HTTP/1.1 200 "), said.count(b"HTTP/1.1 ")] == [2, 2], said[:200]
    finally:
        sock.close()
    # A large body after a head, in the same reads, is a body: not counted as the head.
    sock = _connect(_address(daemon))
    try:
        body = b"x" * (256 << 10)
        sock.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        assert not _answer(sock).startswith(b"HTTP/1.1 431 ")
    finally:
        sock.close()


def test_the_bodies_a_network_holds_at_once_are_bounded(daemon: Daemon) -> None:
    """Each body is read whole before its route runs, up to 16 MiB, over up to 266 s: 32
    connections each holding a body just under the cap took half a GiB of the daemon's memory."""
    address = _address(daemon)
    put = b"PUT /api/v1/sandboxes/none/files?path=/work/f HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n"
    held: list[socket.socket] = []
    try:
        for _ in range(8):  # 124 MiB of the loopback's 128 MiB, waiting for the rest of each body
            sock = _connect(address)
            sock.sendall(put % (16 << 20) + b"x" * (31 << 19))
            held.append(sock)
        extra = _connect(address)
        held.append(extra)
        with contextlib.suppress(OSError):  # refused as its bytes come: the server may close before all are sent
            extra.sendall(put % (8 << 20) + b"x" * (8 << 20))
        said = _answer(extra)
        assert said.startswith(b"HTTP/1.1 503 ") and b'"busy"' in said and b"bodies being read" in said, said[:300]
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 30  # given back once the server has seen those connections end
    while True:
        sock = _connect(address)
        try:
            sock.sendall(put % (1 << 20) + b"x" * (1 << 20))
            said = _answer(sock)
        finally:
            sock.close()
        if not said.startswith(b"HTTP/1.1 503 ") or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert said.startswith(b"HTTP/1.1 404 "), said[:300]  # read whole, then routed: no such sandbox


def test_a_client_that_hangs_up_mid_body_is_a_hang_up_not_an_internal_error(daemon: Daemon) -> None:
    """The route read the rest and failed: a 500 in the metrics, an ERROR and its traceback in the
    log, and there the request's path, decoded, whose newlines wrote lines of the attacker's own."""
    forged = "x%0A2026-12-07%2008:00:00,000%20stockade%20WARNING%20audit%20log%20disabled"
    for method, path in (
        ("PUT", f"/api/v1/sandboxes/{forged}/files?path=/work/b"),
        ("POST", "/api/v1/sandbox/execute"),
    ):
        sock = _connect(_address(daemon))
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n0123456789".encode())
        sock.close()
    with httpx.Client(base_url=daemon.http_url or "", timeout=30) as http:
        deadline = time.monotonic() + 30
        while 'code="hung_up"' not in (metrics := http.get("/metrics").text) and time.monotonic() < deadline:
            time.sleep(0.1)
    counted = [line for line in metrics.splitlines() if line.startswith("stockade_requests_total{")]
    assert any('code="hung_up"' in line for line in counted), counted
    assert not any('code="internal"' in line or 'code="invalid_request"' in line for line in counted), counted
    logs = daemon.logs()
    assert "internal error" not in logs and "audit log disabled" not in logs, logs[-2000:]
