"""One sandbox's side of the egress proxy: what it may reach, its secrets, and what it did.

A ``Gate`` holds an isolate's allow-list, the handles that stand for its
secrets (``stockade-secret-<random>``: the only thing the isolate ever sees
of them), their values (in this host process only), the CA of the hosts they
are bound to, and the record of each request it made through the proxy,
taken by the run it belongs to (``take_records``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import secrets as random_tokens
import select
import sys
import termios
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..policy import Policy, SecretGrant
from ..ratelimit import TokenBucket
from ..result import EgressRequest, SecurityViolation
from . import PROXY_PORT
from .allowlist import Allowlist, HostRule, parse_rule
from .redact import Redactor, StreamRedactor, each_form

if TYPE_CHECKING:
    from .ca import SandboxCA

MAX_LOOKUPS = 4
MAX_RECORDS = 256  # per run; more are counted, not kept (a flood of requests must not grow a report)
MAX_REFUSALS_SAID = 1_000_000  # in one message of a worker's: a burst of refusals, counted
# New connections and name queries an isolate may make, per second, sustained (and in a burst): past
# them each is dropped unread (counted with the records not kept), so that a flood costs the host a
# counter, not a parse, a record and a message each. Far above what a package manager or crawler makes.
ADMIT_PER_S, ADMIT_BURST = 500.0, 1000.0
MAX_HOST_CHARS, MAX_PATH_CHARS, MAX_REASON_CHARS, MAX_METHOD_CHARS = 255, 1024, 512, 32  # of one record's fields
HANDLE_PREFIX = "stockade-secret-"
# Inside the isolate: the CA bundle the proxy's certificates verify against (written at hand-over).
CA_BUNDLE_PATH = "/tmp/stockade-ca-certificates.crt"

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Binding:
    grant: SecretGrant
    rules: tuple[HostRule, ...]
    handle: str
    value: str

    def binds(self, host: str, port: int) -> bool:
        return any(rule.matches(host, port) for rule in self.rules)


class Flow:
    """A request or a tunnel under way, in its sandbox's account from the moment it opens (before
    the isolate hears that it has): each run's account takes what it moved since the last (a tunnel
    a background process holds open spans runs, each charged with its own bytes), and a run whose
    process used it and ended at once is not left out while the proxy finishes with it. Its
    counters are the record's own, moved on the proxy's loop, taken under the gate's lock."""

    __slots__ = ("client", "done", "reading", "record", "taken")

    def __init__(self, record: EgressRequest, client: Any = None) -> None:
        self.record = record
        self.client = client  # a tunnel's socket from the isolate: what it sent and the proxy has not read
        self.reading = False  # a tunnel's pump waits for the isolate, nothing of it in hand
        self.done = False  # the isolate's side is over: its tunnel's end read, or its reply written whole
        # As last taken: bytes each way, status, reason, still open; None: never taken.
        self.taken: tuple[int, int, int | None, str, bool] | None = None

    def take(self, closing: bool) -> EgressRequest | None:
        """Its record for what happened since the last take (its end included: a tunnel taken open
        that then closed idle is said to have closed); None when there is nothing new."""
        r = self.record
        now = (r.bytes_sent, r.bytes_received, r.status, r.reason, not (closing or self.done))
        if now == self.taken:
            return None
        sent, received = self.taken[:2] if self.taken is not None else (0, 0)
        self.taken = now
        return dataclasses.replace(r, bytes_sent=r.bytes_sent - sent, bytes_received=r.bytes_received - received,
                                   open=now[4])  # fmt: skip

    def owed(self) -> int:
        """What of the isolate's this tunnel's socket holds that the proxy has not read yet (more
        may wait on the isolate's side, its socket's queue held back by this one's window)."""
        if self.client is None or self.done:
            return 0
        try:
            return int.from_bytes(fcntl.ioctl(self.client.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder)
        except OSError:
            return 0

    def ending(self) -> bool:
        """Whether the isolate's side has ended and the proxy has yet to read that it has."""
        if self.client is None or self.done:
            return False
        try:
            poller = select.poll()
            poller.register(self.client.fileno(), select.POLLRDHUP)
            return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))
        except OSError:
            return False


