"""The MCP doors (gateway, serve) on streamable HTTP: loopback only, a bearer token on every request.

The SDK's session manager does the protocol (sessions, SSE, DNS-rebinding checks on ``Host``
and ``Origin``); in front of it, each request must carry ``Authorization: Bearer <token>``
(compared in constant time) or is answered 401. The address must be a loopback one: an MCP
door reached from elsewhere belongs behind a proxy with TLS, which stockade does not do.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import uvicorn
from mcp.server.lowlevel import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS, LATEST_HANDSHAKE_VERSION
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from ..errors import ConfigError
from ..server.connections import MAX_CONNECTIONS, guarded_protocol

PATH = "/mcp"
SESSION_IDLE_S = 1800.0
HEADER_TIMEOUT_S = 10.0  # for a whole request head (server/connections.py)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT``) on a loopback address; ConfigError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--http {address}: not HOST:PORT")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"--http {address}: the MCP doors listen on loopback only (127.0.0.1, ::1, localhost)")
    return host, int(port)


class _Asgi:
    """An ASGI callable that Starlette's Route takes as an app, not as a request handler."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class _BearerOnly:
    """An ASGI app that lets through only requests with the token."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = JSONResponse({"error": "a bearer token is required"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _SessionsOnly:
    """For a door that keeps state per MCP session (``mcp serve``): a request on the stateless
    wire (a ``MCP-Protocol-Version`` past the handshake's, 2026-07-28) is refused, since the SDK
    serves it with no session at all and checks no ``Mcp-Session-Id`` it names; a session the
    client ends (``DELETE``) is told to ``ended`` once the SDK has ended it."""

    def __init__(self, app: Any, ended: Callable[[str], Awaitable[None]]) -> None:
        self.app = app
        self.ended = ended

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers: dict[bytes, list[bytes]] = {}
        for name, value in scope.get("headers") or []:
            headers.setdefault(name, []).append(value)
        said = None
        if any(len(headers.get(name, ())) > 1 for name in (b"mcp-session-id", b"mcp-protocol-version")):
            # One to the SDK, another to the door: a DELETE of one's own session ending another's sandbox.
            said = "a request names one session and one protocol version at most"
        given = headers.get(b"mcp-protocol-version")
        version = b"".join(given or []).decode("latin-1")
        if given is not None and version not in HANDSHAKE_PROTOCOL_VERSIONS:  # an empty one too, as the SDK reads it
            said = (f"protocol version {version[:40]!r} has no sessions, and this door keeps a sandbox per MCP "
                    f"session: connect with a session (protocol version {LATEST_HANDSHAKE_VERSION})")  # fmt: skip
        if said is not None:
            error = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": said}}
            await JSONResponse(error, status_code=400)(scope, receive, send)
            return
        status = 0

        async def watched(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watched)
        session = b"".join(headers.get(b"mcp-session-id", [])).decode("latin-1")
        if scope.get("method") == "DELETE" and session and 200 <= status < 300:
            await self.ended(session)


async def serve_http(
    server: Server[Any],
    address: str,
    token: str,
    session_ended: Callable[[str], Awaitable[None]] | None = None,
    session_idle_s: float | None = SESSION_IDLE_S,
) -> None:
    """``server`` at ``http://HOST:PORT/mcp`` until this task is cancelled; the URL goes to stderr.
    ``session_ended``: for a door that keeps state per session (``_SessionsOnly``); sessions end
    after ``session_idle_s`` without a request (None: only when the client ends them)."""
    host, port = parse_address(address)
    if len(token) < 16:
        raise ConfigError("the MCP door's token is shorter than 16 characters: `stockade token new --file F` makes one")
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{name}:*" for name in ("127.0.0.1", "localhost", "[::1]")],
        allowed_origins=[f"http://{name}:*" for name in ("127.0.0.1", "localhost", "[::1]")],
    )
    manager = StreamableHTTPSessionManager(app=server, security_settings=security, session_idle_timeout=session_idle_s)
    endpoint: Any = manager.handle_request
    if session_ended is not None:
        endpoint = _SessionsOnly(endpoint, session_ended)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    # A Route, not a Mount: /mcp itself is the endpoint (a Mount would redirect it to /mcp/).
    app = Starlette(routes=[Route(PATH, endpoint=_Asgi(endpoint))], lifespan=lifespan)
    config = uvicorn.Config(
        _BearerOnly(app, token),
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        # As the daemon's HTTP API: connections capped, and each must send its request head in time.
        http=guarded_protocol(HEADER_TIMEOUT_S),
        limit_concurrency=MAX_CONNECTIONS + 1,
    )
    web = uvicorn.Server(config)

    async def announce() -> None:
        while not web.started:
            await anyio.sleep(0.02)
        bound = web.servers[0].sockets[0].getsockname()
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        print(f"stockade: MCP on http://{shown}:{bound[1]}{PATH}", file=sys.stderr, flush=True)

    async def stop_on_signal() -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                web.should_exit = True  # then the sessions end, and the caller closes what they held
                return

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(announce)
        tasks.start_soon(stop_on_signal)
        await web.serve()
        tasks.cancel_scope.cancel()
