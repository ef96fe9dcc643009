"""The egress proxy in-process (a Gate, its proxy, real sockets on loopback): how it names a host
and what it records of a tunnel to a host a secret is bound to.

Found by an attacker's review: another spelling of a bound IPv6 address was a host no secret is
bound to (its tunnel relayed untouched, its replies passed on unredacted); an upstream with a bad
certificate was recorded as the code's refused request (a violation, ending a run that kills on
one); and a tunnel to a bound host whose TLS with the isolate never began left no record at all.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from stockade import Policy
from stockade.egress.gate import Gate
from stockade.egress.proxy import proxy
from stockade.result import EgressRequest

VALUE = "sk-live-secretvalue-1234567890"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def leaky_upstream() -> Iterator[tuple[str, int]]:
    """A host that answers whatever it is sent, TLS or not, with the secret's value in plain text."""
    family, address = (socket.AF_INET6, "::1") if _has_ipv6_loopback() else (socket.AF_INET, "127.0.0.1")
    server = socket.socket(family)
    server.bind((address, 0))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(65536)
                    body = f"leaked {VALUE}\n".encode()
                    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
                    conn.sendall(head + body)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield address, server.getsockname()[1]
    server.shutdown(socket.SHUT_RDWR)  # wakes its accept()
    server.close()
    thread.join(10)


Proxied = tuple[Gate, tuple[str, int], list[EgressRequest]]


@pytest.fixture
def proxied(leaky_upstream: tuple[str, int]) -> Iterator[Callable[[], Proxied]]:
    stops: list[Callable[[], None]] = []

    def start() -> Proxied:
        address, port = leaky_upstream
        rule = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
        policy = Policy(network_policy="allowlist", allowed_hosts=[rule], secrets=[{"name": "KEY", "hosts": [rule]}])
        refused: list[EgressRequest] = []
        gate = Gate(policy, {"KEY": VALUE}, on_refused=refused.append)
        listener = socket.create_server(("127.0.0.1", 0))
        stops.append(proxy().serve(gate, listener))
        return gate, listener.getsockname(), refused

    yield start
    for stop in stops:
        stop()


def _exchange(proxy_address: tuple[str, int], *sends: bytes) -> bytes:
    with socket.create_connection(proxy_address, timeout=10) as conn:
        said = b""
        for data in sends:
            conn.sendall(data)
            if data.startswith(b"CONNECT"):
                while b"\r\n\r\n" not in said:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return said
                    said += chunk
        conn.shutdown(socket.SHUT_WR)
        try:
            while chunk := conn.recv(65536):
                said += chunk
        except OSError:
            pass
    return said


def _records(gate: Gate, count: int) -> list[EgressRequest]:
    """The gate's records once there are ``count`` (the proxy may record a failure just after the
    isolate's side saw its connection end)."""
    records: list[EgressRequest] = []
    deadline = time.monotonic() + 30
    while len(records) < count and time.monotonic() < deadline:
        records += gate.take_records()[0]
        time.sleep(0.01)
    return records


def _body(reply: bytes) -> bytes:
    """A chunked reply's body, its chunks joined (the redactor's handle may span two)."""
    _, _, rest = reply.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        if length == 0:
            break
        body, rest = body + rest[:length], rest[length + 2 :]
    return body


def _spellings(address: str) -> list[str]:
    if ":" in address:
        return ["[::1]", "[0:0:0:0:0:0:0:1]", "[0::1]", "[::0:1]"]
    return [address]


def test_every_spelling_of_a_bound_address_is_the_bound_host(
    proxied: Callable[[], Proxied], leaky_upstream: tuple[str, int]
) -> None:
    address, port = leaky_upstream
    if ":" not in address:
        pytest.skip("this host has no IPv6 loopback to listen on: an IPv6 address has only one spelling to try")
    gate, at, refused = proxied()
    for spelling in _spellings(address):
        # A tunnel to a bound host is TLS with the proxy: plain bytes inside it reach no upstream.
        tunnel = _exchange(at, f"CONNECT {spelling}:{port} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
                           b"GET / HTTP/1.1\r\nHost: whatever\r\n\r\n")  # fmt: skip
        assert VALUE.encode() not in tunnel, (spelling, tunnel)
        # Plain HTTP to it comes back with the handle where the value was.
        plain = _exchange(at, f"GET http://{spelling}:{port}/ HTTP/1.1\r\nHost: {spelling}\r\n\r\n".encode())
        assert VALUE.encode() not in plain and gate.env()["KEY"].encode() in _body(plain), (spelling, plain)
    records = _records(gate, 2 * len(_spellings(address)))
    assert len(records) == 8 and {r.host for r in records} == {"::1"}, records
    assert refused == []


def test_an_upstream_that_fails_tls_is_a_failure_not_the_codes_violation(
    proxied: Callable[[], Proxied], leaky_upstream: tuple[str, int]
) -> None:
    address, port = leaky_upstream
    gate, at, refused = proxied()
    assert gate.ca is not None
    host = address
    with socket.create_connection(at, timeout=10) as conn:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        conn.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert conn.recv(4096).startswith(b"HTTP/1.1 200")
        context = ssl.create_default_context(cadata=gate.ca.pem.decode())
        with context.wrap_socket(conn, server_hostname=host) as tls:
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 502") and b"upstream TLS failed" in reply, reply
    records = _records(gate, 1)
    assert [(r.method, r.allowed) for r in records] == [("CONNECT", True)], records
    assert records[0].reason.startswith("upstream TLS failed"), records
    assert refused == []  # no violation of the code's


def test_a_tunnel_to_a_bound_host_is_recorded_however_it_ends(
    proxied: Callable[[], Proxied], leaky_upstream: tuple[str, int]
) -> None:
    address, port = leaky_upstream
    gate, at, refused = proxied()
    target = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    connect = f"CONNECT {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    _exchange(at, connect + b"\x16\x03\x01 sent before the tunnel was open")  # no wait for the 200
    _exchange(at, connect, b"not a TLS client hello\r\n\r\n")  # TLS with the proxy never begins
    records = _records(gate, 2)
    reasons = sorted(r.reason for r in records)
    assert len(records) == 2 and all(r.allowed and r.method == "CONNECT" for r in records), records
    assert reasons[0].startswith("TLS with the isolate failed") and "before the tunnel was open" in reasons[1], reasons
    assert refused == []


def test_a_value_in_a_reply_headers_name_is_refused_whatever_its_case() -> None:
    # h11 hands a reply's header names lowercased: a value with a capital in it, lowercased, was
    # not found there, and reached the isolate as the header's name.
    value = "sk-MixedCase-Secret-42"
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for i in range(2):
            try:
                conn, _address = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                name = value if i == 0 else value.upper()
                conn.sendall(
                    f"HTTP/1.1 200 OK\r\nX-{name}: 1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode()
                )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    port = server.getsockname()[1]
    rule = f"127.0.0.1:{port}"
    policy = Policy(network_policy="allowlist", allowed_hosts=[rule], secrets=[{"name": "KEY", "hosts": [rule]}])
    gate = Gate(policy, {"KEY": value})
    listener = socket.create_server(("127.0.0.1", 0))
    stop = proxy().serve(gate, listener)
    try:
        for _ in range(2):  # as the host wrote it; all in capitals
            reply = _exchange(listener.getsockname(), f"GET http://{rule}/ HTTP/1.1\r\nHost: {rule}\r\n\r\n".encode())
            assert reply.startswith(b"HTTP/1.1 502 ") and b"in a header's name" in reply, reply
            assert value.lower().encode() not in reply.lower(), reply
    finally:
        stop()
        server.close()
        thread.join(10)
