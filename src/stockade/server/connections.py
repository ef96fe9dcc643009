"""What the HTTP API's connections may hold before they have asked anything.

uvicorn takes every connection the kernel hands it and waits for its request
head for ever; its concurrency limit answers requests 503, but only once they
have come. So idle connections, which pass no token check, could hold every
request slot (each one's 503) and then every descriptor of the daemon, its
Unix socket and its isolates included. Here a connection is answered 503 and
closed as it opens when the server already holds ``MAX_CONNECTIONS``, or its
cap (``STOCKADE_HTTP_MAX_PER_NETWORK``) from the client's network (an IPv4
/24, an IPv6 /64), and a request head must be complete within the header
timeout of the connection's start (or of the end of its last answer, for a
kept-alive one), and hold at most ``MAX_HEAD_BYTES`` (httptools gathers a
header whole before it hands it on, and uvicorn keeps each: a head of 24 MiB
of short headers took 400 MiB of the daemon's memory). The body's time is
the door's (``server/door.py``); a request under way is not timed here: its
answer is its own (the stall timeout covers a client that stops reading it).
There is no WebSocket: uvicorn runs with ``ws="none"`` (``http.py``), and the
door refuses a request that asks for an upgrade (``door.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..ratelimit import peer_network

log = logging.getLogger("stockade.daemon")
MAX_CONNECTIONS = 1024
MAX_PER_NETWORK = 128  # the default of STOCKADE_HTTP_MAX_PER_NETWORK (settings.py, which imports no uvicorn)
REFUSAL_LOG_EVERY_S = 60.0  # a flood of refused connections is said once a minute, not per connection
MAX_HEAD_BYTES = 64 << 10  # a request's line and headers


class _Refusals:
    """How many connections were closed unheard since the last time that was logged."""

    def __init__(self) -> None:
        self.count = 0
        self.logged_at = -REFUSAL_LOG_EVERY_S

    def note(self, now: float, why: str) -> None:
        self.count += 1
        if now - self.logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning("HTTP API: closed %d connection(s) unheard (%s)", self.count, why)
            self.count, self.logged_at = 0, now


_refusals = _Refusals()


# Said to a connection refused as it opens, before it is read: a client retries a 503 as it would not
# a reset. (The bytes fit any socket buffer: the descriptor goes at once.)
def _answer(status: str, error: str, code: str, *headers: str) -> bytes:
    """A whole answer in the API's shape (``{error, code}``), its length counted."""
    body = json.dumps({"error": error, "code": code}).encode() + b"\n"
    head = [f"HTTP/1.1 {status}", "Connection: close", *headers, "Content-Type: application/json",
            f"Content-Length: {len(body)}"]  # fmt: skip
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


REFUSED = _answer("503 Service Unavailable", "too many connections open", "busy", "Retry-After: 1")
HEAD_TOO_LARGE = _answer(
    "431 Request Header Fields Too Large", "the request line and headers are larger than 64 KiB", "too_large"
)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the connection caps and the header timeout above."""

    header_timeout_s = 10.0  # set per server by ``guarded_protocol``
    max_per_network = MAX_PER_NETWORK
    open_per_network: dict[str, int] = {}  # each server's class has its own (guarded_protocol)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._network: str | None = None  # counted in open_per_network while set
        self._head_bytes: int | None = 0  # of the head being read; None: none is (a body, an answer)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        network = peer_network(self.client[0] if self.client else None)
        self.open_per_network[network] = self.open_per_network.get(network, 0) + 1
        self._network = network
        why = None
        if len(self.connections) > MAX_CONNECTIONS:
            why = f"{MAX_CONNECTIONS} connections open"
        elif self.open_per_network[network] > self.max_per_network:
            why = f"{self.max_per_network} connections open from {network}"
        if why is not None:
            _refusals.note(self.loop.time(), why)
            transport.write(REFUSED)
            transport.close()  # connection_lost forgets it
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        # Fed in pieces no longer than the head being read has room for: a head still incomplete
        # at its cap is refused. A request that ends inside a piece starts the next head's count
        # at 0 (what of that head the piece held goes uncounted: at most one cap's worth more).
        while data:
            if self._head_bytes is None:  # a body, or an answer being sent: nothing to count
                super().data_received(data)
                return
            room = MAX_HEAD_BYTES - self._head_bytes
            if room <= 0:
                if not self.transport.is_closing():
                    self.transport.write(HEAD_TOO_LARGE)
                    self.transport.close()
                return
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            super().data_received(piece)
            if self.transport.is_closing():
                return

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_bytes = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_bytes = 0  # the next request's head, pipelined or kept alive
        super().on_message_complete()

    def _unsupported_upgrade_warning(self) -> None:
        """Quiet: a request that asks for an upgrade is answered (refused, by the door) without a log
        line per request for any client to fill the log with."""

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a request that came already starts now: not to be timed
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._arm()  # kept alive: the next head is timed from here

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._network is not None:
            left = self.open_per_network[self._network] - 1
            if left:
                self.open_per_network[self._network] = left
            else:
                del self.open_per_network[self._network]
            self._network = None
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(header_timeout_s: float, max_per_network: int = MAX_PER_NETWORK) -> type[GuardedHttpProtocol]:
    """The protocol class for one server: its header timeout, its cap per client network."""
    fields = {"header_timeout_s": header_timeout_s, "max_per_network": max_per_network, "open_per_network": {}}
    return type("GuardedHttpProtocol", (GuardedHttpProtocol,), fields)
