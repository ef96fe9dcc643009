"""What a plain tunnel's first bytes say of the host they are for, checked against the tunnel's host.

A rule allows a host, but a connection goes to an address; a shared front (a
CDN) at that address routes each connection by the name inside it: a TLS
ClientHello's server name, or an HTTP request's ``Host``. A tunnel opened to
an allowed name that then named another would reach another site on the same
front (domain fronting). So a plain tunnel's first bytes are held until they
show what they are:

- a TLS ClientHello must name the tunnel's own host (a tunnel to an address
  the policy allows by address may name any, or none: the address is what was
  allowed); one that names another or none, hides its name (an encrypted
  ClientHello, ECH), is malformed, or comes after another TLS record is refused;
- plain HTTP inside a tunnel is refused (its ``Host`` could change with each
  request): plain HTTP goes to the proxy as ``http://`` URLs, whose ``Host``
  the proxy sets;
- anything else (SSH, a database's protocol) names no host, and passes.

What this cannot see: the ``Host`` of HTTP inside the TLS, which a front may
route by too. Only terminating the TLS (as the proxy does for a host a secret
is bound to) would.

``check(first, host)`` answers ``More(needed)`` until the first bytes are
enough to tell (looked at again once ``needed`` bytes are held: a ClientHello
sent a byte at a time costs no parse a byte), then None (pass them on) or a
``Refusal``: why, and what the isolate is told before the tunnel closes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .allowlist import canonical_host

MAX_HELLO_BYTES = 64 * 1024  # a ClientHello with post-quantum key shares is under 4 KiB
MAX_HELLO_RECORDS = 16  # the records it may come in (clients use one to three)
MAX_LINE_BYTES = 16 * 1024  # the proxy's own bound on a request head

_HANDSHAKE, _CLIENT_HELLO = 0x16, 0x01
_RECORD_TYPES = frozenset({0x14, 0x15, 0x16, 0x17, 0x18})  # change_cipher_spec .. heartbeat
_SERVER_NAME, _ECH, _ESNI_DRAFT = 0x0000, 0xFE0D, 0xFFCE
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP method's characters
# What a server may take for the spaces of a request line (RFC 9112 3: SP, HTAB, VT, FF, bare CR).
_SPACES = b" \t\x0b\x0c\r"
# A fatal TLS alert, access_denied: a TLS client says why it was closed, not "connection reset".
_TLS_DENIED = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 49])


@dataclass(frozen=True)
class More:
    needed: int  # the least length of the first bytes worth looking at again
    line_end: bool = False  # and only once a line ends in what comes (or the bound on a line is reached)


@dataclass(frozen=True)
class Refusal:
    reason: str
    said: bytes  # what the isolate is told before the tunnel closes


def check(first: bytes, host: str) -> More | Refusal | None:
    """``More``, None (``first`` may go on to ``host``), or why the tunnel is refused."""
    if not first:
        return More(1)
    if first[0] in _RECORD_TYPES:
        if len(first) < 2:
            return More(2)
        if first[1] == 0x03:  # TLS (another protocol's message may begin with the same byte)
            if first[0] == _HANDSHAKE:
                return _check_hello(first, host)
            # A record of another type first: a front may skip it, and this would not look on.
            return _refused_tls("a TLS record before its ClientHello")
    return _check_text(first)


def _check_hello(first: bytes, host: str) -> More | Refusal | None:
    try:
        hello = _client_hello(first)
    except _Malformed as exc:
        return _refused_tls(f"a malformed TLS ClientHello ({exc})")
    if isinstance(hello, More):
        return hello
    try:
        named, hidden = _server_name(hello)
    except _Malformed as exc:
        return _refused_tls(f"a malformed TLS ClientHello ({exc})")
    if hidden:
        return _refused_tls("an encrypted ClientHello (ECH), which hides the host it is for")
    if _is_address(host) or (named is not None and canonical_host(named) == host):
        return None
    if named is None:
        return _refused_tls("its TLS ClientHello names no host (a front would route it by another name inside)")
    return _refused_tls(f"its TLS ClientHello names another host ({named[:253]!r}) than the tunnel's")


def _check_text(first: bytes) -> More | Refusal | None:
    text = first.lstrip(b"\r\n")  # a server skips empty lines before a request
    token = _TOKEN.match(text)
    if not text or (token is not None and token.end() == len(text)):
        return _more_of_a_line(first)  # empty lines, or a method, so far
    if token is None or text[token.end()] not in _SPACES:
        return None  # no request line starts so
    line_end = text.find(b"\n")
    if line_end < 0:
        if b"\x00" in text:
            return None  # no server takes a NUL in a request line: another protocol (git's "0039git-upload-pack /x\0")
        return _more_of_a_line(first, line_end=True)
    if b"http/" in text[:line_end].lower():  # whatever else the line holds, a server may take it for HTTP
        return _refused_http("plain HTTP inside a tunnel (send it to the proxy as an http:// URL, whose Host it sets)")
    return None


def _more_of_a_line(first: bytes, line_end: bool = False) -> More | Refusal:
    """Waiting for the rest of what may be a request line (``line_end``: its end): up to the
    proxy's bound on a head, past which it is refused (passed on, it could be a request line the
    check never saw end)."""
    if len(first) >= MAX_LINE_BYTES:
        return _refused_http(f"first bytes that said nothing of what they are in {MAX_LINE_BYTES >> 10} KiB")
    return More(len(first) + 1, line_end)


def _refused_tls(reason: str) -> Refusal:
    return Refusal(reason, _TLS_DENIED)


def _refused_http(reason: str) -> Refusal:
    body = f"stockade's egress proxy refused this tunnel: {reason}\n".encode()
    head = f"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
    return Refusal(reason, head.encode() + b"Connection: close\r\n\r\n" + body)


class _Malformed(Exception):
    pass


def _client_hello(first: bytes) -> bytes | More:
    """The ClientHello's body, from however many records it spans; ``More``: not all of it yet."""
    message = b""
    at = records = 0
    while True:
        if len(first) < at + 5:
            return More(at + 5)
        if first[at] != _HANDSHAKE or first[at + 1] != 0x03:
            raise _Malformed("a record that is no handshake before the ClientHello ended")
        records += 1
        if records > MAX_HELLO_RECORDS:
            raise _Malformed(f"a ClientHello in more than {MAX_HELLO_RECORDS} records")
        size = int.from_bytes(first[at + 3 : at + 5], "big")
        if not 0 < size <= 1 << 14:
            raise _Malformed(f"a record of {size} bytes")
        piece = first[at + 5 : at + 5 + size]
        message += piece
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise _Malformed("the first handshake message is no ClientHello")
            length = int.from_bytes(message[1:4], "big")
            if length > MAX_HELLO_BYTES:
                raise _Malformed(f"a ClientHello of {length} bytes")
            if len(message) >= 4 + length:
                return message[4 : 4 + length]
        if len(piece) < size:
            return More(at + 5 + size)  # the rest of this record
        at += 5 + size


