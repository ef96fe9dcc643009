"""An event loop's waits on agents' sockets: one epoll set and one timer for all of them.

A call to an agent driven by the loop (``loop_call.LoopCall``) waits for its
socket to become readable, and for a deadline. Through asyncio's own API that
is a selector registration (a key, a handle, a system call) and a timer
handle for every call, and as much again to undo them: 205 µs here right
after an idle spell, against about 30 µs this way (docs/performance.md), and
half of it lies between the agent's answer and the caller's. So the sockets
are registered in an epoll set of their own, which the loop watches as one
reader, and the deadlines are kept in one heap under one timer, which is set
again only when a deadline comes due earlier than the one it waits for (runs
share a timeout, so a new deadline is almost always later).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import select
import weakref
from collections.abc import Callable


class Deadline:
    """A callback due at ``when`` (the loop's clock); ``callback`` is None once it is cancelled or called."""

    __slots__ = ("callback", "when")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback: Callable[[], None] | None = callback


class AgentWaits:
    """Readable-socket callbacks and deadlines for one event loop. Loop thread only."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the loop holds this (as a reader), not the other way round
        self._epoll = select.epoll()
        self._readers: dict[int, Callable[[], None]] = {}
        self._deadlines: list[tuple[float, int, Deadline]] = []  # a heap; the int breaks ties
        self._order = itertools.count()
        self._live = 0  # deadlines in the heap still to come
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        loop.add_reader(self._epoll.fileno(), self._ready)

    # ---- sockets ------------------------------------------------------------------------

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable`` whenever ``fd`` is readable (level-triggered), until ``unwatch``."""
        self._readers[fd] = on_readable
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:
            self._epoll.modify(fd, select.EPOLLIN)

    def unwatch(self, fd: int, on_readable: Callable[[], None]) -> None:
        """Stop calling ``on_readable`` for ``fd`` (a later ``watch`` of the same number by another call stays)."""
        if self._readers.get(fd) != on_readable:
            return
        del self._readers[fd]
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass  # closed under the call: the kernel has dropped it from the set already

    def _ready(self) -> None:
        for fd, _events in self._epoll.poll(0):
            reader = self._readers.get(fd)
            if reader is not None:
                reader()
            else:  # nobody waits on it any more: never wake for it again
                try:
                    self._epoll.unregister(fd)
                except (OSError, ValueError):
                    pass

    # ---- deadlines ----------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Deadline:
        """Call ``callback`` in ``delay`` seconds, unless ``cancel`` is given what this returns first."""
        loop = self._live_loop()
        deadline = Deadline(loop.time() + delay, callback)
        heapq.heappush(self._deadlines, (deadline.when, next(self._order), deadline))
        self._live += 1
        if deadline.when < self._timer_at:
            self._arm(loop, deadline.when)
        elif len(self._deadlines) > 64 and len(self._deadlines) > 2 * self._live:
            # Cancelled deadlines are left in the heap; drop them before they pile up.
            self._deadlines = [entry for entry in self._deadlines if entry[2].callback is not None]
            heapq.heapify(self._deadlines)
        return deadline

    def cancel(self, deadline: Deadline) -> None:
        if deadline.callback is not None:
            deadline.callback = None
            self._live -= 1

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = loop.call_at(when, self._expire), when

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        loop = self._live_loop()
        now = loop.time()
        heap = self._deadlines
        while heap and (heap[0][2].callback is None or heap[0][0] <= now):
            deadline = heapq.heappop(heap)[2]
            callback = deadline.callback
            if callback is not None:
                self.cancel(deadline)
                callback()
        if heap and self._timer is None:  # a callback may have set a nearer one already
            self._arm(loop, heap[0][0])

    def _live_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop()
        if loop is None:
            raise RuntimeError("the event loop of these waits is gone")
        return loop


_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AgentWaits] = weakref.WeakKeyDictionary()
_last: tuple[weakref.ref[asyncio.AbstractEventLoop], AgentWaits] | None = None


def agent_waits(loop: asyncio.AbstractEventLoop) -> AgentWaits:
    """The waits of ``loop``, made on first use; the last one used is looked up first."""
    global _last
    last = _last
    if last is not None and last[0]() is loop:
        return last[1]
    waits = _BY_LOOP.get(loop)
    if waits is None:
        waits = _BY_LOOP[loop] = AgentWaits(loop)
    _last = (weakref.ref(loop), waits)
    return waits


def forget(loop: asyncio.AbstractEventLoop) -> None:
    """Drop ``loop``'s waits before it is closed (a thread's own loop, ``blocking.py``): its
    epoll set is closed, and nothing of it keeps the loop alive (its timer handle would)."""
    global _last
    waits = _BY_LOOP.pop(loop, None)
    if _last is not None and _last[1] is waits:
        _last = None
    if waits is None:
        return
    if waits._timer is not None:
        waits._timer.cancel()
        waits._timer = None
    waits._readers.clear()
    waits._deadlines.clear()
    if not loop.is_closed():
        loop.remove_reader(waits._epoll.fileno())
    waits._epoll.close()
