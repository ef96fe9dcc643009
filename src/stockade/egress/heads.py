"""Request heads as the proxy passes them on: what a bound host never gets from the isolate, one
hop's headers, and one framing of the body."""

from __future__ import annotations

from collections.abc import Sequence

import h11

from .allowlist import canonical_host


def head_size(request: h11.Request) -> int:
    """About the bytes of ``request``'s head as sent: its request line and each header line."""
    return len(request.method) + len(request.target) + 12 + sum(len(n) + len(v) + 4 for n, v in request.headers)


def split_authority(target: str, default_port: int) -> tuple[str, int]:
    host, port = target, default_port
    if target.startswith("["):
        end = target.find("]")
        host, rest = target[1:end], target[end + 1 :]
        if rest.startswith(":") and rest[1:].isdigit():
            port = int(rest[1:])
    elif target.count(":") == 1:
        host, _, number = target.partition(":")
        if not number.isdigit():
            return "", 0
        port = int(number)
    if not 0 < port < 65536:
        return "", 0
    return canonical_host(host), port


# Request headers no host gets from the isolate: its own Host (set from the target the proxy
# checked: no fronting to another site behind a shared front), and the headers a front routes by
# instead of Host (the same fronting).
_FRONTING = (b"host", b"forwarded", b"x-original-url", b"x-rewrite-url")
# And what a bound host never gets: encodings and ranges (a compressed or partial reply could
# carry a value past the redactor).
_UNREADABLE = (b"accept-encoding", b"te", b"range", b"if-range")


def for_host(headers: list[tuple[bytes, bytes]], host: str, port: int, default_port: int) -> list[tuple[bytes, bytes]]:
    """``headers`` as they go to ``host``: its own authority as their ``Host``, nothing to route by instead."""
    authority = f"[{host}]" if ":" in host else host
    if port != default_port:
        authority = f"{authority}:{port}"
    kept = [(n, v) for n, v in headers if n.lower() not in _FRONTING and not n.lower().startswith(b"x-forwarded-")]
    return [(b"host", authority.encode()), *kept]


def for_bound_host(
    headers: list[tuple[bytes, bytes]], host: str, port: int, default_port: int
) -> list[tuple[bytes, bytes]]:
    """As ``for_host``, asking for replies the redactor can read whole."""
    kept = [(n, v) for n, v in for_host(headers, host, port, default_port) if n.lower() not in _UNREADABLE]
    return [*kept, (b"accept-encoding", b"identity")]


# Headers of one hop (RFC 9110 7.6.1), never passed on, and the framing, which the proxy writes itself.
_HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
               b"te", b"trailer", b"upgrade", b"transfer-encoding", b"content-length")  # fmt: skip


def end_to_end(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]] | None:
    """The isolate's request headers as they are passed on: none of one hop's (nor those its
    ``Connection`` names, but ``Host``), and the body framed one way only, as the proxy read it.
    None: a request framed two ways (h11 reads chunks where a length is given too), which a host
    or a front before it that went by the length would split elsewhere: the rest of the body a
    request of the isolate's choosing (any Host), the proxy's next request, a filled secret in
    it, that request's body."""
    named = {t.strip().lower() for n, v in headers if n.lower() == b"connection" for t in v.split(b",")} - {b"host"}
    chunked = any(n.lower() == b"transfer-encoding" for n, _ in headers)  # h11 takes none but chunked
    lengths = {v.strip() for n, v in headers if n.lower() == b"content-length"}
    if (chunked and lengths) or len(lengths) > 1:
        return None
    kept = [(n, v) for n, v in headers if n.lower() not in _HOP_BY_HOP and n.lower() not in named]
    if chunked:
        kept.append((b"transfer-encoding", b"chunked"))
    elif lengths:
        kept.append((b"content-length", lengths.pop()))
    return kept
