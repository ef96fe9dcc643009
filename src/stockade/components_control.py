"""A component's control socket: ``stockade exec`` and ``stockade attach`` reach its supervisor here.

The supervisor listens on ``control.sock`` in the component's directory (the
directory is 0700, the socket 0600, and a peer of another uid than the
supervisor's, root aside, is refused). One JSON object a line each way; bytes
are base64:

- ``{"op": "exec", "argv": [...], "stdin": bool}``: run a command in the
  component's isolate, next to its main command. The supervisor answers
  ``{"stream": "stdout"|"stderr", "data": ...}`` as output comes, then
  ``{"exit_code": N|null, "error": str|null}``. The client may send
  ``{"stdin": ...}``, ``{"eof": true}`` and ``{"signal": N}``; a client that
  goes away has its command killed (SIGKILL to its process group).
- ``{"op": "attach"}`` (a component started with ``--stdin``): ``{"attached":
  true}``, then the main command's stdout as ``{"stream": "stdout", ...}``;
  the client's ``{"stdin": ...}`` goes to its stdin. ``{"detach": true}`` (or
  the client going away) detaches it: the command's stdin stays open for the next
  client. The supervisor's ``{"end": why}`` says the attachment is over.
- Errors: ``{"error": why}``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import queue
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .components_pump import Job, Pump

SOCKET = "control.sock"
MAX_SESSIONS = 32  # exec and attach clients served at once (each two threads and a descriptor)
ACCEPT_PAUSE_S, ACCEPT_PAUSE_MAX_S = 0.05, 1.0
MAX_LINE = 1024 * 1024
CHUNK = 64 * 1024
DETACH_WAIT_S = 30.0  # for the supervisor's next look at the output, after a client detaches
# After an attached client's input ends, what the command answers still reaches it: it stays until
# the command has been quiet this long since that input (or its last output), at most DETACH_GRACE_S.
DETACH_QUIET_S = 0.5
DETACH_GRACE_S = 5.0
MAX_BACKLOG = 8 * 1024 * 1024  # output queued for a client: past it, its command waits (exec) or it is detached


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("not base64")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None


@contextlib.contextmanager
def socket_address(directory: str) -> Iterator[str]:
    """The socket's path, or a short alias of it: a Unix socket's path must fit 108 bytes."""
    path = os.path.join(directory, SOCKET)
    if len(os.fsencode(path)) < 100:
        yield path
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET}"
    finally:
        os.close(fd)


def send_line(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


class Lines:
    """JSON objects, one a line, from a socket; None at its end (or a line past MAX_LINE)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def next(self) -> dict[str, Any] | None:
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[: end + 1]
                try:
                    message = json.loads(line)
                except (ValueError, RecursionError):  # nested past the parser's depth: no message either
                    return None
                return message if isinstance(message, dict) else None
            if len(self.buffer) > MAX_LINE:
                return None
            try:
                chunk = self.sock.recv(CHUNK)
            except OSError:
                return None
            if not chunk:
                return None
            self.buffer += chunk


# ---- the supervisor's side --------------------------------------------------------------------


class ControlServer:
    """The supervisor's listening socket; a thread per client."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, SOCKET)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # no moment when the socket is open to others
        try:
            with socket_address(directory) as address:
                self.sock.bind(address)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self.sock.listen(16)
        self._lock = threading.Lock()
        self._pump: Pump | None = None
        self._main: Job | None = None
        self._attached: _Session | None = None
        self._closed = False
        self._sessions = threading.BoundedSemaphore(MAX_SESSIONS)
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    @property
    def attached(self) -> bool:
        return self._attached is not None

    def serve(self, pump: Pump, main: Job) -> None:
        """A run has started: clients may exec in it, and attach to ``main``."""
        with self._lock:
            self._pump, self._main = pump, main

    def unserve(self, why: str) -> None:
        """The run is over: an attached client is told ``why``; new requests are refused."""
        with self._lock:
            self._pump, self._main = None, None
            attached, self._attached = self._attached, None
        if attached is not None:
            attached.finish({"end": why})

    def current(self) -> tuple[Pump | None, Job | None]:
        with self._lock:
            return self._pump, self._main

    def to_attached(self, data: bytes) -> None:
        """The main command's stdout, for the attached client (the supervisor's main thread)."""
        session = self._attached
        if session is None:
            return
        if session.backlog() > MAX_BACKLOG:
            self.detach(session, "detached: the client did not read the command's output")
            return
        session.send({"stream": "stdout", "data": b64(data)})

    def attach(self, session: _Session) -> str | None:
        """Attach ``session`` to the main command's stdin and stdout; why not, if it cannot be."""
        with self._lock:
            if self._main is None:
                return "it is not running (it is restarting, or stopping)"
            if not self._main.keep_stdin:
                return "it was not started with --stdin"
            if self._attached is not None:
                return "another client is attached to it"
            self._attached = session
        return None

    def detach(self, session: _Session, why: str) -> None:
        with self._lock:
            if self._attached is not session:
                return
            self._attached = None
        session.finish({"end": why})

    def close(self) -> None:
        with self._lock:
            self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        pause = ACCEPT_PAUSE_S
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                if self._closed:
                    return
                # Out of descriptors for a moment (EMFILE, ENFILE): tried again after a pause, not
                # at once (that pinned a core for as long as the descriptors were held).
                time.sleep(pause)
                pause = min(pause * 2, ACCEPT_PAUSE_MAX_S)
                continue
            pause = ACCEPT_PAUSE_S
            if not _trusted_peer(conn) or not self._sessions.acquire(blocking=False):
                conn.close()  # another user's; or as many sessions as are served at once are open
                continue
            session: _Session | None = None
            try:
                session = _Session(conn, self)  # starts its writer
                threading.Thread(target=self._serve, args=(session,), name="control-client", daemon=True).start()
            except RuntimeError:  # no thread to spare: this client goes (its writer too), the next is served
                if session is not None:
                    session.finish()
                self._sessions.release()
                conn.close()

    def _serve(self, session: _Session) -> None:
        try:
            session.serve()
        finally:
            self._sessions.release()


