"""Where an allowed name may be reached: the proxy's own lookups, checked against the allow-list.

The proxy resolves a name itself (a hosts file the host pins names in, then
DNS), keeps only the addresses the allow-list lets it use (allowlist.py), and
connects to one of those: no second lookup that a rebinding name could steer.
The name service (dns.py) answers with the same addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from .allowlist import HostRule, normalise_name
from .gate import Gate


class Refused(Exception):
    """A request the gate does not let through; ``status`` is the HTTP answer."""

    def __init__(self, reason: str, status: int = 403) -> None:
        super().__init__(reason)
        self.status = status


class Unreachable(Refused):
    """A request the policy allows whose host could not be resolved or reached: a failure to say,
    not a violation of the isolate's (502)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, 502)


def pinned_addresses(host: str, lines: Iterable[str]) -> list[Any]:
    """The addresses the hosts(5) ``lines`` (``STOCKADE_EGRESS_HOSTS_FILE``) give ``host``: names
    pinned ahead of DNS (an internal name, a test's servers). None: ask DNS."""
    found = []
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) >= 2 and host in (normalise_name(n) for n in fields[1:]):
            with contextlib.suppress(ValueError):
                found.append(ipaddress.ip_address(fields[0]))
    return found


async def resolve(gate: Gate, host: str, port: int, rule: HostRule) -> list[Any]:
    """The addresses ``host`` may be reached at under ``rule``: ``Refused`` when there are none."""
    try:
        return [ipaddress.ip_address(host)]  # an address: allowed by its rule or a CIDR
    except ValueError:
        pass
    found = pinned_addresses(host, gate.pinned_hosts)
    if not found:
        try:
            async with gate.resolving:  # a few at a time per sandbox: the resolver's threads are everyone's
                infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Unreachable(f"cannot resolve {host}: {exc}") from None
        found = list(dict.fromkeys(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos))
    usable = gate.allowlist.usable(rule, found)
    if not usable:
        shown = ", ".join(str(a) for a in found)
        raise Refused(f"{host} resolves only to addresses it may not reach ({shown}); allowed_cidrs can name them")
    return usable


async def lookup(gate: Gate, name: str) -> list[Any]:
    """For the name service: the addresses the proxy would connect ``name`` to (none: none usable)."""
    rule = gate.allowlist.rule_for(name, 0) or next(
        (r for r in gate.allowlist.rules if r.matches(name, r.port or 0)), None
    )
    if rule is None:
        return []
    try:
        return await resolve(gate, name, rule.port or 443, rule)
    except Refused:
        return []
