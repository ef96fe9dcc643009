"""One client connection to the daemon: framing, order, flow control, and what ends with it.

An ``asyncio.Protocol``, not a stream and a task: a request line is admitted
(parsed, rate-limited, authenticated, dispatched) in the loop callback that
reads it, and a warm ``execute`` is answered from the callback that reads the
agent's answer, so the common request wakes no task at all. On this host each
task or future wake-up after an idle spell costs 80-170 µs more than a
callback (docs/performance.md). Methods that must wait (a cold start, a queue
for a slot, a held sandbox's call) run in a task of their own, one at a time.

Requests on one connection are answered in order: lines that arrive while one
is being answered wait in a queue, and reading stops while the queue is full
or the client does not read its answers.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias, cast

from ..errors import RATE_LIMITED
from ..protocol.models import Caller, unix_caller
from ..protocol.peer import Peer, in_my_user_namespace, peer_of
from ..result import ExecResult
from .codec import TOO_LARGE

if TYPE_CHECKING:
    from .methods import Method
    from .server import RPCServer

log = logging.getLogger("stockade.daemon")

# Read ahead of the request being answered, at most this many lines and
# (roughly: one read may overshoot) this many bytes; then reading pauses. The
# byte bound keeps a client that pipelines large requests from parking up to
# 64 of them (a GiB at the default line limit) in the daemon's memory.
MAX_QUEUED_LINES = 64
MAX_QUEUED_BYTES = 1 << 20
# A request that does not come in one read is held until its end (up to STOCKADE_MAX_REQUEST_BYTES,
# 16 MiB): one uid's 64 connections could have the daemon hold a GiB of requests they never end.
# So at most this many of a uid's connections are partway through one at once; the others wait,
# reading paused with what one read brought, until one of those is done (``LinesUnderWay``).
LINES_UNDER_WAY_PER_UID = 4
# Starts a run answered by callback: given where its outcome goes, returns what abandons
# it (for a client that goes away), or None when it cannot start now.
StartNow: TypeAlias = Callable[[Callable[["ExecResult | Exception"], None]], Callable[[], None] | None]


class Connection(asyncio.Protocol):
    def __init__(self, server: RPCServer, number: int) -> None:
        self.server = server
        self.number = number
        self.limit = server.config.max_request_bytes
        self.proven = False  # whether a request of its passed authentication (rpc/server.py AUTH_PENALTY_S)
        self.transport: asyncio.Transport | None = None
        self.peer = Peer(0, -1, -1)
        self.caller: Caller = unix_caller(-1, number)
        self.refused = True  # until connection_made has checked the peer
        self._framer = server.codec.framer(self.limit)
        self._lines: deque[bytes | None] = deque()
        self._queued_bytes = 0
        self._busy = False  # a request is being answered (in a task or by the agent's callback)
        self._pumping = False
        self._abandon: Callable[[], None] | None = None  # ends a run answered by callback
        self._task: asyncio.Task[None] | None = None
        self._task_id: Any = None  # the id of the request it answers
        self._task_ends_with_caller = False
        self._write_paused = False
        self._eof = False
        self._lost = False
        self.line_under_way: str | None = None  # "reading" or "waiting" (LinesUnderWay), or None
        # The method being answered and since when, while it ends with its caller (a hang-up's log line).
        self._answering: tuple[str, float] | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # ---- the transport's callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport: the server is a Unix socket
        self.server.connections.add(self)
        sock: socket.socket = transport.get_extra_info("socket")
        try:
            self.peer = peer_of(sock)
        except OSError as exc:  # a peer that cannot be named is not served
            log.warning("refused a peer whose credentials cannot be read: %s", exc)
            self.transport.abort()
            return
        self.caller = unix_caller(self.peer.uid, self.number)
        # A refused peer is answered once and dropped: closing here means the
        # transport never starts reading.
        refusals = self.server.answer_log.refusals
        if not self.server.peer_allowed(self.peer) or (
            self.server.config.same_user_namespace and not in_my_user_namespace(sock, self.peer.pid)
        ):
            refusals.note(self.peer.uid, "peer (not allowed)", logging.WARNING, pid=self.peer.pid)
            self.send(error_answer(None, f"Permission denied: uid {self.peer.uid} is not allowed", "auth"))
            self.transport.close()
            return
        open_now = self.server.open_connections[self.peer.uid]
        if open_now >= self.server.config.max_connections:
            # Each connection holds a file descriptor: without a bound, one local
            # user could leave the daemon none to start isolates with.
            refusals.note(self.peer.uid, f"connection (past {open_now} open)", logging.WARNING, pid=self.peer.pid)
            message = f"Too many connections: uid {self.peer.uid} has {open_now} open (STOCKADE_MAX_CONNECTIONS)"
            self.send(error_answer(None, message, "busy"))
            self.transport.close()
            return
        self.server.open_connections[self.peer.uid] = open_now + 1
        self.refused = False

    def data_received(self, data: bytes) -> None:
        if self.refused or self._lost:
            return
        if not (self._lines or self._busy or self._write_paused):
            frame = self._framer.single(data)
            if frame is not None:
                # The usual case, one whole request with nothing before it, is
                # answered without the queue: on this host each step a request
                # takes after an idle spell costs µs (docs/performance.md).
                if frame:
                    self._answer_guarded(frame)
                return
        self._take(data)
        self._track_line()
        self._pump()

    def eof_received(self) -> bool:
        if self.refused or _hung_up(self.transport):
            # Closed, not just shut for writing (as socat does after its request):
            # no answer can reach it, so nothing more is run for it.
            return False  # the transport closes; connection_lost ends what still runs
        self._eof = True
        self._take()
        self._track_line()
        self._pump()
        return True  # keep the writing half open: the queued requests are still answered

    def pause_writing(self) -> None:
        self._write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._lines.clear()
        self._queued_bytes = 0
        if self.line_under_way is not None:
            self.server.lines_under_way.leave(self)
        if self._answering is not None:  # ended with its caller: it has no answer to be logged with
            method, started = self._answering
            self.server.answer_log.add(self.peer.uid, method, "hung_up", "", (time.monotonic() - started) * 1000)
        # The client went away: a one-shot run's answer can go nowhere, so its
        # isolate and its slot go now. A held sandbox's call is let finish, so
        # that a kept sandbox is left in step with its agent.
        if self._abandon is not None:
            abandon, self._abandon = self._abandon, None
            abandon()
            self._busy = False
        if self._task is not None and self._task_ends_with_caller:
            self._task.cancel()
        asyncio.get_running_loop().create_task(self._release())

    async def _release(self) -> None:
        """What the connection held goes once its last request is over: its sandboxes, its rate window."""
        try:
            if self._task is not None:
                await asyncio.gather(self._task, return_exceptions=True)
            await self.server.handler.close_connection(self.number)
        except Exception:
            log.exception("connection %d: releasing its sandboxes failed", self.number)
        finally:
            self.server.connections.discard(self)
            if not self.refused:
                self.server.open_connections[self.peer.uid] -= 1
                if not self.server.open_connections[self.peer.uid]:
                    del self.server.open_connections[self.peer.uid]
            if not self.closed.done():
                self.closed.set_result(None)

    # ---- answering, in order ----------------------------------------------------------

    def _take(self, data: bytes = b"") -> None:
        """Frames from ``data`` and what the framer holds, as many as the queue has room for (the
        rest stay in the framer, and reading pauses: ``_flow``); at the end of file, the last."""
        for frame in self._framer.feed(data, MAX_QUEUED_LINES - len(self._lines)):
            self._lines.append(frame)
            self._queued_bytes += len(frame) if frame is not None else 0
        if self._eof and not self._framer.pending:
            for frame in self._framer.end():  # empties the framer: a second call finds nothing
                self._lines.append(frame)
                self._queued_bytes += len(frame) if frame is not None else 0

    def _pump(self) -> None:
        """Answer queued lines until one has to wait (or none is left)."""
        if self._pumping:
            return  # called back from inside an answer: the loop below goes on
        self._pumping = True
        try:
            while not self._busy and not self._write_paused and not self._lost:
                if not self._lines and self._framer.pending:
                    self._take()  # what one read brought beyond the queue's room
                    self._track_line()
                if not self._lines:
                    break
                line = self._lines.popleft()
                self._queued_bytes -= len(line) if line is not None else 0
                if not self._answer_guarded(line):
                    return
        finally:
            self._pumping = False
        self._flow()
        if self._eof and not self._lines and not self._busy and self.transport is not None:
            self.transport.close()

    def _track_line(self) -> None:
        """Take a place among the uid's requests under way when one is begun, give it up when done."""
        partway = self._framer.buffered > 0
        if partway and self.line_under_way is None:
            self.server.lines_under_way.join(self)
        elif not partway and self.line_under_way is not None:
            self.server.lines_under_way.leave(self)

    def _flow(self) -> None:
        """Read while there is room for more requests and the client reads its answers."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if (
            self._write_paused
            or self._framer.pending
            or len(self._lines) >= MAX_QUEUED_LINES
            or self._queued_bytes >= MAX_QUEUED_BYTES
            or self.line_under_way == "waiting"
        ):
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _answer_guarded(self, line: bytes | None) -> bool:
        """Answer ``line``; a failure in the daemon's own code closes the connection (False)."""
        try:
            self._answer(line)
        except Exception:
            log.exception("connection %d failed", self.number)
            self._busy = False
            self.close()
            return False
        return True

    def _answer(self, line: bytes | None) -> None:
        started = time.monotonic()
        if line is TOO_LARGE:
            # Counted against its uid's rate as any line is: refused unread, but read all the same.
            if not self.server.per_uid.allow(self.peer.uid):
                self.send(error_answer(None, RATE_LIMITED, "rate_limit"))
            else:
                self.send(error_answer(None, f"Request too large: over {self.limit} bytes", "invalid_request"))
            return
        admitted = self.server.admit(line, self.peer, self.caller.owner, self.proven)
        if isinstance(admitted, dict):
            self.send(admitted)
            self._logged("refused", admitted, started)
            return
        self.proven = True  # authenticated, where requests are signed
        method, request, msg_id = admitted
        handler = self.server.handler
        if method.immediate is not None:
            try:
                result = method.immediate(handler, request, self.caller)
            except Exception as exc:  # noqa: BLE001 - an answer, as on the awaited path
                self._failed(exc, method.name, msg_id, started)
                return
            self.send({"result": result, "error": None, "id": msg_id})
            self._logged(method.name, None, started)
            return
        # A held sandbox's call is let finish when its caller goes, and logged then, once.
        self._answering = (method.name, started) if method.ends_with_caller else None
        start_now = method.start_now
        if start_now is not None and not getattr(request, "stream", False):
            if self._run_now(method.name, functools.partial(start_now, handler, request, self.caller), msg_id,
                             started):  # fmt: skip
                return
        self._busy = True
        self._task_ends_with_caller = method.ends_with_caller
        self._task_id = msg_id
        self._task = asyncio.get_running_loop().create_task(self._awaited(method, request, msg_id, started))

    def _run_now(self, method: str, start: StartNow, msg_id: Any, started: float) -> bool:
        """Start a run (an ``execute`` on a warm isolate, a call on a held sandbox that is
        free), answered by the callback that reads the agent's answer.

        False when it cannot start now (no slot or warm isolate, the held sandbox
        busy with another call): then it is awaited.
        """
        self._busy = True
        settled = False

        def done(outcome: ExecResult | Exception) -> None:
            nonlocal settled
            settled = True
            self._abandon = None
            self._busy = False
            if isinstance(outcome, ExecResult):
                self.send({"result": outcome, "error": None, "id": msg_id})
                self._logged(method, outcome, started)
            else:
                self._failed(outcome, method, msg_id, started)
            if self._lines or self._framer.pending or self._eof:
                # A turn later: the run's slot and isolate are handed back once this returns.
                asyncio.get_running_loop().call_soon(self._pump)

        try:
            abandon = start(done)
        except Exception as exc:  # noqa: BLE001 - a bad argument, a runtime that cannot serve it: an answer too
            self._busy = False
            self._failed(exc, method, msg_id, started)
            return True
        if abandon is None:
            self._busy = False
            return False
        if not settled:
            self._abandon = abandon
        return True

    def _failed(self, exc: Exception, method: str, msg_id: Any, started: float) -> None:
        response = self.server.failure(exc, method, msg_id)
        self.send(response)
        self._logged(method, response, started)

    async def _awaited(self, method: Method, request: Any, msg_id: Any, started: float) -> None:
        """Answer a request that has to wait."""
        try:
            response = await self.server.call(method, request, self.caller, msg_id, self._emitter(msg_id))
            if self._lost and method.unanswered is not None and response.get("error") is None:
                await method.unanswered(self.server.handler, response.get("result"))
            self.send(response)
            self._logged(method.name, response.get("result") if response["error"] is None else response, started)
        finally:
            self._task = None
            self._busy = False
            if not self._lost:
                self._pump()

    # ---- writing ----------------------------------------------------------------------

    def send(self, response: dict[str, Any]) -> None:
        if self.transport is not None and not self._lost:
            try:
                line = self.server.codec.encode(response)
            except (ValueError, TypeError, RecursionError) as exc:
                # An answer its codec cannot write (what an isolate said that no check above caught):
                # an error answer in its place, never a request left unanswered.
                log.error("cannot encode the answer to request %r: %s", response.get("id"), exc)
                why = f"the answer could not be encoded ({type(exc).__name__})"
                line = self.server.codec.encode(error_answer(response.get("id"), why, "internal", None))
            self.transport.write(line)

    def _emitter(self, msg_id: Any) -> Callable[[str, bytes], None]:
        def emit(stream: str, data: bytes) -> None:
            # Output of a run with "stream": true, ahead of its answer, on the same connection.
            if self.transport is not None and not self._lost:
                chunk = {"id": msg_id, "output": {"stream": stream, "data": base64.b64encode(data).decode()}}
                self.transport.write(self.server.codec.encode(chunk))

        return emit

    def _logged(self, method: str, outcome: Any, started: float) -> None:
        # Never the params (they may hold code and data), never the hmac.
        self._answering = None
        code = outcome.get("error_code") if isinstance(outcome, dict) else None
        run = f" execution={outcome.execution_id}" if isinstance(outcome, ExecResult) else ""
        self.server.answer_log.add(self.peer.uid, method, code or "ok", run, (time.monotonic() - started) * 1000)

    # ---- ending -----------------------------------------------------------------------

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def shut(self) -> None:
        """At the daemon's stop: end what this connection still runs, then the connection."""
        if self._abandon is not None:
            abandon, self._abandon = self._abandon, None
            abandon()
        if self._task is not None and not self._task.done():
            # Its answer would never come (a create starting its isolate, a call waiting its turn):
            # said, rather than a connection closed under the client.
            self._task.cancel()
            self.send(error_answer(self._task_id, "Shutting down: the daemon stopped before this request was done",
                                   "unavailable"))  # fmt: skip
        if self.transport is not None:
            if self._write_paused:
                self.transport.abort()  # its client reads nothing: its backlog would hold the close open
            else:
                self.transport.close()


