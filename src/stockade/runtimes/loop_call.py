"""``LoopCall``: one request to the agent driven by an event loop's callbacks (``channel.py``)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from ..agent import wire
from ..errors import AgentProtocolError
from .agent_waits import Deadline, agent_waits

# Frames one readiness callback handles before it gives the loop back (the watch is level-triggered:
# the rest are read in the next turn). An agent that writes frames as fast as the host reads them
# would otherwise keep this loop in one callback: its call's own timer, and every other caller of
# the loop (a daemon's), would wait until it stopped.
FRAMES_PER_TURN = 64


def decode_message(payload: bytes) -> dict[str, Any]:
    try:
        message = wire.decode_payload(payload)
    except wire.RPCError as exc:
        raise AgentProtocolError(f"the agent sent invalid JSON: {exc.data}") from None
    if not isinstance(message, dict):
        raise AgentProtocolError("the agent sent a non-object message")
    return message


class LoopCall:
    """One request to the agent and the wait for its reply, driven by the event loop's callbacks.

    The frame is written straight to the socket (the loop watches for room
    only when the socket has none), then the reply is read by a reader
    callback, frame by frame, exactly as many bytes as each frame holds; one
    timer bounds the whole call. ``done`` gets the reply's result, or the
    exception that ended the call, in the loop turn that ends it. Nothing
    wakes a task on the way: on a host whose caches have gone cold while the
    isolate ran, each step taken after the agent answers is paid for in the
    caller's latency.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        frame: bytes,
        timeout: float,
        on_message: Callable[[bytes], tuple[bool, Any]],
        done: Callable[[Any], None],
        release: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.on_message = on_message  # a frame's payload -> (the reply?, its result); raises to end the call
        self.done = done
        self.release = release
        self.unsent = memoryview(frame)
        self.received = bytearray()
        self.length: int | None = None  # the payload length of the frame being read, once its header is in
        self.writing = self.reading = self.ended = self.aborted = False
        # Every send and receive passes MSG_DONTWAIT, so the socket stays in the
        # blocking mode the channel's interrupt (from another thread) expects, with
        # no fcntl calls to switch it. A timeout set on it would make Python poll before each
        # call, though: then it is made non-blocking for the call's length.
        self.restore_blocking = sock.gettimeout() is not None
        if self.restore_blocking:
            sock.setblocking(False)
        self.waits = agent_waits(loop)
        self.on_readable = self._receive  # one bound method: unwatch() knows it by identity
        self.timer: Deadline | None = None
        # Sent now, in the caller's loop turn, before anything else is set up;
        # an end met on the way (a dead agent) reaches ``done`` a turn later:
        # never before the caller has the call.
        self.starting = True
        self._send()
        self.starting = False
        if not self.ended:
            self.timer = self.waits.call_later(timeout, self._timed_out)

    def abort(self) -> None:
        """Stop watching the agent; ``done`` will not be called."""
        self.aborted = True
        self._finish()
        self._let_go()

    def drop(self) -> None:
        """Its loop was closed with the call in flight: let go of the call as an abort would,
        from whichever thread finds it (the closed loop runs nothing any more)."""
        if not self.ended:
            self.ended = self.aborted = True
            self.release()

    def _send(self) -> None:
        while self.unsent and not self.ended:
            try:
                sent = self.sock.send(self.unsent, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not self.writing:
                    self.writing = True
                    self.loop.add_writer(self.fd, self._send)
                return
            except OSError as exc:
                self._end(exc)
                return
            self.unsent = self.unsent[sent:]
        if self.ended:
            return
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.fd)
        self.reading = True
        self.waits.watch(self.fd, self.on_readable)  # level-triggered: an answer already there is seen too

    def _timed_out(self) -> None:
        self._end(TimeoutError("the agent did not answer in time"))

    def _receive(self) -> None:
        frames = 0
        while not self.ended:
            need = wire.HEADER_SIZE if self.length is None else self.length
            try:
                chunk = self.sock.recv(min(need - len(self.received), 1 << 20), socket.MSG_DONTWAIT) if need else b""
            except BlockingIOError:
                return
            except OSError as exc:
                self._end(exc)
                return
            if need and not chunk:
                if self.length is None and not self.received:
                    self._end(EOFError("the agent closed the connection"))
                else:
                    self._end(AgentProtocolError("the agent closed the connection in the middle of a frame"))
                return
            self.received += chunk
            if len(self.received) < need:
                continue
            if self.length is None:
                try:
                    self.length = wire.frame_length(bytes(self.received))
                except wire.FrameError as exc:
                    self._end(AgentProtocolError(str(exc)))
                    return
                self.received = bytearray()
                continue
            payload, self.received, self.length = bytes(self.received), bytearray(), None
            try:
                finished, result = self.on_message(payload)
            except Exception as exc:  # noqa: BLE001 - the call's outcome, handed to ``done``
                self._end(exc)
                return
            if finished:
                self._end(result)
                return
            frames += 1
            if frames >= FRAMES_PER_TURN:
                return

    def _end(self, outcome: Any) -> None:
        if not self.ended:
            self._finish()
            if self.starting:
                self.loop.call_soon(self._deliver, outcome)
            else:
                self._hand_over(outcome)

    def _deliver(self, outcome: Any) -> None:
        if not self.aborted:
            self._hand_over(outcome)

    def _hand_over(self, outcome: Any) -> None:
        done = self.done
        self._let_go()
        done(outcome)

    def _let_go(self) -> None:
        """Drop what an ended call holds. The call and its bound reader are a reference cycle, freed
        only by a collection of the oldest generation: it would keep the request's frame and, through
        ``done``, the reply (a listing of thousands of names, a file's bytes) alive until then."""
        self.on_readable = self.on_message = _ignored
        self.done = _ignored
        self.unsent = memoryview(b"")
        self.received = bytearray()

    def _finish(self) -> None:
        if self.ended:
            return
        self.ended = True
        try:
            if self.timer is not None:
                self.waits.cancel(self.timer)
            if self.writing:
                self.loop.remove_writer(self.fd)
            if self.reading:
                self.waits.unwatch(self.fd, self.on_readable)
            if self.restore_blocking:
                try:
                    self.sock.setblocking(True)
                except OSError:
                    pass  # closed under the call (the sandbox was closed): nothing to restore
        finally:
            self.release()  # even when Ctrl-C lands in here: the channel's turn is never kept


def _ignored(*_: Any) -> Any:
    """What an ended call's callbacks become (``LoopCall._let_go``)."""
    return None


def settle_outcome(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