class Gate:
    def __init__(
        self,
        policy: Policy,
        values: Mapping[str, str],
        on_refused: Callable[[EgressRequest], None] | None = None,
        upstream_ca: str | None = None,
        pinned_hosts: str | None = None,
        refused: Iterable[str] = (),
    ) -> None:
        self.allowlist = Allowlist(policy.allowed_hosts, policy.allowed_cidrs, refused)  # refused: allowlist.peers
        self.upstream_ca = upstream_ca  # STOCKADE_EGRESS_CA_FILE's PEM: roots trusted upstream beside the host's
        # Lookups in flight for this sandbox: the resolver's threads are every sandbox's.
        self.resolving = asyncio.Semaphore(MAX_LOOKUPS)
        # STOCKADE_EGRESS_HOSTS_FILE's lines: names pinned ahead of DNS.
        self.pinned_hosts = tuple((pinned_hosts or "").splitlines())
        self.on_refused = on_refused
        self._admitted = TokenBucket(ADMIT_PER_S, ADMIT_BURST)
        self.bindings = tuple(
            Binding(
                g, tuple(parse_rule(h) for h in g.hosts), HANDLE_PREFIX + random_tokens.token_hex(16), values[g.name]
            )
            for g in policy.secrets
        )
        self.redactor = Redactor.markers({b.grant.name: b.value for b in self.bindings})
        # In a reply, each value goes back to its handle (head and body), counted with the run's others.
        self._to_handles = each_form({b.value: b.handle for b in self.bindings})
        self._reply_head = Redactor(self._to_handles, tally=self.redactor)
        self.ca: SandboxCA | None = None
        if self.bindings:
            from .ca import SandboxCA, new_label  # cryptography: loaded only for an isolate with secrets

            hosts = [rule.host for b in self.bindings for rule in b.rules]
            self.ca = SandboxCA(new_label(), hosts)
        self._lock = threading.Lock()
        self._records: list[EgressRequest] = []
        self._dropped = 0
        self._flows: set[Flow] = set()  # requests and tunnels under way

    # ---- what the isolate is given ------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The variables every run in the isolate gets: the proxy, the handles, the CA bundle."""
        proxy = f"http://127.0.0.1:{PROXY_PORT}"
        env = {name: proxy for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
        env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
        for binding in self.bindings:
            env[binding.grant.name] = binding.handle
        if self.ca is not None:
            for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "PIP_CERT", "NODE_EXTRA_CA_CERTS"):
                env[name] = CA_BUNDLE_PATH
        return env

    # ---- what the proxy asks ------------------------------------------------------------

    def bound(self, host: str, port: int) -> bool:
        """Whether a secret is bound to ``host:port``: its TLS is terminated to substitute."""
        return any(b.binds(host, port) for b in self.bindings)

    def substitute(
        self, host: str, port: int, headers: list[tuple[bytes, bytes]]
    ) -> tuple[list[tuple[bytes, bytes]], list[str]]:
        """``headers`` with each bound header that carries its secret's handle rewritten to the
        grant's format filled with the value; and the names of the secrets used. A handle
        anywhere else (another header, another host, the body) is sent as it is. The proxy asks
        only for requests whose TLS it terminated and whose host it verified: never plain HTTP."""
        used: list[str] = []
        out = list(headers)
        for binding in self.bindings:
            if not binding.binds(host, port):
                continue
            wanted = binding.grant.header.lower().encode()
            handle = binding.handle.encode()
            for i, (name, value) in enumerate(out):
                if name.lower() == wanted and handle in value:
                    out[i] = (name, binding.grant.format.replace("{value}", binding.value).encode())
                    if binding.grant.name not in used:
                        used.append(binding.grant.name)
        return out, used

    def redact_reply(self, data: bytes) -> bytes:
        """A reply's head (a header value, the reason): each value back to its handle, counted."""
        return self._reply_head.bytes(data)

    def in_header_name(self, name: bytes) -> bool:
        """Whether a reply's header name carries a value (in any case: names are case-blind)."""
        return self._reply_head.found_in_any_case(name)

    def reply_redactor(self) -> StreamRedactor | None:
        """For a reply body passing through the proxy: each value back to its handle."""
        if not self.bindings:
            return None
        return StreamRedactor(self._to_handles)

    # ---- what it did --------------------------------------------------------------------

    def record(self, request: EgressRequest) -> None:
        """A request refused, or one that failed before it was under way."""
        with self._lock:
            self._keep(request)
        if not request.allowed and self.on_refused is not None:
            self.on_refused(request)

    def drop(self) -> None:
        """A request dropped unanswered (not one the isolate could have meant): counted, not recorded."""
        with self._lock:
            self._dropped += 1

    def admit(self, now: float) -> bool:
        """Whether a new connection or name query (at ``now``, monotonic seconds) is served; one
        past the rate is dropped unread, and counted as a request not recorded."""
        with self._lock:
            if self._admitted.take(1.0, now):
                return True
            self._dropped += 1
            return False

    def open_flow(self, record: EgressRequest, client: Any = None) -> Flow:
        flow = Flow(record, client)
        with self._lock:
            self._flows.add(flow)
        return flow

    def close_flow(self, flow: Flow) -> None:
        """What it did since it was last taken (all of it, never taken while under way) recorded."""
        with self._lock:
            self._flows.discard(flow)
            self._keep(flow.take(closing=True))

    def close_refused(self, flow: Flow, reason: str) -> None:
        """A tunnel refused for what it carried once open: its record a refusal (counted as one)."""
        with self._lock:
            flow.record.allowed, flow.record.reason = False, reason
            self._flows.discard(flow)
            self._keep(flow.take(closing=True))
        if self.on_refused is not None:
            self.on_refused(flow.record)

    def open_flows(self) -> list[Flow]:
        with self._lock:
            return list(self._flows)

    def take_records(self) -> tuple[list[EgressRequest], int]:
        """The run's records: each request and tunnel that ended since the last take, and what each
        still under way did since then (``open``)."""
        with self._lock:
            for flow in self._flows:
                self._keep(flow.take(closing=False))
            records, self._records = self._records, []
            dropped, self._dropped = self._dropped, 0
        return records, dropped

    def _keep(self, record: EgressRequest | None) -> None:
        if record is None:
            return
        if record.reason and self.redactor:
            record.reason = self.redactor.text(record.reason)  # whatever a reason quoted, never a value
        # Bounded, whatever the isolate asked for: 256 records fit the worker's answer to its keeper.
        record.host, record.reason = record.host[:MAX_HOST_CHARS], record.reason[:MAX_REASON_CHARS]
        record.method = record.method[:MAX_METHOD_CHARS]  # the isolate's token: up to a whole head's 16 KiB
        if record.path is not None:
            record.path = record.path[:MAX_PATH_CHARS]
        if len(self._records) < MAX_RECORDS:
            self._records.append(record)
        else:
            self._dropped += 1


def refused_violation(request: EgressRequest) -> SecurityViolation:
    """The violation a refused request counts as, in its sandbox's report."""
    return SecurityViolation(
        violation_type="network_egress",
        detection_layer="NETWORK",
        description=f"{request.method} {request.host}:{request.port} refused: {request.reason}",
    )
