"""No fronting through the egress proxy: a tunnel's TLS must name the tunnel's host, plain HTTP
inside a tunnel is refused, and a plain request's Host is the host the proxy checked. Driven in
this process against an upstream on this host's loopback, named ``allowed.test`` by the gate's
pinned hosts (as ``STOCKADE_EGRESS_HOSTS_FILE`` names one)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from stockade import Policy
from stockade.egress.gate import Gate
from stockade.egress.proxy import proxy
from stockade.egress.tunnel_check import More, Refusal, check
from stockade.result import EgressRequest


def _client_hello(server_name: str | None) -> bytes:
    """The first flight of Python's own TLS client: one record holding its ClientHello."""
    context = ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _hello_with(extensions: bytes) -> bytes:
    """A ClientHello written by hand, holding ``extensions``."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message


def _extension(kind: int, data: bytes) -> bytes:
    return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data


def _sni(*names: bytes) -> bytes:
    entries = b"".join(b"\x00" + len(n).to_bytes(2, "big") + n for n in names)
    return _extension(0, len(entries).to_bytes(2, "big") + entries)


def _said(verdict: More | Refusal | None) -> str | None:
    """A verdict as a test reads it: None, "more", or the refusal's reason."""
    if isinstance(verdict, More):
        return "more"
    return verdict.reason if verdict is not None else None


OTHER = "its TLS ClientHello names another host ('attacker.example') than the tunnel's"
NO_NAME = "its TLS ClientHello names no host (a front would route it by another name inside)"
IN_A_TUNNEL = "plain HTTP inside a tunnel (send it to the proxy as an http:// URL, whose Host it sets)"


def test_a_tls_tunnel_must_name_its_own_host() -> None:
    assert check(_client_hello("allowed.test"), "allowed.test") is None
    assert check(_client_hello("ALLOWED.test."), "allowed.test") is None  # one host, spelt two ways
    assert _said(check(_client_hello("attacker.example"), "allowed.test")) == OTHER
    # No name: a front routes it by its default, or by the Host inside (which the proxy cannot see).
    assert _said(check(_client_hello(None), "allowed.test")) == NO_NAME
    # A tunnel to an address the policy allows by address may name any host, or none: the address was allowed.
    assert check(_client_hello("attacker.example"), "10.1.2.3") is None
    assert check(_client_hello(None), "::1") is None
    refused = check(_client_hello("attacker.example"), "allowed.test")
    assert isinstance(refused, Refusal) and refused.said == bytes([0x15, 3, 3, 0, 2, 2, 49])  # a fatal alert


def test_a_client_hello_is_read_whole_across_records_and_reads_looked_at_once_each_record_is() -> None:
    hello = _client_hello("attacker.example")
    size = int.from_bytes(hello[3:5], "big")
    assert check(hello[:1], "allowed.test") == More(2) and check(hello[:4], "allowed.test") == More(5)
    for cut in (5, 40, len(hello) - 1):
        assert check(hello[:cut], "allowed.test") == More(5 + size), cut  # the rest of its record
    message = hello[5:]
    split = b"".join(b"\x16\x03\x01" + len(p).to_bytes(2, "big") + p for p in (message[:30], message[30:]))
    assert _said(check(split, "allowed.test")) == OTHER
    assert check(split[:35], "allowed.test") == More(40)  # the first record whole: the next one's head
    assert check(split[:40], "allowed.test") == More(40 + len(message) - 30)


