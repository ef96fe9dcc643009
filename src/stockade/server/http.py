"""The HTTP API served by uvicorn inside the daemon's own event loop.

One loop holds both doors and the controller: an HTTP request reaches a
sandbox with no thread hop and no second process. uvicorn's own signal
handling is turned off; the daemon's loop owns SIGTERM and stops this
server first, letting its requests finish within the daemon's grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from ..daemon.config import DaemonConfig
from ..daemon.controller import Controller
from ..daemon.observers import Observers
from ..errors import ConfigError
from .app import create_app
from .connections import MAX_CONNECTIONS, guarded_protocol
from .door import HttpDoor

log = logging.getLogger("stockade.daemon")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The daemon's loop has its own handlers for SIGTERM and SIGINT; it stops this server.
        yield


class HttpService:
    def __init__(self, server: _Server, task: asyncio.Task[None], address: tuple[str, int]) -> None:
        self.server, self.task, self.address = server, task, address

    @property
    def url(self) -> str:
        host = f"[{self.address[0]}]" if ":" in self.address[0] else self.address[0]
        return f"http://{host}:{self.address[1]}"

    def stop_accepting(self) -> None:
        """Take no new connection; requests under way go on (``close`` ends them).

        uvicorn starts its own wait for them now, bounded by a timeout it reads now:
        set first, or that wait would have none."""
        self.server.config.timeout_graceful_shutdown = 1
        self.server.should_exit = True

    async def close(self, grace_s: float) -> None:
        """Stop accepting; requests in progress have ``grace_s`` to answer."""
        self.server.config.timeout_graceful_shutdown = max(1, int(grace_s))
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), grace_s + 5)
        except TimeoutError:
            self.server.force_exit = True
            await self.task


def bind(config: DaemonConfig) -> socket.socket:
    """The HTTP API's listening socket (port 0: any free one): bound as the daemon starts, before
    its Unix socket and before it gives root up (a port below 1024, a busy one, refused first)."""
    assert config.http is not None
    host, port = config.http
    return _bind(host, port, config.http_stall_timeout)


def _bind(host: str, port: int, stall_timeout_s: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, named: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it an answer written in two parts waits out the client's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A client that stops reading an answer (its window closed, or gone without a word)
        # would hold it, and the HTTP API's share of unread answers (daemon/answers.py), for
        # as long as its connection stays open: the kernel drops a connection that has taken
        # none of what was sent to it for this long (zero-window probes included). Accepted
        # connections inherit it; an idle one is not affected.
        stall_ms = min(int(stall_timeout_s * 1000), 2**31 - 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, stall_ms))
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot serve the HTTP API on {host}:{port}: {exc.strerror or exc}") from None
    return sock


async def start(config: DaemonConfig, controller: Controller, observers: Observers, sock: socket.socket) -> HttpService:
    """Serve the API on this loop, on ``sock`` (``bind``'s)."""
    door = HttpDoor(
        controller,
        observers,
        config.secret("api_token"),
        metrics_token=config.secret("metrics_token"),
        client_rps=config.max_requests,
        agent_rps=config.agent_max_requests,
        health=lambda: sorted(controller.working_runtimes),
        max_body_bytes=config.max_request_bytes,
        body_timeout_s=config.http_header_timeout,
    )
    server = _Server(
        uvicorn.Config(
            create_app(door),
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            proxy_headers=False,  # a client's address is its socket's: no X-Forwarded-For is believed
            # No WebSocket routes: an upgrade handed to a WebSocket protocol left its HTTP connection's
            # count behind (connections.py), 128 of them shutting a client network out for good.
            ws="none",
            # Connections capped (in all, per client network) and their request heads timed.
            http=guarded_protocol(config.http_header_timeout, config.http_max_per_network),
            # Requests under way past it are answered 503 at once: each one holds memory. (Connections
            # past MAX_CONNECTIONS are closed before they ask; this counts requests.)
            limit_concurrency=MAX_CONNECTIONS + 1,
        )
    )
    task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise ConfigError("the HTTP API stopped as it started")
        await asyncio.sleep(0.01)
    service = HttpService(server, task, sock.getsockname()[:2])
    if config.api_token:
        log.info("HTTP API on %s (bearer token)", service.url)
    else:
        log.info("HTTP API on %s (no token: loopback only)", service.url)
        log.warning(
            "the HTTP API has no token: every local user can run code through it, whatever the Unix "
            "socket's mode, allowed uids or HMAC token say (set STOCKADE_API_TOKEN to require one)"
        )
    return service
