"""What a plain tunnel's first bytes say of the host they are for, checked against the tunnel's host.

A rule allows a host, but a connection goes to an address; a shared front (a
CDN) at that address routes each connection by the name inside it: a TLS
ClientHello's server name, or an HTTP request's ``Host``. A tunnel opened to
an allowed name that then named another would reach any site on the same
front, an attacker's own among them (domain fronting). So a plain tunnel's
first bytes are read before they are passed on:

- a TLS ClientHello must name the tunnel's own host, or none (a tunnel to an
  address the policy allows by address may name any: the address is what was
  allowed); an encrypted ClientHello (ECH), whose real name is hidden, and a
  malformed one are refused;
- plain HTTP inside a tunnel is refused (its ``Host`` could change with each
  request): plain HTTP goes to the proxy as ``http://`` URLs, whose ``Host``
  the proxy sets;
- anything else (SSH, a database's protocol) names no host, and passes.

``check(first, host)`` answers ``MORE`` until the first bytes are enough to
tell, then None (pass them on) or why they are refused.
"""

from __future__ import annotations

import enum
import ipaddress
import re

from .allowlist import canonical_host


class Need(enum.Enum):
    MORE = "more of the first bytes"


MORE = Need.MORE
MAX_HELLO_BYTES = 64 * 1024  # a ClientHello with post-quantum key shares is under 4 KiB
MAX_LINE_BYTES = 16 * 1024  # the proxy's own bound on a request head

_HANDSHAKE, _CLIENT_HELLO = 0x16, 0x01
_SERVER_NAME, _ECH, _ESNI_DRAFT = 0x0000, 0xFE0D, 0xFFCE
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32}")  # an HTTP method's characters
_HTTP_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+[ \t]+\S+[ \t]+HTTP/", re.IGNORECASE)


class _Malformed(Exception):
    pass


def check(first: bytes, host: str) -> str | Need | None:
    """``MORE``, None (``first`` may go on to ``host``), or why the tunnel is refused."""
    if first[:1] == bytes([_HANDSHAKE]):
        return _check_hello(first, host)
    return _check_text(first)


def _check_hello(first: bytes, host: str) -> str | Need | None:
    try:
        hello = _client_hello(first)
    except _Malformed as exc:
        return f"a malformed TLS ClientHello ({exc})"
    if hello is None:
        if len(first) > MAX_HELLO_BYTES:
            return f"a TLS ClientHello larger than {MAX_HELLO_BYTES >> 10} KiB"
        return MORE
    try:
        named, hidden = _server_name(hello)
    except _Malformed as exc:
        return f"a malformed TLS ClientHello ({exc})"
    if hidden:
        return "an encrypted ClientHello (ECH), which hides the host it is for"
    if named is None or _is_address(host) or canonical_host(named) == host:
        return None
    return f"its TLS ClientHello names another host ({named[:253]!r}) than the tunnel's"


def _check_text(first: bytes) -> str | Need | None:
    text = first.lstrip(b"\r\n")  # a server skips empty lines before a request
    if not text:
        return MORE if len(first) < MAX_LINE_BYTES else None
    token = _TOKEN.match(text)
    if token is None:
        return None
    end = token.end()
    if end == len(text):
        return MORE if end < 32 else None  # a method still coming, or a word no method is
    if text[end : end + 1] not in (b" ", b"\t"):
        return None
    line_end = text.find(b"\n")
    if line_end < 0:
        return MORE if len(first) < MAX_LINE_BYTES else None
    if _HTTP_LINE.match(text[:line_end]):
        return "plain HTTP inside a tunnel (send it to the proxy as an http:// URL, whose Host it sets)"
    return None


def _client_hello(first: bytes) -> bytes | None:
    """The ClientHello's body, from however many records it spans; None: not all of it yet."""
    message = b""
    at = 0
    while len(first) >= at + 5:
        if first[at] != _HANDSHAKE or first[at + 1] != 0x03:
            raise _Malformed("a record that is no handshake before the ClientHello ended")
        size = int.from_bytes(first[at + 3 : at + 5], "big")
        if not 0 < size <= 1 << 14:
            raise _Malformed(f"a record of {size} bytes")
        message += first[at + 5 : at + 5 + size]  # what has come of it
        at += 5 + size
        if len(message) >= 4:
            if message[0] != _CLIENT_HELLO:
                raise _Malformed("the first handshake message is no ClientHello")
            length = int.from_bytes(message[1:4], "big")
            if length > MAX_HELLO_BYTES:
                raise _Malformed(f"a ClientHello of {length} bytes")
            if len(message) >= 4 + length:
                return message[4 : 4 + length]
    return None


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
