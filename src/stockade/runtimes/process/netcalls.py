"""Under network_policy "allowlist": each attempt to reach an address directly, reported.

An allowlist isolate's network namespace has only its loopback, so a direct
connection anywhere else fails in the kernel (no route) whatever happens here.
To report it, an allowlist isolate's seccomp filter also stops ``connect``
and ``sendto`` with an address; the supervisor reads the
destination from the caller's memory: its own loopback lets the call go on
(``CONTINUE``: the proxy and the name service are there), anything else is
answered ``ENETUNREACH``, as the kernel would, and reported as a violation
(``detection_layer: "NETWORK"``, the address and port).

The address is read before the call goes on; a thread of the caller could
change it in between. That can hide an attempt from the report, never let
one through: routing, not this check, is what keeps the isolate in. Nor is
``sendmsg``/``sendmmsg`` with an address reported (the agent hands the host
its descriptors with ``sendmsg`` while its filter is already on): those fail
in the kernel unreported.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import struct

from ...result import SecurityViolation
from .seccomp import Rule
from .syscalls_x86_64 import SYSCALLS_X86_64

CONNECT, SENDTO = SYSCALLS_X86_64["connect"], SYSCALLS_X86_64["sendto"]
CALLS = frozenset((CONNECT, SENDTO))
ANSWER = errno.ENETUNREACH
_WHY = "under network_policy allowlist the destination is read: loopback goes on, anything else is refused"
RULES = (
    Rule("connect", "notify", "MEDIUM", _WHY),
    # With no address (a connected socket: what send() is), sendto is let through by the filter itself;
    # an address is a pointer, any of whose 64 bits may be the set ones (a page at 0x200000000).
    Rule("sendto", "notify", "MEDIUM", _WHY, when={"arg": 4, "op": "masked_any", "value": 0xFFFFFFFF}),
    Rule("sendto", "notify", "MEDIUM", _WHY, when={"arg": 4, "op": "masked_any", "value": 0xFFFFFFFF, "high": True}),
)
_AF_INET, _AF_INET6 = 2, 10


def destination(pid: int, nr: int, args: tuple[int, ...]) -> tuple[str, int] | None:
    """Where the call would send (address, port) when that is not the isolate's own loopback;
    None for loopback, a Unix or netlink socket, no address at all, or memory that cannot be read."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        address, length = (args[1], args[2]) if nr == CONNECT else (args[4], args[5])
        if not address or length < 2 or address >= 1 << 63:
            return None  # a kernel-half pointer (past off_t): the call itself faults
        raw = os.pread(fd, min(length, 28), address)
    except (OSError, OverflowError, ValueError):
        return None
    finally:
        os.close(fd)
    return _inet(raw)


def _inet(raw: bytes) -> tuple[str, int] | None:
    if len(raw) < 2:
        return None
    (family,) = struct.unpack("<H", raw[:2])
    if family == _AF_INET and len(raw) >= 8:
        port = struct.unpack(">H", raw[2:4])[0]
        address: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(raw[4:8])
    elif family == _AF_INET6 and len(raw) >= 24:
        port = struct.unpack(">H", raw[2:4])[0]
        address = ipaddress.IPv6Address(raw[8:24])
        mapped = address.ipv4_mapped
        address = mapped if mapped is not None else address
    else:
        return None  # unix, netlink, AF_UNSPEC (a datagram socket's disconnect): nothing leaves by them
    if address.is_loopback:
        return None
    return str(address), port


def violation(nr: int, where: tuple[str, int], pid: int) -> SecurityViolation:
    call = "connect" if nr == CONNECT else "sendto"
    host, port = where
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return SecurityViolation(
        violation_type="network_egress",
        severity="MEDIUM",
        description=f"{call} to {shown} refused: only the egress proxy (127.0.0.1:3128) leads out",
        detection_layer="NETWORK",
        blocked=True,
        pid=pid,
    )