class LinesUnderWay:
    """Which of each uid's connections may be partway through a request (``LINES_UNDER_WAY_PER_UID``)."""

    def __init__(self, per_uid: int = LINES_UNDER_WAY_PER_UID) -> None:
        self.per_uid = per_uid
        self.reading: dict[int, int] = {}
        self.waiting: dict[int, deque[Connection]] = {}

    def join(self, conn: Connection) -> None:
        uid = conn.peer.uid
        if self.reading.get(uid, 0) < self.per_uid:
            self.reading[uid] = self.reading.get(uid, 0) + 1
            conn.line_under_way = "reading"
        else:
            self.waiting.setdefault(uid, deque()).append(conn)
            conn.line_under_way = "waiting"
            conn._flow()

    def leave(self, conn: Connection) -> None:
        uid, was = conn.peer.uid, conn.line_under_way
        conn.line_under_way = None
        queue = self.waiting.get(uid)
        if was == "waiting" and queue is not None:
            queue.remove(conn)
        elif was == "reading":
            if queue:  # its place goes to the connection that waited longest
                nxt = queue.popleft()
                nxt.line_under_way = "reading"
                nxt._flow()
            elif self.reading[uid] > 1:
                self.reading[uid] -= 1
            else:
                del self.reading[uid]
        if queue is not None and not queue:
            del self.waiting[uid]


def _hung_up(transport: asyncio.Transport | None) -> bool:
    """Whether the peer closed its socket, rather than only shutting its writing half.

    Both read as end of file; only a socket closed at both ends polls as
    POLLHUP (Linux, Unix stream sockets).
    """
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLHUP)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def error_answer(msg_id: Any, message: str, code: str, errno: int | None = None) -> dict[str, Any]:
    """An error answer; a file call's OS error also carries its ``errno``, for the client's class."""
    if errno is not None:
        return {"result": None, "error": message, "error_code": code, "errno": errno, "id": msg_id}
    return {"result": None, "error": message, "error_code": code, "id": msg_id}
