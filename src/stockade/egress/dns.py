"""Name service for an isolate behind the proxy: allowed names only, answered by the host.

The isolate's ``/etc/resolv.conf`` names ``127.0.0.1``; the host listens there
(a UDP socket in the isolate's namespace, beside the proxy's). A query for a
name the allow-list covers is answered with the addresses the proxy would use
for it (resolved on the host, private ones left out as the proxy leaves them
out); any other is refused (REFUSED), recorded and reported as a violation
(``detection_layer: "NETWORK"``). An answer gives the program an address, not
a route: connecting to it still fails unless it goes through the proxy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import dns.exception
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from ..result import EgressRequest
from .allowlist import is_host_name, normalise_name
from .gate import Gate

log = logging.getLogger("stockade.egress")
DNS_PORT = 53
TTL = 30
MAX_QUERY_BYTES = 512  # a plain DNS query; the isolate has no reason to send more
MAX_PENDING = 64  # queries being answered at once (a slow lookup each)

Resolve = Callable[[str], Awaitable[list[Any]]]


class NameService(asyncio.DatagramProtocol):
    def __init__(self, gate: Gate, resolve: Resolve) -> None:
        self.gate = gate
        self.resolve = resolve
        self.transport: asyncio.DatagramTransport | None = None
        self.pending: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) > MAX_QUERY_BYTES or len(self.pending) >= MAX_PENDING:
            self.gate.drop()  # too big, or a flood: dropped, as a busy server would, and counted
            return
        if not self.gate.admit(time.monotonic()):
            return  # past the isolate's rate: dropped unread, counted
        task = asyncio.get_running_loop().create_task(self._answer(data, addr))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)  # refuses a response (QR set) as a query
        except (dns.exception.DNSException, ValueError):
            self.gate.drop()  # not a query: unanswered, counted
            return
        if len(query.question) != 1:
            reply.set_rcode(dns.rcode.FORMERR)
        else:
            await self._fill(query.question[0], reply)
        if self.transport is not None:
            self.transport.sendto(reply.to_wire(), addr)

    async def _fill(self, question: dns.rrset.RRset, reply: dns.message.Message) -> None:
        name = normalise_name(question.name.to_text())
        kind = dns.rdatatype.to_text(question.rdtype)
        allowed = is_host_name(name) and (self.gate.allowlist.rule_for(name, 0) or self._named_any_port(name))
        if not allowed:
            reply.set_rcode(dns.rcode.REFUSED)
            self.gate.record(EgressRequest(host=name, port=DNS_PORT, method=f"QUERY {kind}", scheme="dns",
                                           allowed=False, reason=f"{name} is not in allowed_hosts"))  # fmt: skip
            return
        if question.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
            return  # an allowed name's other records: none here (NOERROR, no answer)
        addresses = await self.resolve(name)
        version = 4 if question.rdtype == dns.rdatatype.A else 6
        found = [str(a) for a in addresses if a.version == version]
        if found:
            reply.answer.append(dns.rrset.from_text_list(question.name, TTL, dns.rdataclass.IN, kind, found))

    def _named_any_port(self, name: str) -> bool:
        """A rule with a port still lets its name be looked up."""
        return any(rule.port is not None and rule.matches(name, rule.port) for rule in self.gate.allowlist.rules)
