"""The egress proxy: an isolate's only way out under ``network_policy: "allowlist"``.

The isolate's network namespace has its loopback and nothing else; the proxy
listens on that loopback (the runtime creates the listening socket inside the
namespace, then the host serves it), so a program that ignores
``HTTP(S)_PROXY`` has nowhere to go. For each connection:

- ``CONNECT host:port`` (HTTPS): the host must be allowed; the proxy resolves
  it, keeps only addresses it may reach (allowlist.py) and connects to one of
  them. A host a secret is bound to has its TLS terminated with the sandbox's
  CA (ca.py) and its requests relayed over verified TLS upstream, with the
  secret put into the bound header (gate.py); any other is a plain tunnel.
- ``GET http://host/...`` (plain HTTP, absolute form): checked the same way,
  relayed request by request, bound headers substituted.
- Anything else (another method without a host, a malformed request, a
  refused host) is answered with an error and recorded; a refused host also
  counts as a violation (``detection_layer: "NETWORK"``).

It runs in the sandbox's egress worker (worker.py): one asyncio loop in a thread of its own;
each connection is an ``Exchange`` (exchange.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .dns import NameService
from .exchange import MAX_HEAD_BYTES, Exchange
from .gate import Flow, Gate
from .resolver import lookup

log = logging.getLogger("stockade.egress")
MAX_CONNECTIONS = 64  # open at once per gate: more are refused
# A run's account waits this long at most for its tunnels' last bytes (within the keeper's TAKE_TIMEOUT_S).
SETTLE_MOST_S = 1.0


class EgressProxy:
    """The event loop every gate of this process is served on (``proxy()``)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="stockade-egress", daemon=True)
        self._thread.start()

    def serve(self, gate: Gate, listener: socket.socket, names: socket.socket | None = None) -> Callable[[], None]:
        """Serve ``listener`` (a TCP socket listening in the isolate's namespace) and ``names`` (its
        UDP socket for name service, dns.py) for ``gate``; returns what stops both."""
        listener.setblocking(False)
        tasks: set[asyncio.Task[Any]] = set()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if len(tasks) >= MAX_CONNECTIONS or task is None or not gate.admit(time.monotonic()):
                writer.transport.abort()  # past the cap or the isolate's rate: closed unread
                return
            tasks.add(task)
            sock = writer.get_extra_info("socket")
            if sock is not None:  # asyncio leaves Nagle on for a socket it accepts from a listener it was given
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                await Exchange(gate, reader, writer).run()
            except Exception:
                log.debug("egress connection failed", exc_info=True)
            finally:
                tasks.discard(task)
                writer.transport.abort()

        async def start() -> tuple[asyncio.AbstractServer, asyncio.DatagramTransport | None]:
            server = await asyncio.start_server(handle, sock=listener, limit=MAX_HEAD_BYTES)
            if names is None:
                return server, None
            names.setblocking(False)
            service = NameService(gate, functools.partial(lookup, gate))
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: service, sock=names)
            return server, transport

        server, name_service = asyncio.run_coroutine_threadsafe(start(), self.loop).result(timeout=10)

        def stop() -> None:
            async def close() -> None:
                server.close()
                if name_service is not None:
                    name_service.close()
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            if self.loop.is_running():
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(close(), self.loop).result(timeout=10)

        return stop

    def settle(self, gate: Gate) -> None:
        """Wait for what the isolate has sent into its open tunnels to pass: a run's account is
        asked for as its process ends, while the proxy may still be reading what it sent last.
        Waited for until each tunnel has ended or is quiet (nothing of the isolate's unread, no end
        unread) twice in a row, ``SETTLE_MOST_S`` at most: not the stream of a background process
        the host takes slowly. What is still to come is the next account's."""

        def quiet(flow: Flow) -> bool:
            return flow.done or (flow.reading and flow.owed() == 0 and not flow.ending())

        async def caught_up() -> None:
            end, in_a_row = time.monotonic() + SETTLE_MOST_S, 0
            while in_a_row < 2 and time.monotonic() < end:
                in_a_row = in_a_row + 1 if all(quiet(f) for f in gate.open_flows() if f.client) else 0
                await asyncio.sleep(0.002)

        if any(f.client for f in gate.open_flows()) and self.loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(caught_up(), self.loop).result(timeout=SETTLE_MOST_S + 1)


_proxy: EgressProxy | None = None
_proxy_lock = threading.Lock()


def proxy() -> EgressProxy:
    global _proxy
    with _proxy_lock:
        if _proxy is None:
            _proxy = EgressProxy()
        return _proxy
