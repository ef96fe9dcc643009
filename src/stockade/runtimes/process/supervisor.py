"""The host's answer to every blocked call of the process runtime's isolates (seccomp user notification).

One thread reads every live isolate's listener: a call the profile blocks is
recorded (seccomp.violation_for) before it is answered EPERM, an allowlist
isolate's network calls are read (netcalls.py). That thread's time is this
host process's, not any isolate's cgroup's, so each isolate's notifications are
budgeted (``NOTIFY_PER_S``): a flood of blocked calls slows the isolate that
makes it, not the host or the other isolates.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import threading
import time
from collections.abc import Callable

from ...agent import linux
from ...ratelimit import TokenBucket
from ...result import SecurityViolation
from . import netlink, seccomp

# (the call's name, whether it was refused, what makes its record): the record is
# built only while the run's report has room, so a flood costs a count, not a model.
ViolationSink = Callable[[str, bool, Callable[[], SecurityViolation]], None]
log = logging.getLogger("stockade.seccomp")


# Notifications one isolate may have answered, per second sustained (and in a burst). Each costs
# this host process's thread tens of microseconds that no cgroup of the isolate's pays for: past the
# rate, the isolate's listener is not read until its budget has refilled, so its calls wait in the
# kernel (a flood slows itself) and the other isolates' are answered meanwhile.
NOTIFY_PER_S, NOTIFY_BURST = 2000.0, 10000.0
NOTIFY_RESUME = NOTIFY_BURST / 10  # the budget a paused listener is read again with


class Supervisor:
    """One thread answering the seccomp notifications of every live isolate."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._sinks: dict[int, ViolationSink] = {}
        self._network: set[int] = set()  # listeners whose isolates' network calls are read (netcalls.py)
        self._netlink: dict[int, list[netlink.LetThrough]] = {}  # listener -> threads let make a netlink socket
        self._budgets: dict[int, TokenBucket] = {}
        self._paused: dict[int, float] = {}  # listener -> when it is read again (its budget spent)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._log_budget = TokenBucket(1.0, 10.0)  # calls that could not be judged, logged whole
        self._unlogged = 0

    def watch(self, listener_fd: int, sink: ViolationSink, network: bool = False) -> None:
        """Take ownership of ``listener_fd``; ``sink`` gets each violation, from this thread.
        ``network``: the isolate's filter stops its network calls too (netcalls.py)."""
        with self._lock:
            self._sinks[listener_fd] = sink
            if network:
                self._network.add(listener_fd)
            self._budgets[listener_fd] = TokenBucket(NOTIFY_PER_S, NOTIFY_BURST)
            self._paused.pop(listener_fd, None)
            self._epoll.register(listener_fd, select.EPOLLIN)
            if self._thread is None or not self._thread.is_alive():  # (a thread that died: another)
                self._thread = threading.Thread(target=self._loop, name="stockade-seccomp", daemon=True)
                self._thread.start()

    def forget(self, listener_fd: int) -> None:
        """The owner is done with the isolate: stop watching and close the fd."""
        with self._lock:
            self._network.discard(listener_fd)
            self._netlink.pop(listener_fd, None)
            self._budgets.pop(listener_fd, None)
            self._paused.pop(listener_fd, None)
            if self._sinks.pop(listener_fd, None) is None:
                return
            try:
                self._epoll.unregister(listener_fd)
            except OSError:
                pass  # already retired
            os.close(listener_fd)

    def _retire(self, listener_fd: int) -> None:
        """Every task under the filter has exited: stop polling, but leave the fd open.

        Only the owner's ``forget`` closes it. Closing it here would free the fd
        number while the owner still holds it: the next isolate's listener could
        get that number, and the owner's later ``forget`` would then unregister
        and close the new isolate's listener, whose violations would go unseen.
        """
        with self._lock:
            self._paused.pop(listener_fd, None)
            if listener_fd in self._sinks:
                try:
                    self._epoll.unregister(listener_fd)
                except OSError:
                    pass

    def _loop(self) -> None:
        while True:
            with self._lock:
                resume = min(self._paused.values(), default=None)
            timeout = -1.0 if resume is None else max(0.0, resume - time.monotonic())
            try:
                events = self._epoll.poll(timeout)
            except InterruptedError:
                continue
            for fd, mask in events:
                try:
                    if mask & select.EPOLLIN:
                        self._answer(fd)
                    elif mask & (select.EPOLLHUP | select.EPOLLERR):
                        self._retire(fd)
                except Exception:  # this thread serves every isolate: one notification never ends it
                    log.exception("seccomp listener %d: a notification could not be handled", fd)
            if resume is not None:
                self._resume_due(time.monotonic())

    def _resume_due(self, now: float) -> None:
        """Read again the listeners whose budget has refilled."""
        with self._lock:
            for fd, at in list(self._paused.items()):
                if at <= now and fd in self._sinks:
                    del self._paused[fd]
                    with contextlib.suppress(OSError):  # retired meanwhile: its hang-up says so
                        self._epoll.modify(fd, select.EPOLLIN)

    def _spend(self, fd: int, cost: float = 1.0) -> None:
        """A notification of ``fd``'s answered, ``cost`` of its budget: past it, stop reading ``fd`` for a while."""
        now = time.monotonic()
        with self._lock:
            budget = self._budgets.get(fd)
            if budget is None or budget.take(cost, now) or fd in self._paused:
                return
            self._paused[fd] = budget.ready_at(NOTIFY_RESUME)
            with contextlib.suppress(OSError):
                self._epoll.modify(fd, 0)  # hang-ups are still said (epoll always reports them)

    def _answer(self, fd: int) -> None:
        self._spend(fd)
        notif = linux.seccomp_notif_recv(fd)
        if notif is None:
            return  # ENOENT: the caller died meanwhile; EBADF: forgotten
        notif_id, pid, nr, args = notif
        try:
            self._decide(fd, notif_id, pid, nr, args)
        except Exception:  # noqa: BLE001 - logged (rate-limited) by _said_unjudged, from inside this handler
            # Whatever the call held (a pointer no read could follow), it is answered: refused, and
            # said in the log; a call left unanswered would wait in the kernel until its run's end.
            with contextlib.suppress(OSError):
                linux.seccomp_notif_deny(fd, notif_id, errno.EPERM)
            self._said_unjudged(nr, pid)

    def _said_unjudged(self, nr: int, pid: int) -> None:
        """Log a call that could not be judged: a few a second with their traceback (an isolate could
        make the same one thousands of times a second), the rest counted into the next."""
        with self._lock:
            if not self._log_budget.take(1.0, time.monotonic()):
                self._unlogged += 1
                return
            unlogged, self._unlogged = self._unlogged, 0
        more = f" ({unlogged} more since, not logged)" if unlogged else ""
        log.exception("seccomp: call %d of pid %d could not be judged; it is refused%s", nr, pid, more)

    def _decide(self, fd: int, notif_id: int, pid: int, nr: int, args: tuple[int, ...]) -> None:
        with self._lock:
            sink = self._sinks.get(fd)
            network = fd in self._network
            let_through = self._netlink.setdefault(fd, []) if sink is not None else []
        if netlink.asks(nr, args):
            self._spend(fd, netlink.COST - 1)  # its /proc reads: several refusals' work
            netlink.answer(fd, notif_id, pid, let_through)
            return
        if network and self._network_call(fd, notif_id, pid, nr, args, sink):
            return
        rule = seccomp.rule_for(nr, args)
        # Record before answering: the blocked call cannot return, so nothing the
        # sandboxed code does afterwards (finishing, replying) can overtake the report.
        if sink is not None:
            sink(seccomp.call_name(nr)[0], True, lambda: seccomp.violation_for(nr, args, pid))
        linux.seccomp_notif_deny(fd, notif_id, rule.errno if rule else errno.EPERM)

    @staticmethod
    def _network_call(
        fd: int, notif_id: int, pid: int, nr: int, args: tuple[int, ...], sink: ViolationSink | None
    ) -> bool:
        """Answer one of the calls an allowlist isolate's filter stops besides the profile's
        (netcalls.py); False for any other call."""
        from . import netcalls  # (imports the profile compiler: loaded once an allowlist isolate is seen)

        if nr not in netcalls.CALLS:
            return False
        where = netcalls.destination(pid, nr, args)
        if not linux.seccomp_notif_id_valid(fd, notif_id):
            return True  # the caller is gone: what was read may not have been its memory
        if where is None:
            linux.seccomp_notif_continue(fd, notif_id)
            return True
        if sink is not None:
            sink("network_egress", True, lambda: netcalls.violation(nr, where, pid))
        linux.seccomp_notif_deny(fd, notif_id, netcalls.ANSWER)
        return True


_supervisor: Supervisor | None = None
_supervisor_lock = threading.Lock()


def supervisor() -> Supervisor:
    global _supervisor
    with _supervisor_lock:
        if _supervisor is None:
            _supervisor = Supervisor()
        return _supervisor