def _trusted_peer(conn: socket.socket) -> bool:
    """The supervisor's own uid, or root: the 0700 directory already says so; this says it twice."""
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    _, uid, _ = struct.unpack("3i", creds)
    return uid in (os.getuid(), 0)


class _Session:
    """One client. Its reader is the thread in ``serve``; a writer thread sends what is queued."""

    def __init__(self, conn: socket.socket, server: ControlServer) -> None:
        self.conn = conn
        self.server = server
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._backlog = 0
        self._done = False
        self.finished = threading.Event()  # finish() was called
        self.last_output = 0.0  # when output was last queued for it (monotonic)
        self._writer = threading.Thread(target=self._write, name="control-writer", daemon=True)
        self._writer.start()

    def send(self, message: dict[str, Any]) -> None:
        if "stream" in message:
            self.last_output = time.monotonic()
        line = json.dumps(message).encode() + b"\n"
        with self._lock:
            if self._done:
                return
            self._backlog += len(line)
        self._queue.put(line)

    def finish(self, message: dict[str, Any] | None = None) -> None:
        """Send ``message`` last; the connection then ends."""
        if message is not None:
            self.send(message)
        with self._lock:
            already, self._done = self._done, True
        if not already:
            self._queue.put(None)
        self.finished.set()

    def backlog(self) -> int:
        with self._lock:
            return self._backlog

    def gone(self) -> bool:
        """Whether the client closed its connection: a hang-up both ways, not only its end of input
        (``shutdown(SHUT_WR)``: it still reads the answer)."""
        poller = select.poll()
        poller.register(self.conn, select.POLLHUP)
        return any(events & (select.POLLHUP | select.POLLERR) for _, events in poller.poll(0))

    def _write(self) -> None:
        while True:
            line = self._queue.get()
            if line is None:
                break
            try:
                self.conn.sendall(line)
            except OSError:
                with self._lock:
                    self._done = True
                break
            with self._lock:
                self._backlog -= len(line)
        with contextlib.suppress(OSError):
            self.conn.shutdown(socket.SHUT_RDWR)  # wakes the reader

    def serve(self) -> None:
        try:
            lines = Lines(self.conn)
            request = lines.next()
            op = request.get("op") if request else None
            if op == "exec" and request is not None:
                self._exec(request, lines)
            elif op == "attach":
                self._attach(lines)
            else:
                self.finish({"error": f"unknown request {op!r}"})
        finally:
            self.finish()
            self._writer.join()
            self.conn.close()

    def _exec(self, request: dict[str, Any], lines: Lines) -> None:
        from .components_pump import Job

        argv = request.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
            self.finish({"error": "exec: argv must be a non-empty list of strings", "exit_code": None})
            return
        pump, _ = self.server.current()
        if pump is None:
            self.finish({"error": "it is not running (it is restarting, or stopping)", "exit_code": None})
            return
        job = Job(
            argv,
            request.get("stdin") is True,
            lambda stream, data: self.send({"stream": stream, "data": b64(data)}),
            lambda code, error: self.finish({"exit_code": code, "error": error}),
            lambda: self.backlog() > MAX_BACKLOG,
        )
        pump.submit(job)
        try:
            while (message := lines.next()) is not None:
                try:
                    if "stdin" in message:
                        if not job.feed(unb64(message["stdin"]), self.gone):
                            break
                    elif message.get("eof") is True:
                        job.close_stdin()
                    elif "signal" in message:
                        job.signal(_signal_number(message["signal"]))
                except (ValueError, TypeError) as exc:
                    self.finish({"error": f"exec: a bad message ({exc}): its command was killed", "exit_code": None})
                    break
                pump.wake()
        finally:
            if not job.ended:  # its client is gone (or sent what ended its session): so is its command
                job.signal(signal.SIGKILL)
                pump.wake()

    def _attach(self, lines: Lines) -> None:
        why = self.server.attach(self)
        if why is not None:
            self.finish({"error": why})
            return
        try:
            self._attached(lines)
        finally:  # whatever ended the session: the next client may attach
            self.server.detach(self, "detached")

    def _attached(self, lines: Lines) -> None:
        pump, main = self.server.current()
        self.send({"attached": True})
        while (message := lines.next()) is not None:
            if message.get("detach") is True:
                break
            if "stdin" in message and main is not None and pump is not None:
                try:
                    if not main.feed(unb64(message["stdin"]), self.gone):
                        message = None  # gone: nobody waits for an answer
                        break
                except (ValueError, TypeError):
                    break
                pump.wake()
        if message is not None and pump is not None:
            # Its input ended (``echo REQUEST | stockade attach``): the answer to it still comes.
            ended = time.monotonic()
            while not self.finished.is_set() and time.monotonic() < ended + DETACH_GRACE_S:
                if time.monotonic() - max(ended, self.last_output) >= DETACH_QUIET_S:
                    break
                self.finished.wait(0.05)
        # What the command wrote by the next look at its output still comes; then the end.
        if pump is not None:
            pump.after_tick(lambda: self.server.detach(self, "detached"))
            self.finished.wait(DETACH_WAIT_S)


# ---- the client's side (the CLI) -----------------------------------------------------------------


def _signal_number(value: object) -> int:
    """A signal a client may send (a number the relay in the isolate takes: a file name's digits)."""
    if type(value) is not int or not 0 < value < signal.NSIG:
        raise ValueError(f"not a signal number: {value!r}")
    return value
