"""The daemon's sandbox slots: how many isolates run or are held at once, overall and per peer uid.

A slot is taken for every one-shot run and every held sandbox, and given
back when it ends. When none is free a request waits, first come first
served, in a bounded queue for a bounded time, and is told "busy" past
either bound; one uid may also be held to a share of the slots
(``STOCKADE_MAX_SANDBOXES_PER_UID``) so that it cannot leave the others none.

This is a counter and a queue of futures rather than an ``asyncio.Semaphore``:
a free slot is the common case, and taking one here is a few comparisons and
a subtraction in the loop turn that asks, where the semaphore's ``acquire`` is
a coroutine to drive after a ``locked()`` that walks its waiters. Taken and
given back right after a 30 ms sleep: 5 µs here, against 20 µs for the
semaphore with a ``Counter`` per uid (docs/performance.md).
"""

from __future__ import annotations

import asyncio
from collections import deque

from .errors import RequestError


class Slots:
    """``total`` slots, at most ``per_uid`` of them (None: no share) held by one uid."""

    def __init__(self, total: int, per_uid: int | None, queue_limit: int, queue_timeout_s: float) -> None:
        self.total = total
        self.free = total
        self.per_uid = per_uid
        self.queue_limit = queue_limit
        self.queue_timeout_s = queue_timeout_s
        self.held: dict[int, int] = {}  # uid -> slots it holds; a uid holding none is absent
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Requests queued for a slot now."""
        return sum(1 for waiter in self._waiters if not waiter.done())

    def take_now(self, uid: int) -> bool:
        """Take a slot for ``uid`` in this loop turn; False when none is free (or some
        request waits for one already: it comes first) or ``uid`` has its share."""
        if not self.free or self._waiters or not self._has_room(uid):
            return False
        self.free -= 1
        self.held[uid] = self.held.get(uid, 0) + 1
        return True

    async def take(self, uid: int) -> None:
        """Take a slot for ``uid``: now, after a wait in the bounded queue, or not at all
        (``RequestError`` "busy", also when ``uid`` has its share)."""
        self._check_room(uid)
        if self.take_now(uid):
            return
        if self.waiting >= self.queue_limit:
            raise RequestError(
                f"busy: {self.total} sandboxes are running and {self.waiting} requests are waiting", "busy"
            )
        turn = asyncio.get_running_loop().create_future()
        self._waiters.append(turn)
        try:
            await asyncio.wait_for(turn, self.queue_timeout_s)
        except BaseException as exc:
            if turn.done() and not turn.cancelled():
                self._pass_on()  # handed a slot just as it gave up waiting: the next one gets it
            elif turn in self._waiters:
                self._waiters.remove(turn)
            if isinstance(exc, TimeoutError):
                raise RequestError(
                    f"busy: no sandbox slot became free within {self.queue_timeout_s:g} s", "busy"
                ) from None
            raise
        # Handed a slot by release(): it counts as this uid's from now on.
        try:
            self._check_room(uid)  # its other requests may have taken the rest of its share meanwhile
        except RequestError:
            self._pass_on()
            raise
        self.held[uid] = self.held.get(uid, 0) + 1

    def release(self, uid: int) -> None:
        """Give back a slot ``uid`` holds."""
        left = self.held[uid] - 1
        if left:
            self.held[uid] = left
        else:
            del self.held[uid]
        self._pass_on()

    def _pass_on(self) -> None:
        """A slot is free: to the first request still waiting, else back to the count."""
        while self._waiters:
            turn = self._waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.free += 1

    def _has_room(self, uid: int) -> bool:
        return self.per_uid is None or self.held.get(uid, 0) < self.per_uid

    def _check_room(self, uid: int) -> None:
        # One peer must not be able to take every slot: the others would get "busy" until it let go.
        if not self._has_room(uid):
            raise RequestError(
                f"busy: uid {uid} already has {self.held[uid]} sandboxes running or held, "
                f"its limit (STOCKADE_MAX_SANDBOXES_PER_UID)",
                "busy",
            )
