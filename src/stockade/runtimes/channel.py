"""``AgentChannel``: the host's one connection to an isolate's agent, async.

Every request to the agent (a run, a file call, a background-process call, a
ping) goes through ``AgentChannel.start``: its frame is written by a
``LoopCall`` on the running event loop and its reply read in that loop's
callbacks. Async callers await ``call``; the daemon's hot path takes the
callback form (``start``); blocking callers (the sync ``Sandbox``, the CLI,
components, a runtime's start-up handshake) run the same coroutine to its end
on their thread's own loop (``blocking.py``). There is no second, blocking
implementation of the protocol to keep in step with this one.

One request is in flight at a time. An async caller that finds the channel
busy is refused at once (the daemon queues its callers itself and must never
block its loop); a blocking caller waits its turn, as threads sharing one
sandbox expect. A caller that gives up a call in flight: ``give_up``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..agent import wire
from ..errors import AgentProtocolError, CallTooLargeError, SandboxError, agent_error
from .loop_call import LoopCall, decode_message, settle_outcome
from .verdict import OutputCallback, b64_field

# Set by ``blocking.run_blocking`` for the coroutine it runs: a busy channel is waited for,
# in that thread (its loop serves nobody else), instead of refused; and a call given up
# before its answer is abandoned, since that loop stops when its caller does.
BLOCKING_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar("stockade_blocking_caller", default=False)

# How often a blocking caller waiting for the turn looks for a call whose loop is gone.
_ORPHAN_CHECK_S = 1.0

# Requests that run something a SIGINT can stop.
INTERRUPTIBLE = ("exec", "run_code", "run_cell")
# The agent's notifications: output, a read of at most 64 KiB in base64 (~88 KiB), and violations.
MAX_NOTIFICATION_BYTES = 256 * 1024


class AgentChannel:
    """Framed JSON-RPC requests to one agent, one at a time, and the notifications between them."""

    def __init__(
        self,
        conn: socket.socket,
        on_notice: Callable[[str, dict[str, Any]], None],
        redact: Callable[[bytes], bytes],
        on_abandon: Callable[[str], None],
    ) -> None:
        self.conn = conn
        self._on_notice = on_notice  # a notification other than output
        self._redact = redact  # output leaving the isolate (secrets taken out)
        # A call abandoned before its answer (``give_up``): the agent is now out of step, its
        # late answer would meet the next request. The sandbox ends the isolate.
        self._on_abandon = on_abandon
        self._next_id = 0
        self._turn = threading.Lock()  # held from a request's start until its call ends
        self._interrupt_lock = threading.Lock()  # an interrupt's frame never splits a request's
        self._current: LoopCall | None = None  # the call in flight
        self._running = ""  # the method of the request in flight (or last sent)
        self._running_session: str | None = None  # its interpreter session, for a cell
        self._interrupt_sent = False  # that request was interrupted already
        self.last_interrupted = False  # the last call that ended was (read when its run is judged)
        self._settle_waiters: list[asyncio.Future[None]] = []  # ``settled`` callers, told at the release
        self._close_requested = False
        self._drop_lock = threading.Lock()

    async def call(
        self,
        method: str,
        params: dict[str, Any],
        timeout: float,
        on_output: OutputCallback | None = None,
        check: Callable[[], None] | None = None,
    ) -> Any:
        """The reply's result; raises the agent's error, ``TimeoutError`` after ``timeout``
        seconds, ``EOFError``/``OSError`` for a lost connection, ``AgentProtocolError`` for
        a garbled one."""
        loop = asyncio.get_running_loop()
        return await awaited(lambda done: self.start(loop, method, params, timeout, on_output, done, check))

    def start(
        self,
        loop: asyncio.AbstractEventLoop,
        method: str,
        params: dict[str, Any],
        timeout: float,
        on_output: OutputCallback | None,
        done: Callable[[Any], None],
        check: Callable[[], None] | None = None,
    ) -> LoopCall:
        """Send the request now; ``done`` gets the reply's result or the exception that ended
        the call, in the loop turn that ends it, never before this returns (unless the
        returned call is aborted first). ``check`` runs once the turn is taken, before
        anything is sent: a caller that waited finds the sandbox as the last call left it."""
        if not self._take_turn():
            raise SandboxError("another call to this sandbox is in progress")
        try:
            if check is not None:
                check()
            self._next_id += 1
            msg_id = self._next_id
            frame = _encode(method, params, msg_id)
        except BaseException:
            self._turn.release()
            raise

        # What the agent may stream of a run's output: its cap, as the agent cuts it (a component's
        # run, collect=False, has none). An agent that streams more is not the host's: more would reach
        # a caller, or the buffer of a daemon's client that reads nothing, unbounded.
        cap = params.get("max_output_bytes")
        streamed = [cap if isinstance(cap, int) and params.get("collect", True) is not False else None]

        def on_message(payload: bytes) -> tuple[bool, Any]:
            message = decode_message(payload)
            if len(payload) > MAX_NOTIFICATION_BYTES and "id" not in message:
                # Decoded once, and the call (and the isolate) ends: a frame of 10 MiB of "[0]," costs
                # the host ~250 MB and seconds of its GIL to decode, and a reply comes once, a
                # notification any number of times.
                raise AgentProtocolError(
                    f"the agent sent a notification of {len(payload)} bytes, over its {MAX_NOTIFICATION_BYTES}"
                )
            return self._reply(message, msg_id, on_output, streamed)

        def release() -> None:
            call, self._current = self._current, None
            with self._interrupt_lock:
                # Read before the turn is free: the next call's start clears the flag, and it may
                # start (another thread) before this call's ``done`` has judged its run.
                self.last_interrupted = self._interrupt_sent
            try:
                if call is not None and call.aborted:
                    self._on_abandon(method)  # before the turn is free: the next caller finds it ended
            finally:
                self._turn.release()
                with self._interrupt_lock:
                    if self._close_requested:  # ``close`` came while this call was in flight
                        self.conn.close()
                waiters, self._settle_waiters = self._settle_waiters, []
                for waiter in waiters:
                    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits
                        waiter.get_loop().call_soon_threadsafe(_wake, waiter)

        with self._interrupt_lock:
            self._running, self._interrupt_sent = method, False
            self._running_session = params.get("session") if method == "run_cell" else None
        self._current = LoopCall(loop, self.conn, frame, timeout, on_message, done, release)
        return self._current

    async def settled(self) -> None:
        """Return once no call is in flight (one given up included: it ends when the agent
        answers, or at its timeout, or with the isolate)."""
        while (current := self._current) is not None and not current.ended:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._settle_waiters.append(waiter)
            if self._current is not current or current.ended:  # released meanwhile (another thread)
                continue
            await waiter

    def _take_turn(self) -> bool:
        """The channel's turn: at once for an async caller, waited for by a blocking one.

        A call left in flight by an async caller that gave it up (``give_up``) holds the
        turn until the agent answers, read by that caller's loop. If that loop has been
        closed since (``asyncio.run`` returned), nothing will read the answer: the call
        is dropped, which ends the isolate (``on_abandon``), and the turn is free.
        """
        blocking = BLOCKING_CALLER.get()
        while True:
            if self._turn.acquire(timeout=_ORPHAN_CHECK_S) if blocking else self._turn.acquire(blocking=False):
                return True
            with self._drop_lock:  # one waiter drops it, and only the call that holds the turn
                current = self._current
                if current is not None and not current.ended and current.loop.is_closed():
                    current.drop()
                    continue
            if not blocking:
                return False

    def interrupt(self, session: str | None = None) -> bool:
        """SIGINT to the run in flight, from any thread: one small frame, sent only when the
        socket has room at once (an agent that stops reading never makes this wait: the
        caller may be the daemon's loop). False when nothing interruptible is running, or
        (``session``) the run is not that interpreter's cell, or it was interrupted already."""
        with self._interrupt_lock:
            call = self._current
            if call is None or call.unsent or call.ended:
                return False
            if self._running not in INTERRUPTIBLE or self._interrupt_sent:
                return False
            if session is not None and self._running_session != session:
                return False
            _, room, _ = select.select([], [self.conn], [], 0)
            if not room:
                return False
            try:
                wire.write_all(self.conn.fileno(), wire.encode_message(wire.notification("interrupt", {})))
            except OSError:
                return False
            self._interrupt_sent = True
            return True

    def close(self) -> None:
        """End the connection. A call in flight, on whichever thread's loop, is woken by the
        shutdown and ends (EOF); the descriptor itself is closed once that call has let go of
        it: an epoll set forgets a closed descriptor without a word, and its waiter, with no
        deadline (a component's run), would wait forever."""
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)
        with self._interrupt_lock:
            self._close_requested = True
            current = self._current
        if current is None or current.ended:
            self.conn.close()
            return
        if current.loop.is_closed():  # nothing will run that call's end: end it here
            with self._drop_lock:
                current.drop()
        # Otherwise the release of that call closes the descriptor, once its loop has seen the end.

    def _reply(
        self, message: dict[str, Any], msg_id: int, on_output: OutputCallback | None, left: list[int | None]
    ) -> tuple[bool, Any]:
        """(True, result) for the reply to ``msg_id``; (False, None) after a notification; raises its error.
        ``left``: how much more output the run may stream (None: no cap)."""
        if "id" not in message:
            self._notification(message, on_output, left)
            return False, None
        if message.get("id") != msg_id:
            raise AgentProtocolError(f"reply for id {message.get('id')!r}, expected {msg_id}")
        if "error" in message:
            err = message["error"] if isinstance(message["error"], dict) else {}
            raise agent_error(err.get("code"), err.get("message", "agent error"), err.get("data"))
        return True, message.get("result")

    def _notification(self, message: dict[str, Any], on_output: OutputCallback | None, left: list[int | None]) -> None:
        params = message.get("params")
        if not isinstance(params, dict):
            return
        if message.get("method") != "output":
            self._on_notice(str(message.get("method")), params)
            return
        if on_output is None:
            return
        stream = params.get("stream")
        if stream in ("stdout", "stderr"):
            data = b64_field(params.get("data"))
            if left[0] is not None:
                left[0] -= len(data)
                if left[0] < 0:
                    raise AgentProtocolError("the agent streamed more output than the run's max_output_bytes")
            on_output(stream, self._redact(data))


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def awaited(start: Callable[[Callable[[Any], None]], LoopCall]) -> Any:
    """The outcome of a call in callback form (``start(done)``), awaited: its result, or the
    exception that ended it raised; a caller cancelled meanwhile gives the call up."""
    outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    call = start(functools.partial(settle_outcome, outcome))
    try:
        return await outcome
    finally:
        if not call.ended:  # cancelled while the agent works
            give_up(call)


def give_up(call: LoopCall) -> None:
    """A caller cancelled while its call was in flight. On a loop that goes on (the daemon's,
    an async SDK user's) the call is left to finish: the agent's answer is read when it
    comes and dropped, and the isolate takes the next call after it, as a client that
    drops its connection expects of a sandbox it kept. A blocking caller's loop stops
    with it (Ctrl-C): nothing would read that answer, so the call is abandoned and the
    isolate ended."""
    if BLOCKING_CALLER.get():
        call.abort()


def _encode(method: str, params: dict[str, Any], msg_id: int) -> bytes:
    try:
        return wire.encode_message(wire.request(method, params, msg_id))
    except wire.FrameError:
        # Nothing was sent: the isolate is untouched and the caller may retry smaller.
        raise CallTooLargeError(
            f"the {method} request is too large for the agent protocol's {wire.MAX_FRAME}-byte frame: "
            f"keep stdin, code and file data under {wire.MAX_DATA_BYTES} bytes per call"
        ) from None
