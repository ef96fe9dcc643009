"""What stands in front of every HTTP route: host, rate, token and body checks, and the errors.

``Guard`` is plain ASGI (not ``BaseHTTPMiddleware``, which runs the route in a
task of its own and relays its messages: that hides a client's disconnect from
a streamed response and from ``until_disconnect``, and a run must end with its
client). In order, for every route but the open ones:

1. ``Host``: without a token, only this host's own names are served, so a web
   page that re-points its domain at 127.0.0.1 (DNS rebinding) reaches nothing.
2. The client's rate (``STOCKADE_MAX_REQUESTS`` per second, per address),
   before the token, so that a flood of bad tokens is bounded too.
3. The bearer token, compared with ``hmac.compare_digest``. SandboxFusion's
   routes also take it as ``?token=``: its clients are configured with a URL
   and send no header.
4. The body, read here up to ``STOCKADE_MAX_REQUEST_BYTES`` whatever length it
   claims, so a client cannot make the daemon hold more.
5. The answers its clients have not read: a body over 64 KiB goes out in pieces,
   each once the client has taken most of the last, and counts in the daemon's
   budget for them until the client has taken all but 64 KiB; no new work is
   taken while they fill the HTTP API's share ("busy", 503), but control and
   status calls are (a cancel, a close, an interrupt, the status, the metrics).

Client addresses are the socket's: no ``X-Forwarded-For`` is believed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..daemon.controller import Controller
from ..daemon.methods import METHODS
from ..daemon.observers import Observers
from ..errors import (
    HTTP_STATUS,
    AuthenticationError,
    CallTooLargeError,
    InvalidRequestError,
    RateLimitError,
    StockadeError,
    error_code,
    public_message,
    wire_errno,
)
from ..protocol.models import Caller
from ..ratelimit import SlidingWindowLimiter, peer_network
from ..rpc.methods import answer, read_request
from .bodies import BodyBudget

log = logging.getLogger("stockade.daemon")
# Answered to anyone, uncounted: health checks (ours, SandboxFusion's) and the dashboard's
# page, which asks for the token itself.
OPEN_PATHS = frozenset(
    {"/health", "/ready", "/v1/ping", "/", "/favicon.ico", "/static/dashboard.js", "/static/dashboard.css"}
)
METRICS_PATH = "/metrics"  # the one route the metrics token opens
# Routes whose clients cannot send a header (SandboxFusion's): the token may come as ``?token=``.
QUERY_TOKEN_PATHS = frozenset({"/run_code"})
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Sec-Fetch-Site values of a request a browser sent for this server's own page, or for its user's
# own act (an address typed, a bookmark): the dashboard's.
SAME_SITE_FETCHES = frozenset({"same-origin", "none"})
# Polled, not asked: no log line each (a scrape every 15 s, a health check, the dashboard's files).
QUIET_PATHS = OPEN_PATHS | {"/metrics", "/api/v1/sandbox/status", "/api/v1/dashboard"}


class ErrorBody(BaseModel):
    error: str
    code: str
    errno: int | None = None  # a file call's OS error in the sandbox (its stdlib class, as the socket's)


def error_response(exc: BaseException) -> JSONResponse:
    code = error_code(exc)
    message = public_message(exc)
    headers = {}
    if isinstance(exc, RateLimitError):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after)))
    elif code in ("busy", "unavailable"):
        headers["Retry-After"] = "1"
    elif isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    body: dict[str, object] = {"error": message, "code": code}
    number = wire_errno(exc)
    if number is not None:
        body["errno"] = number
    return JSONResponse(body, status_code=HTTP_STATUS[code], headers=headers)


BODY_PIECE = 1 << 20  # a counted body goes out in pieces of this size
BODY_MIN_RATE = 64 << 10  # bytes a second a request body must come at, at least (a 16 MiB one: 266 s)
COUNTED_BODY = 64 << 10  # bodies larger than this are counted (a smaller one waits in uvicorn's buffer)
# The HTTP API's one principal, who owns what it holds (see ``HttpDoor.caller``).
HTTP_OWNER = "http"


class HttpDoor:
    """What the HTTP API keeps between requests: its token, its rate windows, its observers."""

    def __init__(
        self,
        controller: Controller,
        observers: Observers,
        token: str | None,
        client_rps: int,
        agent_rps: int,
        health: Callable[[], list[str]],
        max_body_bytes: int = 16 * 1024 * 1024,
        host_names: frozenset[str] = LOOPBACK_NAMES,
        body_timeout_s: float = 10.0,
        metrics_token: str | None = None,
    ) -> None:
        self.controller = controller
        self.observers = observers
        self.token = token.encode() if token else None
        # A scraper's: it reads the metrics, and runs nothing (Prometheus need not hold the API's token).
        self.metrics_token = metrics_token.encode() if metrics_token else None
        self.per_client = SlidingWindowLimiter(client_rps)
        self.per_agent = SlidingWindowLimiter(agent_rps)
        self.runtimes_available = health
        self.max_body_bytes = max_body_bytes
        self.host_names = host_names | LOOPBACK_NAMES
        self.body_timeout_s = body_timeout_s  # and a second per BODY_MIN_RATE bytes it declares
        self.bodies = BodyBudget()  # what requests' bodies being read hold, in all and by network

    @staticmethod
    def caller(request: Request) -> Caller:
        """Who asks: the HTTP API's one principal (whoever holds the token), from this address.

        Its sandboxes and runs are all the HTTP API's; the address goes to the audit log.
        """
        return Caller(HTTP_OWNER, "http", waits=False, peer=client_address(request))

    def check_host(self, request: Request) -> None:
        if self.token is not None:
            return  # the token decides; a proxy may name the service as it likes
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1 : host.find("]")]
        if name not in self.host_names:
            raise AuthenticationError(
                f"Host {host[:64]!r} is not this server: without an API token only its loopback names are served"
            )

    def check_site(self, request: Request) -> None:
        """A request another site's page had a browser send is refused (with a token, only one of
        another site altogether).

        A page can have its visitor's browser send a request to this server (a form, an image,
        ``fetch`` in ``no-cors`` mode) with a body but none of its headers: without a token,
        nothing else tells it from a local program's. The browser says whose page asked: in
        ``Sec-Fetch-Site`` (``same-site`` is another port of this host: another local server's
        page), or, where it sends none, in ``Origin``, against ``Host``. A program that is no
        browser sends neither header."""
        site = request.headers.get("sec-fetch-site")
        if self.token is not None:
            # No other site's page can send the token, but a gateway that adds it for a page may:
            # one of a sibling site (same-site) is served, another site's is not.
            if site is not None and site.strip().lower() == "cross-site":
                raise AuthenticationError("refused: a page of another site had a browser send this request")
            return
        if site is not None:
            if site.strip().lower() not in SAME_SITE_FETCHES:
                raise AuthenticationError(
                    f"refused: a page of another site had a browser send this request (Sec-Fetch-Site: {site[:32]!r})"
                )
            return  # the browser's own word, which no page can change: Origin may be "null" then
        origin, host = request.headers.get("origin"), request.headers.get("host", "")
        if origin is None:
            return
        page = _origin_of(origin)
        if page is None or page != _origin_of(f"{request.scope['scheme']}://{host}"):
            raise AuthenticationError(
                f"refused: a page of another origin ({origin[:64]!r}, not this server's {host[:64]!r}) had a "
                "browser send this request"
            )

    def check_origin(self, request: Request) -> None:
        """``check_host`` and ``check_site``; a refusal is rated and recorded as a wrong token is (a
        page that had a browser send it, a rebound name: the audit log is where that shows)."""
        try:
            self.check_host(request)
            self.check_site(request)
        except AuthenticationError:
            self.check_rate(request, authenticated=False)
            self.observers.auth_failure("http", client_address(request), f"{routed_path(request)} (host or site)")
            raise

    def authenticated(self, request: Request) -> bool:
        """Whether ``request`` carries the token (any request does when there is none)."""
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" and routed_path(request) in QUERY_TOKEN_PATHS:
            value, scheme = request.query_params.get("token", ""), "bearer"
        if scheme.lower() != "bearer":
            return False
        presented = value.strip().encode()
        if hmac.compare_digest(presented, self.token):
            return True
        return (
            self.metrics_token is not None
            and request.method in ("GET", "HEAD")
            and routed_path(request) == METRICS_PATH
            and hmac.compare_digest(presented, self.metrics_token)
        )

    def refuse_token(self, request: Request) -> None:
        self.observers.auth_failure("http", client_address(request), routed_path(request))
        if routed_path(request) in QUERY_TOKEN_PATHS:
            raise AuthenticationError(
                "Authentication failed: a valid 'Authorization: Bearer <token>' or '?token=<token>' is required"
            )
        raise AuthenticationError("Authentication failed: a valid 'Authorization: Bearer <token>' is required")

    def check_rate(self, request: Request, authenticated: bool = True) -> None:
        # By the client's network, as connections are counted: one host has many addresses. Requests
        # without the token draw on a window of their own: every local user shares loopback's, and
        # one who floods it with wrong tokens must not have the token's holder refused.
        network = peer_network(client_address(request))
        key = network if authenticated else f"{network} (no token)"
        if not self.per_client.allow(key):
            raise RateLimitError(f"Rate limit exceeded for client network {key}", self.per_client.wait_s(key))

    def check_agent(self, agent_id: str | None) -> None:
        if agent_id is not None and not self.per_agent.allow(agent_id):
            raise RateLimitError(f"Rate limit exceeded for agent_id {agent_id!r}", self.per_agent.wait_s(agent_id))

    async def call(self, name: str, params: dict[str, Any], caller: Caller, on_output: Any = None) -> Any:
        """One method of the shared table (``daemon/methods.py``), as the Unix socket calls it."""
        method = METHODS[name]
        return await answer(method, self.controller, read_request(method, params), caller, on_output, self.observers)


def _origin_of(url: str) -> tuple[str, str, int] | None:
    """``url``'s scheme, host and port, the port its scheme's default where none is named (so
    that ``http://localhost`` is ``localhost:80``); None for what names no origin (``null``)."""
    scheme, sep, rest = url.strip().lower().partition("://")
    if not sep or scheme not in ("http", "https") or not rest or "/" in rest:
        return None
    host, colon, port = rest.rpartition(":") if not rest.endswith("]") else (rest, "", "")
    if not colon:
        host, port = rest, ""
    if not port:
        return scheme, host, 443 if scheme == "https" else 80
    if not (port.isascii() and port.isdigit() and len(port) <= 5 and int(port) <= 65535):  # "²" is a digit too
        return None
    return scheme, host, int(port)


def _small_answer(request: Request) -> bool:
    """A control or status call (cancel, close, interrupt, status, a sandbox's description, the
    metrics): taken even while the HTTP API's unread answers fill its share, as on the socket."""
    path = routed_path(request)
    if request.method == "DELETE" or path in ("/api/v1/sandbox/status", "/metrics") or path.endswith("/interrupt"):
        return True
    return request.method == "GET" and path.startswith("/api/v1/sandboxes/") and path.count("/") == 4


def routed_path(request: Request) -> str:
    """The path the router dispatches on: the request line's. Never ``request.url.path``, which a
    Starlette before 1.0.1 rebuilt from the Host header (``Host: x/health?`` named an open path
    while the router ran the asked one: CVE-2026-48710)."""
    path: str = request.scope["path"]
    return path


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


class Guard:
    """The checks above, and the request metrics, around every route."""

    def __init__(self, app: ASGIApp, door: HttpDoor) -> None:
        self.app, self.door = app, door

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # nothing but HTTP reaches the routes (no WebSocket is served, the lifespan is off)
        started = time.monotonic()
        status = 500
        headers_done = False
        code: str | None = None  # an error's, as its body names it: the metrics' label, as on the socket

        async def send_noting(message: Message) -> None:
            nonlocal status, headers_done, code
            if message["type"] == "http.response.body" and status >= 400 and code is None:
                code = _error_code(message.get("body", b""))  # and sent as any body is, below
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [*message.get("headers", []), (b"x-content-type-options", b"nosniff")]
                if not any(name.lower() == b"cache-control" for name, _ in headers):
                    # What an answer holds (runs' output, files, another owner's counts) is no cache's to keep.
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
                headers_done = True
            elif message["type"] == "http.response.body" and len(body := message.get("body", b"")) > COUNTED_BODY:
                # A send returns once its bytes are written to the connection, where they wait
                # for the client; the next waits for it to have read all but 64 KiB of them
                # (uvicorn's flow control). So a body waits in pieces, here, counted, and the
                # count ends with an empty last piece, once the client has taken the others.
                more = message.get("more_body", False)
                with self.door.controller.answers.hold(len(body), HTTP_OWNER):
                    for start in range(0, len(body), BODY_PIECE):
                        await send({**message, "body": body[start : start + BODY_PIECE], "more_body": True})
                    await send({**message, "body": b"", "more_body": more})
                return
            await send(message)

        request = Request(scope)
        held = _Held(peer_network(request.client.host if request.client is not None else None))
        try:
            _refuse_an_upgrade(request)
            if routed_path(request) in OPEN_PATHS:
                _refuse_a_body(request)  # answered to anyone: nothing of theirs is waited for
            else:
                authenticated = self.door.authenticated(request)
                self.door.check_origin(request)
                self.door.check_rate(request, authenticated)
                if not authenticated:
                    self.door.refuse_token(request)
                if not _small_answer(request):
                    self.door.controller.answers.refuse_new(HTTP_OWNER)
            receive = await self._bounded_body(scope, receive, held)
        except _HungUp:
            pass  # no answer: counted and logged as a hang-up below
        except StockadeError as exc:
            await error_response(exc)(scope, receive, send_noting)
        else:
            try:
                await self.app(scope, receive, send_noting)
            except Exception:
                if not headers_done:  # the server answers 500 once this is raised on: not a hang-up
                    code, status, headers_done = "internal", 500, True
                raise
        finally:
            self.door.bodies.give_back(held.network, held.size)
            route = scope.get("route")
            name = getattr(route, "name", None) or ("auth" if status == 401 else "unknown")
            if not headers_done or status == 499:
                code = "hung_up"  # the client went before its answer
            elif status < 400:
                code = "ok"
            code = code or str(status)
            elapsed = time.monotonic() - started
            self.door.observers.request("http", name, code, elapsed)
            if routed_path(request) not in QUIET_PATHS:  # as the socket's lines; never a body, a query or a token
                log.info("http %s %s %s %s (%d) %.1fms", client_address(request), request.method, name, code,
                         status if headers_done else 499, elapsed * 1000)  # fmt: skip

    async def _bounded_body(self, scope: Scope, receive: Receive, held: _Held) -> Receive:
        """The whole body, read before the app runs: at most ``max_body_bytes``, and in time (the
        header timeout and a second per BODY_MIN_RATE bytes declared, or of the cap when chunked),
        so that a client cannot hold its connection, and a request slot, by sending it slowly; and
        within what the door may hold of bodies (``bodies.BodyBudget``: counted in ``held``)."""
        limit = self.door.max_body_bytes
        too_large = CallTooLargeError(f"Request too large: the body is over {limit} bytes")
        declared = limit
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit():
                if int(value) > limit:
                    raise too_large
                declared = int(value)
        allowed_s = self.door.body_timeout_s + declared / BODY_MIN_RATE
        pieces: list[bytes] = []
        more = True
        try:
            async with asyncio.timeout(allowed_s):
                while more:
                    message = await receive()
                    if message["type"] != "http.request":
                        raise _HungUp  # the client went away: nothing is run for it
                    piece = message.get("body", b"")
                    more = message.get("more_body", False)
                    if held.size + len(piece) > limit:
                        raise too_large
                    self.door.bodies.take(held.network, len(piece))
                    held.size += len(piece)
                    pieces.append(piece)
        except TimeoutError:
            raise InvalidRequestError(f"the request's body did not arrive within {allowed_s:.0f} s") from None
        # Given on as the pieces came (the app joins them): not copied whole once more here.
        last = len(pieces) - 1
        return _replay([{"type": "http.request", "body": p, "more_body": i < last} for i, p in enumerate(pieces)]
                       or [{"type": "http.request", "body": b"", "more_body": False}], receive)  # fmt: skip


def _refuse_an_upgrade(request: Request) -> None:
    """No protocol but HTTP is served here: a request asking to switch is refused. (Answered as
    the plain request it also is, its body never reached the route: the parser takes what follows
    an upgrade's head for the other protocol, and a file written with it came out empty.)"""
    tokens = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
    if "upgrade" in tokens and "upgrade" in request.headers:
        raise InvalidRequestError("this server speaks HTTP only: no upgrade (WebSocket or other) is served")


def _refuse_a_body(request: Request) -> None:
    """An open route takes no body: one declared is refused before a byte of it is read."""
    length = request.headers.get("content-length", "0").strip()
    if not length.isdigit() or int(length) > 0 or "transfer-encoding" in request.headers:
        raise InvalidRequestError(f"{routed_path(request)} takes no request body")


def _error_code(body: bytes) -> str | None:
    """The ``code`` of an error body (``{"error": ..., "code": ...}``), as the socket's answers name it."""
    if len(body) > 64 << 10:
        return None
    try:
        said = json.loads(body)
    except ValueError:
        return None
    code = said.get("code") if isinstance(said, dict) else None
    return code if code in HTTP_STATUS else None  # one of the codes: a label of bounded values


class _HungUp(Exception):
    """The client went away before its request's body had come."""


class _Held:
    """What one request's body holds of the door's budget, and from which network."""

    def __init__(self, network: str) -> None:
        self.network, self.size = network, 0


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """A ``receive`` that gives ``messages``, then whatever the server sends next (a disconnect)."""
    pending = messages[::-1]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay


def describe_bearer(app: FastAPI, door: HttpDoor) -> None:
    """Say in the OpenAPI document that every route but the open ones takes the bearer token."""
    if door.token is None:
        return
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema.get("paths", {}).items():
                if path not in OPEN_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
