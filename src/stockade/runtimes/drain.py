"""Pipes that an isolate's host program writes (runsc's stderr and log, QEMU's console and stderr), read as they fill.

The host keeps no more of what an isolate makes it write than it decides to.
A regular file that runsc appends to grows with whatever the sandbox makes it
log: code that floods a traced syscall writes megabytes a second, to the
host's disk, and reading the file back reads all of it into memory. A pipe
holds 64 KiB. One thread reads every registered pipe as it fills and hands
each chunk to its consumer, which keeps what it needs and no more (a tail of
bounded size, counted violations). A writer that outpaces the thread waits
for it: a flood slows down; the host does not fill up. A pipe may also be read
at a rate (``watch(..., per_s=...)``): past it the thread leaves the pipe
unread for a while, so that its writer waits, and what the host spends
parsing a flood (the Sentry's log: every traced call a JSON record) is bounded
by the pipe's rate, not by the isolate's CPU.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios
import threading
import time
import weakref
from collections.abc import Callable

from ..ratelimit import TokenBucket

READ_CHUNK = 65536

Consumer = Callable[[bytes], None]


class Drain:
    """One thread reading the pipes of every live isolate that has registered one."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._consumers: dict[int, Consumer] = {}
        self._rates: dict[int, TokenBucket] = {}  # the pipes read at a rate, their bytes
        self._paused: dict[int, float] = {}  # pipes left unread, until when (monotonic)
        self._lock = threading.Lock()  # one reader of a pipe at a time, so chunks stay in order
        self._thread: threading.Thread | None = None

    def watch(self, fd: int, consume: Consumer, per_s: int | None = None) -> None:
        """Take ownership of ``fd`` (a pipe's or FIFO's read end): ``consume`` gets each chunk read
        from it, in order, from the drain's thread or from a caller of ``flush``; by the thread,
        ``per_s`` bytes a second at most (a second's worth at once), when given."""
        os.set_blocking(fd, False)
        with self._lock:
            self._consumers[fd] = consume
            if per_s is not None:
                self._rates[fd] = TokenBucket(per_s, per_s)
            self._epoll.register(fd, select.EPOLLIN)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="stockade-drain", daemon=True)
                self._thread.start()

    def flush(self, fd: int) -> None:
        """Consume, in the caller's thread, what ``fd`` holds now: everything written to it
        before this call has reached its consumer when this returns. Bounded by what the
        pipe held at the call, so a writer that keeps writing cannot keep the caller here."""
        with self._lock:
            consume = self._consumers.get(fd)
            if consume is None:
                return
            left = _pending(fd)
            while left > 0:
                chunk = _read(fd, min(left, READ_CHUNK))
                if not chunk:
                    return
                left -= len(chunk)
                consume(chunk)

    def forget(self, fd: int) -> None:
        """The owner is done with ``fd``: stop reading it and close it."""
        with self._lock:
            if self._consumers.pop(fd, None) is None:
                return
            self._rates.pop(fd, None)
            self._paused.pop(fd, None)
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # retired already (its writers were gone)
            os.close(fd)

    def _loop(self) -> None:
        while True:
            with self._lock:
                wake = min(self._paused.values(), default=None)
            try:
                events = self._epoll.poll(-1 if wake is None else max(0.0, wake - time.monotonic()))
            except InterruptedError:
                continue
            self._resume_due()
            for fd, _mask in events:
                with self._lock:
                    consume = self._consumers.get(fd)
                    if consume is None or fd in self._paused:
                        continue
                    chunk = _read(fd, READ_CHUNK)
                    if chunk:
                        try:
                            consume(chunk)
                        except Exception:  # noqa: BLE001, S110 - one consumer's bug must not stop every isolate's drain
                            pass
                        self._charge(fd, len(chunk))
                    elif chunk == b"":
                        # Every writer is gone: stop polling, but leave the fd open. Only the
                        # owner's ``forget`` closes it, so its number cannot be reused (by the
                        # next isolate's pipe) while the owner still holds it.
                        try:
                            self._epoll.unregister(fd)
                        except OSError:
                            pass

    def _charge(self, fd: int, size: int) -> None:
        """Count ``size`` bytes read from ``fd`` (the lock held): one past its rate is left unread
        until the rate has paid for what it took."""
        rate = self._rates.get(fd)
        if rate is not None and rate.spend(size) < 0:
            self._paused[fd] = rate.ready_at(0.0)
            try:
                self._epoll.unregister(fd)  # not polled at all: a hang-up would be reported meanwhile
            except OSError:
                pass  # retired (its writers gone): nothing more to read

    def _resume_due(self) -> None:
        with self._lock:
            now = time.monotonic()
            for fd in [fd for fd, due in self._paused.items() if due <= now]:
                del self._paused[fd]
                if fd in self._consumers:
                    self._epoll.register(fd, select.EPOLLIN)


def _read(fd: int, size: int) -> bytes | None:
    """Up to ``size`` bytes; b"" at end of file; None when there is nothing to read now."""
    try:
        return os.read(fd, size)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _pending(fd: int) -> int:
    """How many bytes the pipe holds now."""
    try:
        raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def weak(method: Consumer) -> Consumer:
    """A consumer that calls the bound ``method`` while its object lives, without keeping it
    alive: a sandbox its caller forgot is still collected, and its ``__del__`` closes it."""
    ref = weakref.WeakMethod(method)

    def consume(chunk: bytes) -> None:
        bound = ref()
        if bound is not None:
            bound(chunk)

    return consume


CUT = b"\n"  # in a line from ``Lines``: where a line too long was cut (no whole line holds one)


class Lines:
    """Chunks of a log, as whole lines. A line longer than ``limit`` is dropped whole (its
    start would be lost, and a line read from its middle could say anything), or, with
    ``ends``, cut: its first and last ``ends`` bytes, joined by ``CUT``. What is kept of a
    line never grows past ``limit``, however long it goes on."""

    def __init__(self, limit: int, ends: int = 0) -> None:
        self.limit = limit
        self.ends = min(ends, limit // 2)
        self._partial = b""  # the line so far; once it is too long, its last ``ends`` bytes
        self._head: bytes | None = None  # the first ``ends`` bytes of a line too long

    def feed(self, chunk: bytes) -> list[bytes]:
        *ended, rest = chunk.split(b"\n")
        lines = []
        for piece in ended:
            self._add(piece)
            line, head = self._partial, self._head
            self._partial, self._head = b"", None
            if head is None:
                lines.append(line)
            elif self.ends:
                lines.append(head + CUT + line)
        self._add(rest)
        return lines

    def _add(self, piece: bytes) -> None:
        self._partial += piece
        if self._head is None and len(self._partial) > self.limit:
            self._head = self._partial[: self.ends]
        if self._head is not None:
            self._partial = self._partial[len(self._partial) - self.ends :]


class Tail:
    """The last ``limit`` bytes written to a pipe (what a program said last)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._data = b""

    def feed(self, chunk: bytes) -> None:
        self._data = (self._data + chunk[-self.limit :])[-self.limit :]

    def text(self) -> str:
        return self._data.decode(errors="replace")


_drain: Drain | None = None
_drain_lock = threading.Lock()


def drain() -> Drain:
    global _drain
    with _drain_lock:
        if _drain is None:
            _drain = Drain()
        return _drain