def _server_name(hello: bytes) -> tuple[str | None, bool]:
    """The host name a ClientHello names (None: none), and whether it hides the real one (ECH)."""
    reader = _Reader(hello)
    reader.take(2 + 32)  # its version and random
    reader.take(reader.number(1))  # session id
    reader.take(reader.number(2))  # cipher suites
    reader.take(reader.number(1))  # compression methods
    if reader.done():
        return None, False  # no extensions: no name
    extensions = _Reader(reader.take(reader.number(2)))
    if not reader.done():
        raise _Malformed("bytes after its extensions")
    seen: set[int] = set()
    named: str | None = None
    while not extensions.done():
        kind, body = extensions.number(2), extensions.take(extensions.number(2))
        if kind in seen:
            raise _Malformed(f"extension {kind} twice")
        seen.add(kind)
        if kind in (_ECH, _ESNI_DRAFT):
            return None, True
        if kind == _SERVER_NAME:
            named = _host_name(body)
    return named, False


def _host_name(body: bytes) -> str | None:
    names = _Reader(body)
    entries = _Reader(names.take(names.number(2)))
    if not names.done():
        raise _Malformed("bytes after its server names")
    found: str | None = None
    while not entries.done():
        kind, name = entries.number(1), entries.take(entries.number(2))
        if kind != 0:
            continue  # no other kind is defined; a server ignores one it does not know
        if found is not None:
            raise _Malformed("two host names")
        try:
            found = name.decode("ascii")
        except UnicodeDecodeError:
            raise _Malformed("a host name that is not ASCII") from None
    return found


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise _Malformed("a field runs past its end")
        piece = self.data[self.at : self.at + size]
        self.at += size
        return piece

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def done(self) -> bool:
        return self.at >= len(self.data)