def test_a_hidden_nameless_malformed_or_preceded_client_hello_is_refused() -> None:
    hidden = "an encrypted ClientHello (ECH), which hides the host it is for"
    ech = _extension(0xFE0D, b"\x00" * 40)
    assert _said(check(_hello_with(_sni(b"allowed.test") + ech), "allowed.test")) == hidden
    assert _said(check(_hello_with(_extension(0xFFCE, b"x")), "allowed.test")) == hidden
    for extensions, why in (
        (_sni(b"allowed.test", b"attacker.example"), "two host names"),
        (_sni(b"allowed.test") + _sni(b"allowed.test"), "extension 0 twice"),
        (_sni("h\u00e9.test".encode()), "a host name that is not ASCII"),
        (_extension(0, b"\x00\x09\x00\x00\x05ab"), "a field runs past its end"),
    ):
        assert _said(check(_hello_with(extensions), "allowed.test")) == f"a malformed TLS ClientHello ({why})"
    assert check(_hello_with(_sni(b"allowed.test")), "allowed.test") is None
    not_hello = b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"  # a ServerHello's type
    assert _said(check(not_hello, "allowed.test")) == (
        "a malformed TLS ClientHello (the first handshake message is no ClientHello)"
    )
    huge = b"\x16\x03\x01\x40\x00\x01\xff\xff\xff" + bytes(100)
    assert _said(check(huge, "allowed.test")) == "a malformed TLS ClientHello (a ClientHello of 16777215 bytes)"
    # In records of one byte each: refused at its seventeenth record, whatever it would say.
    trickle = b"".join(b"\x16\x03\x01\x00\x01" + bytes([b]) for b in _client_hello("allowed.test")[5:])
    many = "a malformed TLS ClientHello (a ClientHello in more than 16 records)"
    assert _said(check(trickle, "allowed.test")) == many
    # A record of another type first (a warning alert some fronts skip): never looked past.
    alert = b"\x15\x03\x03\x00\x02\x01\x00"
    preceded = check(alert + _client_hello("attacker.example"), "allowed.test")
    assert _said(preceded) == "a TLS record before its ClientHello"
    assert check(b"\x15", "allowed.test") == More(2)


def test_plain_http_inside_a_tunnel_is_refused_however_it_is_dressed_and_other_protocols_pass() -> None:
    for first in (b"GET / HTTP/1.1\r\nHost: attacker.example\r\n\r\n", b"\r\n\r\nget /x http/1.0\n",
                  b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"POST\t/ HTTP/1.1\r\n",
                  b"X" * 40 + b" / HTTP/1.1\r\n",  # a method of any length (servers route unknown ones too)
                  "GET /\u00e9 HTTP/1.1\r\n".encode(),
                  # What a server may take for spaces (RFC 9112: VT, FF, a bare CR), control bytes in it.
                  b"GET\x0b/\x0bHTTP/1.1\r\n", b"GET\x0c/ HTTP/1.1\r\n", b"GET\r/\rHTTP/1.1\r\n",
                  b"GET /\x01 HTTP/1.1\r\n", b"GET / HTTP/1.1\x7f\r\n"):  # fmt: skip
        assert _said(check(first, "allowed.test")) == IN_A_TUNNEL, first
    for partial in (b"GET", b"\r\n", b"HELLO"):
        assert check(partial, "allowed.test") == More(len(partial) + 1), partial
    # A request line under way is looked at again once a line ends in what comes (not at each byte).
    assert check(b"GET / HTTP/1.1", "allowed.test") == More(15, line_end=True)
    assert check(b"GET /\x01", "allowed.test") == More(7, line_end=True)
    # Held to the proxy's bound on a head: past it, never passed on unseen.
    never = "first bytes that said nothing of what they are in 16 KiB"
    for endless in (b"\r\n" * 8192, b"GET /" + b"a" * 16400, b"X" * 16384):
        refused = check(endless, "allowed.test")
        assert isinstance(refused, Refusal) and refused.reason == never, endless[:20]
        assert refused.said.startswith(b"HTTP/1.1 403 Forbidden\r\n") and never.encode() in refused.said
    for other in (b"SSH-2.0-OpenSSH_9.2\r\n", b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"*1\r\n$4\r\nPING\r\n",
                  b"SET key value\r\n", b"\x80\x2e\x01\x03\x01",
                  b"0039git-upload-pack /project.git\x00host=allowed.test\x00",
                  # A database's message whose length's low byte is a TLS record's type (MySQL, MongoDB).
                  b"\x16\x01\x00\x00\x03SELECT 1", b"\x17\x00\x00\x00\x01\x02"):  # fmt: skip
        assert check(other, "allowed.test") is None, other


