"""One connection from an isolate to the egress proxy, from its first request to its end.

``CONNECT host:port`` opens a tunnel to an allowed host (a plain one, or one whose TLS is
terminated with the sandbox's CA where a secret is bound to the host, its requests then relayed
one by one with the secret put in: ``_terminate``); ``GET http://host/...`` is relayed request
by request (``_plain``). Each request and reply passes through ``_exchange``, which fills bound
headers, redacts replies and keeps the run's account (gate.py's flows). Every wait is bounded:
a peer that says nothing, or stops reading, for ``IDLE_TIMEOUT_S`` ends its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import h11

from ..result import EgressRequest
from . import tunnel_check
from .allowlist import canonical_host
from .gate import Flow, Gate
from .heads import end_to_end, for_bound_host, for_host, head_size, split_authority
from .resolver import Refused, Unreachable, resolve

_CHUNK = 65536
MAX_HEAD_BYTES = 64 * 1024  # a reply's head, from a real server (many Set-Cookie lines)
# A request's head, from the isolate: as Node's default. Each header line costs the proxy parsing
# the isolate does not pay for (the worker is outside its cgroup): 64 KiB of one-byte headers was
# ~12 ms of the worker's CPU for one send().
MAX_REQUEST_HEAD_BYTES = 16 * 1024
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0  # a connection with nothing to say for this long is closed


class _Unreadable(Exception):
    """A reply the proxy cannot check for secret values: not passed on."""


_upstream: ssl.SSLContext | None = None
_upstream_extra = ""  # the extra roots it holds
_upstream_lock = threading.Lock()


def upstream_context(extra: str | None) -> ssl.SSLContext:
    """Verified TLS to the real host: the system's roots, plus ``extra`` (PEM: ``STOCKADE_EGRESS_CA_FILE``'s,
    a private index's, a test's own CA). A worker serves one sandbox: the context its fork server made
    (the host's roots, loaded once) takes the extra roots in place."""
    global _upstream, _upstream_extra
    extra = extra or ""
    with _upstream_lock:
        if _upstream is None or (_upstream_extra and _upstream_extra != extra):
            _upstream, _upstream_extra = ssl.create_default_context(), ""
            _upstream.set_alpn_protocols(["http/1.1"])
        if extra and not _upstream_extra:
            _upstream.load_verify_locations(cadata=extra)
            _upstream_extra = extra
        return _upstream


class Exchange:
    """One connection from the isolate, from its first request to its end."""

    def __init__(self, gate: Gate, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.gate = gate
        self.reader = reader
        self.writer = writer
        self.relayed = 0  # plain requests relayed on this connection (the first was admitted with it)

    async def run(self) -> None:
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        while True:
            request = await self._next_request(client)
            if request is None:
                return
            method = request.method.decode("ascii", "replace")
            if method == "CONNECT":
                await self._connect(client, request)
                return
            if not await self._plain(client, request):
                return
            if client.our_state is h11.MUST_CLOSE or client.their_state is h11.MUST_CLOSE:
                return
            try:
                client.start_next_cycle()
            except h11.LocalProtocolError:
                return

    # ---- CONNECT ----------------------------------------------------------------------

    async def _connect(self, client: h11.Connection, request: h11.Request) -> None:
        host, port = split_authority(request.target.decode("ascii", "replace"), 443)
        record = EgressRequest(host=host or "?", port=port, method="CONNECT", scheme="tunnel", allowed=False)
        try:
            if not host:
                raise Refused("CONNECT needs host:port", 400)
            upstream = await self._open(host, port)
        except Refused as exc:
            record.reason, record.allowed = str(exc), isinstance(exc, Unreachable)
            await self._refuse(client, exc.status, record)
            return
        up_reader, up_writer = upstream
        if self.gate.bound(host, port):
            self.writer.write(client.send(h11.Response(status_code=200, headers=[], reason=b"Connection established")))
            await self._terminate(host, port, client.trailing_data[0], up_reader, up_writer)
            return
        record.allowed = True
        # In the account before the isolate hears the tunnel is open (flows: gate.py).
        flow = self.gate.open_flow(record, self.writer.get_extra_info("socket"))
        refused: str | None = None
        try:
            self.writer.write(client.send(h11.Response(status_code=200, headers=[], reason=b"Connection established")))
            # Its first bytes held until they show the host they are for (tunnel_check.py: no fronting).
            first = client.trailing_data[0]
            refused = await _relay_both(self.reader, self.writer, up_reader, up_writer, flow, first,
                                        lambda held: tunnel_check.check(held, host))  # fmt: skip
        finally:
            if refused is None:
                self.gate.close_flow(flow)
            else:
                self.gate.close_refused(flow, refused)

    async def _terminate(
        self, host: str, port: int, leftover: bytes, up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter
    ) -> None:
        """TLS with the isolate (the sandbox's CA) and with the host (verified), HTTP between."""
        assert self.gate.ca is not None

        def failed(reason: str) -> None:
            # Allowed, and not reached as asked: in the account as a failure (the tunnel was opened
            # upstream), never as a refusal, which counts against the isolate (an upstream with a
            # bad certificate would otherwise be the code's violation, and end a run that kills).
            self.gate.record(EgressRequest(host=host, port=port, method="CONNECT", scheme="https", allowed=True,
                                           reason=reason))  # fmt: skip

        if leftover:  # a client speaks TLS only once told the tunnel is open: this one did not wait
            failed("the isolate sent data before the tunnel was open")
            up_writer.transport.abort()
            return
        try:
            await self.writer.start_tls(self.gate.ca.server_context(host))
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            failed(f"TLS with the isolate failed (does it trust the sandbox's CA?): {exc}")
            up_writer.transport.abort()
            return
        try:
            await up_writer.start_tls(upstream_context(self.gate.upstream_ca), server_hostname=host)
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            reason = f"upstream TLS failed: {exc}"
            failed(reason)
            client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
            with contextlib.suppress(Exception):
                if isinstance(await _next_event(client, self.reader), h11.Request):
                    await self._answer(client, 502, reason)
            return
        client = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
        upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            while True:
                request = await self._next_request(client)
                if request is None:
                    return
                if not await self._exchange(client, request, upstream, up_reader, up_writer, host, port, "https"):
                    return
                if h11.MUST_CLOSE in (client.our_state, client.their_state, upstream.our_state, upstream.their_state):
                    return
                client.start_next_cycle()
                upstream.start_next_cycle()
        finally:
            up_writer.transport.abort()

    # ---- plain HTTP -------------------------------------------------------------------

    async def _plain(self, client: h11.Connection, request: h11.Request) -> bool:
        """One absolute-form request (``GET http://host/path``) relayed; False: the connection ends."""
        target = request.target.decode("ascii", "replace")
        method = request.method.decode("ascii", "replace")
        try:
            parts = urlsplit(target)
            hostname, port = parts.hostname, parts.port or 80  # a bad [IPv6] or port raises
        except ValueError:
            # A refusal like any other: recorded, answered and counted (it ends a run that kills on one).
            await self._refuse(client, 400, EgressRequest(host="?", port=0, method=method, path=target[:200],
                                                          allowed=False, reason="a malformed URL"))  # fmt: skip
            return False
        if parts.scheme != "http" or not hostname:
            reason = "only http:// URLs and CONNECT go through this proxy"
            await self._refuse(client, 400, EgressRequest(host=hostname or "?", port=port, method=method,
                                                          path=parts.path or target[:200], allowed=False,
                                                          reason=reason))  # fmt: skip
            return False
        self.relayed += 1
        if self.relayed > 1 and not self.gate.admit(time.monotonic()):
            # Each plain request is a connection (and a lookup) of its own upstream: charged as a new
            # connection is, or one kept-alive connection would make them past the isolate's rate.
            await self._answer(client, 429, "past this sandbox's rate of new connections")
            return False
        host = canonical_host(hostname)
        try:
            up_reader, up_writer = await self._open(host, port)
        except Refused as exc:
            await self._refuse(client, exc.status, EgressRequest(host=host, port=port, method=method,
                                                                 path=parts.path or "/",
                                                                 allowed=isinstance(exc, Unreachable),
                                                                 reason=str(exc)))  # fmt: skip
            return client.their_state is not h11.MUST_CLOSE
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        origin = h11.Request(method=request.method, target=path.encode(), headers=request.headers)
        upstream = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            return await self._exchange(client, origin, upstream, up_reader, up_writer, host, port, "http")
        finally:
            up_writer.transport.abort()

    # ---- one request and its reply ---------------------------------------------------

    async def _exchange(
        self,
        client: h11.Connection,
        request: h11.Request,
        upstream: h11.Connection,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
        host: str,
        port: int,
        scheme: Literal["http", "https"],
    ) -> bool:
        path = request.target.decode("ascii", "replace").split("?", 1)[0]
        method = request.method.decode("ascii", "replace")
        record = EgressRequest(host=host, port=port, method=method, path=path, scheme=scheme, allowed=True)
        headers = end_to_end(request.headers)
        terminated = scheme == "https"  # TLS terminated here for a bound host, and verified upstream
        # A host a secret is bound to, over TLS or plain HTTP (no value is put in there, but one may come
        # back): its replies must be readable, to turn every value back into its handle.
        guarded = terminated or self.gate.bound(host, port)
        if terminated and (not request.target.startswith((b"/", b"*")) or request.target.startswith(b"//")):
            # An absolute URL inside the tunnel would name another origin than the one the value is
            # for; so would "//host/path" to a server that reads it as a URL without its scheme.
            record.allowed, record.reason = False, "inside a tunnel to a bound host, only origin-form targets"
            await self._refuse(client, 400, record)
            return False
        if headers is None:
            record.allowed, record.reason = False, "a request framed two ways (a length and chunks, or two lengths)"
            await self._refuse(client, 400, record)
            return False
        default_port = 443 if terminated else 80
        if guarded:
            headers = for_bound_host(headers, host, port, default_port)
        else:
            headers = for_host(headers, host, port, default_port)
        if terminated:
            headers, record.secrets_used = self.gate.substitute(host, port, headers)
        flow = self.gate.open_flow(record)  # in the account before a byte of it is sent
        try:
            up_writer.write(upstream.send(h11.Request(method=request.method, target=request.target, headers=headers)))
            while True:  # the body
                event = await _next_event(client, self.reader)
                if isinstance(event, h11.Data):
                    record.bytes_sent += len(event.data)
                    up_writer.write(upstream.send(event))
                    await _drained(up_writer)
                elif isinstance(event, h11.EndOfMessage):
                    up_writer.write(upstream.send(event))
                    break
                else:
                    return False
            response = await _next_event(upstream, up_reader)
            while isinstance(response, h11.InformationalResponse):
                response = await _next_event(upstream, up_reader)
            if not isinstance(response, h11.Response):
                raise ConnectionError("the host closed without a reply")
            record.status = response.status_code
            redactor = self.gate.reply_redactor()
            if any(self.gate.in_header_name(n) for n, _ in response.headers.raw_items()):
                # A header's name is no place for a value, and no handle is a header's name.
                raise _Unreadable("the host answered with a secret's value in a header's name")
            # Every value turned back into its handle, in the head as in the body.
            reply_headers = [(n, self.gate.redact_reply(v)) for n, v in response.headers]
            reason = self.gate.redact_reply(response.reason)
            if redactor is not None:
                # Every header of the name, every coding in each: a client may read the first, or all.
                codings = {c.strip().lower() for n, v in response.headers if n.lower() == b"content-encoding"
                           for c in v.split(b",")}  # fmt: skip
                if guarded and codings - {b"identity", b""}:
                    # Asked for identity; a compressed reply could carry a value the proxy cannot see.
                    raise _Unreadable("the host answered with a compressed body, which the proxy cannot check")
                # A reply that may change length is re-framed (chunked); a reply with no body (HEAD,
                # 204, 304) loses its length too, which would say how long the value in the body is.
                reply_headers = [(n, v) for n, v in reply_headers if n.lower() != b"content-length"]
                if request.method == b"HEAD" or response.status_code in (204, 304):
                    redactor = None
            self.writer.write(client.send(h11.Response(status_code=response.status_code, headers=reply_headers,
                                                        reason=reason)))  # fmt: skip
            while True:
                event = await _next_event(upstream, up_reader)
                if isinstance(event, h11.Data):
                    data = redactor.feed(event.data) if redactor is not None else event.data
                    record.bytes_received += len(data)  # what the isolate got: not the values' lengths
                    if data:
                        self.writer.write(client.send(h11.Data(data=data)))
                        await _drained(self.writer)
                elif isinstance(event, h11.EndOfMessage):
                    if redactor is not None and (rest := redactor.flush()):
                        record.bytes_received += len(rest)
                        self.writer.write(client.send(h11.Data(data=rest)))
                    flow.done = True  # whole once written: the isolate may read it and end at once
                    self.writer.write(client.send(h11.EndOfMessage()))
                    await _drained(self.writer)
                    break
                else:
                    raise ConnectionError("the host closed in the middle of its reply")
            if redactor is not None:
                self.gate.redactor.add(redactor.count)
            return True
        except (h11.ProtocolError, ConnectionError, OSError, _Unreadable) as exc:
            # Never the exception's text: h11 quotes the header it refused, which may be the filled one.
            why = str(exc) if isinstance(exc, _Unreadable) else type(exc).__name__
            record.reason = f"failed: {why}"
            if client.our_state in (h11.SEND_RESPONSE, h11.IDLE) and client.their_state is not h11.ERROR:
                with contextlib.suppress(Exception):
                    await self._answer(client, 502, f"upstream failed: {why}")
            return False
        finally:
            self.gate.close_flow(flow)

    # ---- helpers ------------------------------------------------------------------------

    async def _open(self, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to an address ``host`` may be reached at; ``Refused`` says why not."""
        host = host.strip("[]")
        rule = self.gate.allowlist.rule_for(host, port)
        if rule is None:
            raise Refused(f"{host}:{port} is not in allowed_hosts")
        addresses = await resolve(self.gate, host, port, rule)
        last: OSError | None = None
        for address in addresses:
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(str(address), port, limit=MAX_HEAD_BYTES), CONNECT_TIMEOUT_S
                )
            except (OSError, TimeoutError) as exc:
                last = exc if isinstance(exc, OSError) else OSError(f"timed out after {CONNECT_TIMEOUT_S:g} s")
        raise Unreachable(f"cannot connect to {host}:{port}: {last}")

    async def _refuse(self, client: h11.Connection, status: int, record: EgressRequest, said: str = "") -> None:
        """A refused request: recorded (and so counted: a violation of its sandbox's, unless the
        policy allowed it and its host could not be reached), then answered ``status`` with ``said``,
        or the record's reason."""
        said = said or record.reason  # as given: recording trims the record's own
        self.gate.record(record)
        await self._answer(client, status, said)

    async def _next_request(self, client: h11.Connection) -> h11.Request | None:
        """The isolate's next request; None once the connection is over (it closed, or sent a head
        that was refused, and answered so)."""
        try:
            request = await _next_event(client, self.reader, head=True)
        except h11.RemoteProtocolError as exc:
            await self._refuse_head(client, exc)
            return None
        return request if isinstance(request, h11.Request) else None

    async def _refuse_head(self, client: h11.Connection, exc: h11.RemoteProtocolError) -> None:
        """A head that is not HTTP, or past the cap (431): refused as any request is."""
        record = EgressRequest(host="?", port=0, method="?", allowed=False, reason=f"not an HTTP request: {exc}")
        await self._refuse(client, exc.error_status_hint, record, f"bad request: {exc}")

    async def _answer(self, client: h11.Connection, status: int, message: str) -> None:
        body = (message + "\n").encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        try:
            reason = http.HTTPStatus(status).phrase.encode()
            self.writer.write(client.send(h11.Response(status_code=status, headers=headers, reason=reason)))
            self.writer.write(client.send(h11.Data(data=body)))
            self.writer.write(client.send(h11.EndOfMessage()))
            await _drained(self.writer)
        except (h11.ProtocolError, ConnectionError, OSError):
            pass


async def _drained(writer: asyncio.StreamWriter) -> None:
    """``writer.drain()``, held to the idle bound: a peer that stops reading (the isolate, or a host
    that takes a request's body no further) would otherwise hold its connection, and its slot of the
    gate's ``MAX_CONNECTIONS``, for as long as the sandbox lives. TimeoutError (an OSError) past it."""
    await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT_S)


async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader, head: bool = False) -> Any:
    """The next event; ``head``: the isolate's next request, where a hang-up in the middle of
    its head is the end of the connection (nothing was asked, so nothing is refused), not an error."""
    fed = 0  # of this head: read no more than its cap (h11's own holds only while a head is incomplete)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            want = min(_CHUNK, MAX_REQUEST_HEAD_BYTES + 1 - fed) if head else _CHUNK
            if want <= 0:
                raise h11.RemoteProtocolError("the request head is larger than 16 KiB", error_status_hint=431)
            data = await asyncio.wait_for(reader.read(want), IDLE_TIMEOUT_S)
            if head and not data:
                return None
            fed += len(data)
            conn.receive_data(data)
            continue
        if event is h11.PAUSED:
            return None
        if isinstance(event, h11.ConnectionClosed):
            return None
        if head and isinstance(event, h11.Request) and head_size(event) > MAX_REQUEST_HEAD_BYTES:
            # Whole already (a head that came pipelined behind the one before): held to the cap all the same.
            raise h11.RemoteProtocolError("the request head is larger than 16 KiB", error_status_hint=431)
        return event


async def _relay_both(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter, flow: Flow,
    first: bytes, check: Callable[[bytes], tunnel_check.More | tunnel_check.Refusal | None],
) -> str | None:  # fmt: skip
    """Copy both ways until both ends have finished, counting into ``flow`` as bytes pass; the
    isolate's ``first`` bytes (and what follows) held until ``check`` passes them. What it
    refused them for: the isolate is told, both ends closed, nothing of them sent."""
    record = flow.record
    refused: str | None = None

    async def read() -> bytes:
        flow.reading = True
        try:
            return await asyncio.wait_for(reader.read(_CHUNK), IDLE_TIMEOUT_S)
        finally:
            flow.reading = False

    async def to_host() -> None:
        nonlocal refused
        try:
            data = first
            said = check(data)
            while said is not None:
                if isinstance(said, tunnel_check.Refusal):
                    refused = said.reason
                    up_writer.transport.abort()
                    writer.write(said.said)
                    with contextlib.suppress(ConnectionError, OSError, TimeoutError):
                        await _drained(writer)
                    writer.close()
                    return
                if not (more := await read()):
                    record.reason = "the isolate closed it before its first bytes said what they are"
                    data = b""  # none are sent
                    break
                data += more
                if len(data) >= said.needed and (
                    not said.line_end or b"\n" in more or len(data) >= tunnel_check.MAX_LINE_BYTES
                ):
                    said = check(data)
            while data:
                record.bytes_sent += len(data)
                up_writer.write(data)
                await _drained(up_writer)
                data = await read()
            if up_writer.can_write_eof():
                up_writer.write_eof()
        except (ConnectionError, OSError, TimeoutError):
            up_writer.transport.abort()
        finally:
            flow.done = True

    async def to_isolate() -> None:
        try:
            while data := await asyncio.wait_for(up_reader.read(_CHUNK), IDLE_TIMEOUT_S):
                record.bytes_received += len(data)
                writer.write(data)
                await _drained(writer)
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError, TimeoutError):
            writer.transport.abort()

    await asyncio.gather(to_host(), to_isolate())
    up_writer.transport.abort()
    return refused
