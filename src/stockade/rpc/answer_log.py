"""What the daemon's log says of the answers it gives: a line each a moment after it (``AnswerLog``),
and its refusals before a method is read, a line a window per uid (``Refusals``)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("stockade.daemon")


class Refusals:
    """Refused requests and connections in the log, a line a window per uid at most: what a peer
    sends to be refused (lines of garbage, bad signatures, connections past its limit) is its own
    choice, and a line each flooded the daemon's log (110,000 lines in 5 s, hiding its warnings)."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._counts: dict[int, dict[str, int]] = {}
        self._levels: dict[int, int] = {}
        self._pids: dict[int, deque[int]] = {}  # the last few refused processes of each uid, named
        self._said_at: dict[int, float] = {}
        self._due: dict[int, asyncio.TimerHandle] = {}

    def note(self, uid: int, what: str, level: int = logging.INFO, pid: int | None = None) -> None:
        """Count a refusal of ``uid``'s (``what``: a few kinds, never a process's own words): said at
        once when its last line is a window old, else with the others at the window's end (none is
        left unsaid). ``pid``: the refused process, one of the last 3 named."""
        counts = self._counts.setdefault(uid, {})
        counts[what] = counts.get(what, 0) + 1
        self._levels[uid] = max(level, self._levels.get(uid, level))
        if pid is not None:
            pids = self._pids.setdefault(uid, deque(maxlen=3))
            if pid not in pids:
                pids.append(pid)
        wait = self._said_at.get(uid, -self.window_s) + self.window_s - time.monotonic()
        if wait <= 0:
            self._say(uid)
        elif uid not in self._due:
            self._due[uid] = asyncio.get_running_loop().call_later(wait, self._say, uid)

    def _say(self, uid: int) -> None:
        self._due.pop(uid, None)
        counts = self._counts.pop(uid, {})
        level = self._levels.pop(uid, logging.INFO)
        pids = self._pids.pop(uid, ())
        self._said_at[uid] = time.monotonic()
        if counts:
            said = ", ".join(f"{n} {what}" for what, n in counts.items())
            by = f" (lately pid {', '.join(map(str, pids))})" if pids else ""
            log.log(level, "uid=%d refused %s%s (a line each %g s at most)", uid, said, by, self.window_s)


class AnswerLog:
    """The log line and the request metrics of each answer, a moment after the answer.

    Writing them costs about 0.1 ms here, and a client just answered is often
    woken onto the daemon's own CPU (the kernel expects a process that has
    just written to a socket to sleep next): every step the daemon takes
    before it sleeps is one the client waits for. So entries are kept, and
    written by one timer ``delay_s`` after the first of them.
    """

    def __init__(self, observe: Callable[[str, str, str, float], None], delay_s: float = 0.002) -> None:
        self.observe = observe  # (door, method, code, seconds): the request metrics
        self.delay_s = delay_s
        self.refusals = Refusals()
        self._pending: list[tuple[int, str, str, str, float]] = []
        self._timer: asyncio.TimerHandle | None = None

    def add(self, uid: int, method: str, outcome: str, run: str, elapsed_ms: float) -> None:
        self._pending.append((uid, method, outcome, run, elapsed_ms))
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay_s, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, []
        for uid, method, outcome, run, elapsed_ms in pending:
            self.observe("unix", method, outcome, elapsed_ms / 1000)
            if method == "refused":  # refused before any method was read: counted, said now and then
                self.refusals.note(uid, outcome)
            elif method != "ping":
                log.info("uid=%d %s %s%s %.1fms", uid, method, outcome, run, elapsed_ms)
