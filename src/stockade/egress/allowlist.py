"""Which destinations an isolate under ``network_policy: "allowlist"`` may reach.

A rule is a name (``api.openai.com``), a wildcard (``*.example.com``: any name
below example.com, not example.com itself) or an address (``10.0.0.5``,
``[::1]``), each with an optional ``:PORT`` (without one: any port). Names
are compared lowercased, without a trailing dot.

A name is only half the check: the proxy resolves it itself and connects to
an address it resolved to (so no second lookup can be steered elsewhere), and
refuses every address that is not globally routable (private, loopback,
link-local, ...) or is one of the host's own, unless ``allowed_cidrs`` holds
it. An address rule names its address, which may then be reached whatever it
is (a host bounds both: STOCKADE_EGRESS_NETWORKS, runtimes/egress.py).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})*")


@dataclass(frozen=True)
class HostRule:
    host: str  # a lowercased name, "*.suffix", or an address's canonical text
    port: int | None

    @property
    def address(self) -> IPAddress | None:
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    def matches(self, host: str, port: int) -> bool:
        if self.port is not None and self.port != port:
            return False
        if self.host.startswith("*."):
            return host.endswith(self.host[1:]) and len(host) > len(self.host) - 1
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def parse_rule(text: str) -> HostRule:
    """``NAME``, ``*.DOMAIN`` or an address, with an optional ``:PORT``; ValueError names what is wrong."""
    raw = text.strip()
    port: int | None = None
    host = raw
    if "://" in raw or ("/" in raw and not raw.startswith("[")):
        try:
            ipaddress.ip_network(raw, strict=False)
        except ValueError:
            # A URL pasted whole: its scheme read as the host and "//..." as the port said nothing useful.
            name = raw.split("://", 1)[-1].split("/", 1)[0]
            raise ValueError(f"allowed host {text!r}: give a host name ({name!r}), not a URL") from None
        raise ValueError(f"allowed host {text!r} is a network: give it in allowed_cidrs")
    if raw.startswith("["):  # [v6] or [v6]:port
        end = raw.find("]")
        if end < 0:
            raise ValueError(f"allowed host {text!r}: unclosed [")
        host, rest = raw[1:end], raw[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"allowed host {text!r}: expected :PORT after ]")
            port = _port(rest[1:], text)
    elif raw.count(":") == 1:
        host, _, number = raw.partition(":")
        port = _port(number, text)
    try:
        return HostRule(str(ipaddress.ip_address(host)), port)
    except ValueError:
        pass
    name = normalise_name(host)
    bare = name[2:] if name.startswith("*.") else name
    if not _NAME.fullmatch(bare) or "*" in bare or len(name) > 253:
        raise ValueError(f"allowed host {text!r} is not a host name, *.domain or address (with an optional :PORT)")
    if name.startswith("*.") and "." not in bare:
        raise ValueError(f"allowed host {text!r}: a wildcard covers names below a domain (*.example.com), not a TLD")
    return HostRule(name, port)


def parse_network(text: str) -> IPNetwork:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"allowed CIDR {text!r} is not an address or network (e.g. 10.0.0.0/8)") from None


def is_host_name(name: str) -> bool:
    """Whether ``name`` (normalised) is a host's name: labels of letters, digits, ``-`` and ``_``.
    Nothing else is checked against a rule: ``x\\.co.uk`` matched ``*.co.uk`` as text, and a
    resolver reads its escaped dot as part of a label (a name under .uk, not under .co.uk)."""
    return len(name) <= 253 and _NAME.fullmatch(name) is not None


def normalise_name(host: str) -> str:
    return host.strip().lower().rstrip(".")


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"allowed host {whole!r}: port must be 1-65535")
    return int(text)


class Allowlist:
    """A policy's ``allowed_hosts`` and ``allowed_cidrs``, checked; ``refused``: addresses never
    reached, however named (a Ray cluster's machines: ``refuse_peers``)."""

    def __init__(self, hosts: Iterable[str], cidrs: Iterable[str] = (), refused: Iterable[str] = ()) -> None:
        self.rules = tuple(parse_rule(h) for h in hosts)
        self.networks = tuple(parse_network(c) for c in cidrs)
        self.refused = frozenset(ipaddress.ip_address(a) for a in refused)

    def rule_for(self, host: str, port: int) -> HostRule | None:
        """The rule that lets ``host`` (a name or an address's text) be reached on ``port``, or None."""
        wanted = canonical_host(host)
        address = _address(wanted)
        if address is None and not is_host_name(wanted):
            return None
        if getattr(address, "scope_id", None):
            return None  # "fe80::1%eth0": the caller would choose the interface
        for rule in self.rules:
            if address is not None and rule.address != address:
                continue  # an address is let through by its own rule or a network, never a name's (*.0.10)
            if rule.matches(wanted, port):
                return rule
        if address is not None and self.network_allows(address):
            return HostRule(wanted, port)
        return None

    def network_allows(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)

    def usable(self, rule: HostRule, addresses: Iterable[IPAddress]) -> list[IPAddress]:
        """Of the addresses a name resolved to, those it may be reached at: globally routable and
        not this host's own, or in ``allowed_cidrs``, or the very address a rule names; never one of
        ``refused``."""
        named = rule.address
        reached = [a for a in addresses if not _among(a, self.refused)]
        return [a for a in reached if a == named or self.network_allows(a) or (public(a) and not host_address(a))]


# The machines of the cluster this host is a node of (a Ray node's actor says them: refuse_peers): as
# the host's own addresses, public or not, no allow-list reaches them. Reached, a Ray node's dashboard,
# GCS or client port runs code on every node.
_peers: frozenset[IPAddress] = frozenset()


def refuse_peers(addresses: Iterable[IPAddress]) -> None:
    """From now on, ``addresses`` count as this host's own (``host_address``), and are handed to
    each egress worker this process starts to refuse (``peers``)."""
    global _peers
    _peers = frozenset(addresses)


def peers() -> list[str]:
    return sorted(str(a) for a in _peers)


def _among(address: IPAddress, addresses: frozenset[IPAddress]) -> bool:
    """``address`` is one of ``addresses``, or an IPv6 one carries one of them."""
    if address in addresses:
        return True
    return isinstance(address, ipaddress.IPv6Address) and any(inner in addresses for inner in _carried(address))


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT's IPv4-translated addresses (RFC 2765)


# Public addresses a cloud answers inside its own network as a host's service: Azure's WireServer
# (its VM agent's channel, and DNS). Metadata services elsewhere are link-local, not public.
_CLOUD_INTERNAL = frozenset({ipaddress.IPv4Address("168.63.129.16")})


def public(address: IPAddress) -> bool:
    """A globally routable unicast address, with any IPv4 address an IPv6 one carries public too
    (mapped, IPv4-compatible, IPv4-translated, NAT64, 6to4, Teredo): ``64:ff9b::a9fe:a9fe`` is the
    metadata service. Not a cloud's host service at a public address (``_CLOUD_INTERNAL``)."""
    if not address.is_global or address.is_multicast or address in _CLOUD_INTERNAL:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address.is_site_local:
            return False
        return all(public(inner) for inner in _carried(address))
    return True


def _carried(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 one carries (mapped, IPv4-compatible, IPv4-translated, NAT64,
    6to4, Teredo's server): each reaches that address, and is checked as it."""
    embedded = [address.ipv4_mapped, address.sixtofour, address.teredo[1] if address.teredo else None]
    if address in _NAT64 or address in _COMPATIBLE or address in _TRANSLATED:
        embedded.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return [inner for inner in embedded if inner is not None]


def host_address(address: IPAddress) -> bool:
    """Whether ``address`` is one of this host's own: its route is local (the kernel would send to it
    from the address itself). The proxy connects from the host's network, where a public address of
    the host's reaches whatever listens on every interface (a Ray cluster's ports, sshd), as its
    loopback would: no public address for an allow-list."""
    if _among(address, _peers):
        return True  # a machine of this host's cluster (refuse_peers)
    if isinstance(address, ipaddress.IPv6Address) and any(host_address(inner) for inner in _carried(address)):
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((str(address), 9))  # a route looked up; UDP sends nothing
            return ipaddress.ip_address(str(probe.getsockname()[0]).split("%")[0]) == address
    except OSError:
        return False  # no route to it from here (or no IPv6 on this host at all: none of its own)


def canonical_host(host: str) -> str:
    """A target's host as the rules are written: an address's canonical text (``[0:0::1]`` is
    ``::1``), a name lowercased without its trailing dot. Every check of a host, the secrets'
    bindings too, and its record take this one form: another spelling of a bound address would
    otherwise be a host no secret is bound to, its replies passed on unredacted."""
    address = _address(host.strip("[]"))
    return str(address) if address is not None else normalise_name(host)


def _address(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_covered(host: str, allowed: Allowlist) -> bool:
    """Whether a secret's bound ``host`` (a rule's text) is reachable under ``allowed`` at all: on
    some port (a host bound without one is reachable on the port its allowed rule names)."""
    bound = parse_rule(host)
    for rule in allowed.rules:
        if rule.port is not None and bound.port is not None and bound.port != rule.port:
            continue
        if rule.host == bound.host:
            return True
        if rule.host.startswith("*.") and not bound.host.startswith("*.") and rule.matches(bound.host, rule.port or 0):
            return True
    address = bound.address
    return address is not None and allowed.network_allows(address)