@pytest.fixture
def recorder() -> Iterator[tuple[int, list[bytes]]]:
    """An upstream that keeps what reaches each connection (until it goes quiet for 1 s) and answers."""
    listener = socket.create_server(("127.0.0.1", 0))
    reached: list[bytes] = []

    def serve(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1.0)
            data = b""
            try:
                while chunk := conn.recv(65536):
                    data += chunk
                    if data.endswith(b"\r\n\r\n") and data.startswith(b"GET"):
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                        break
            except OSError:
                pass
            reached.append(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1], reached
    listener.close()


def _through_proxy(port: int, sent: bytes) -> tuple[bytes, list[EgressRequest]]:
    refused: list[EgressRequest] = []
    policy = Policy(network_policy="allowlist", allowed_hosts=[f"allowed.test:{port}"], allowed_cidrs=["127.0.0.0/8"])
    gate = Gate(policy, {}, on_refused=refused.append, pinned_hosts="127.0.0.1 allowed.test\n")
    listener = socket.create_server(("127.0.0.1", 0))
    stop = proxy().serve(gate, listener)
    try:
        with socket.create_connection(listener.getsockname(), timeout=20) as client:
            client.sendall(sent)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
        deadline = time.monotonic() + 20
        while gate.open_flows() and time.monotonic() < deadline:
            time.sleep(0.05)
        return answer, refused
    finally:
        stop()


def test_a_tunnel_whose_tls_names_another_host_is_refused_before_a_byte_is_passed_on(
    recorder: tuple[int, list[bytes]],
) -> None:
    port, reached = recorder
    connect = f"CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode()
    answer, refused = _through_proxy(port, connect + _client_hello("attacker.example"))
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"\x15\x03\x03\x00\x02\x02\x31"), answer
    (record,) = refused
    assert (record.host, record.method, record.allowed) == ("allowed.test", "CONNECT", False)
    assert record.reason == "its TLS ClientHello names another host ('attacker.example') than the tunnel's"
    deadline = time.monotonic() + 10
    while not reached and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reached == [b""], reached  # the connection upstream was opened, and never written to
    # Its own name goes through as it is.
    hello = _client_hello("allowed.test")
    answer, refused = _through_proxy(port, connect + hello)
    assert refused == []
    deadline = time.monotonic() + 10
    while len(reached) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reached[1] == hello


def test_plain_http_inside_a_tunnel_is_refused(recorder: tuple[int, list[bytes]]) -> None:
    port, reached = recorder
    connect = f"CONNECT allowed.test:{port} HTTP/1.1\r\nHost: allowed.test\r\n\r\n".encode()
    answer, refused = _through_proxy(port, connect + b"GET / HTTP/1.1\r\nHost: attacker.example\r\n\r\n")
    assert [r.reason for r in refused] == [IN_A_TUNNEL]
    told = answer.split(b"\r\n\r\n", 1)[1]  # after the tunnel's 200: the refusal, in the tunnel
    assert told.startswith(b"HTTP/1.1 403 Forbidden\r\n") and IN_A_TUNNEL.encode() in told, answer
    deadline = time.monotonic() + 10
    while not reached and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reached == [b""], reached


def test_a_plain_request_goes_with_the_host_the_proxy_checked(recorder: tuple[int, list[bytes]]) -> None:
    port, reached = recorder
    answer, refused = _through_proxy(
        port,
        f"GET http://allowed.test:{port}/x HTTP/1.1\r\nHost: attacker.example\r\nX-Forwarded-Host: attacker.example"
        "\r\nForwarded: host=attacker.example\r\nX-Original-URL: http://attacker.example/\r\nAccept: */*\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 200 ") and refused == [], answer
    (sent,) = reached
    head = sent.split(b"\r\n\r\n")[0].lower()
    assert b"attacker" not in head, head
    assert head.split(b"\r\n")[:2] == [b"get /x http/1.1", f"host: allowed.test:{port}".encode()]
    assert b"accept: */*" in head
