"""Netlink route sockets, held to a few open at once per process isolate.

glibc's ``getaddrinfo`` (with ``AI_ADDRCONFIG``), ``if_nameindex`` and
``getifaddrs`` (Node's ``os.networkInterfaces()``) open a ``NETLINK_ROUTE``
socket, ask, and close it. But what such a socket has queued for its reader
is the kernel's own memory, charged to no cgroup (unlike a TCP, UDP or Unix
socket's buffers): code that opened hundreds of them, raised their receive
buffers and asked for dumps it never read held 1.6 GiB of the host's memory
from a 64 MB isolate, whose own group showed 9 MiB.

So the process runtime's filter stops ``socket(AF_NETLINK, ...)`` (the
profile refuses, and reports, every protocol but the route one before) and
the supervisor counts the netlink sockets open in the isolate's network
namespace, its own whatever its network policy (``/proc/PID/net/protocols``:
the kernel's count, sockets not yet bound included): below ``MAX_OPEN`` the
call goes on (``CONTINUE``: its arguments are registers, nothing a thread
could change meanwhile), past it the answer is ``ENOSYS``, unreported, as
from a kernel without netlink (glibc's ``getaddrinfo`` then assumes both
address families). A socket let through whose thread may still be in its
``socket`` call (``/proc/TID/syscall``), so not counted yet, is counted too:
threads asking at once, or held off the CPU by their group's quota, cannot
each find room. At most ``MAX_OPEN`` queues of twice ``net.core.rmem_max``.

Each answer reads the isolate's ``/proc`` files on the host's supervisor
thread, several times the work of refusing a call: it costs the isolate's
notification budget ``COST`` (supervisor.py), so that a loop of netlink
sockets slows the isolate, not the thread every isolate is answered by.
"""

from __future__ import annotations

import errno
import time
from functools import cache
from typing import NamedTuple

from ...agent import linux
from .seccomp import Rule, compile_profile, load_profile, rule_for
from .syscalls_x86_64 import SYSCALLS_X86_64

SOCKET = SYSCALLS_X86_64["socket"]
AF_NETLINK = 16
MAX_OPEN = 8  # netlink sockets open at once in one isolate (glibc holds one for a moment per lookup)
ANSWER = errno.ENOSYS
# Notifications an answer here costs of its isolate's budget: reading /proc/PID/net/protocols and
# the let-through threads' /proc/TID/syscall takes the supervisor ~50-90 us, a refusal ~10 us.
COST = 8
# CPU time a let-through thread said to be ``running`` has had since (ns) once it has surely left its
# socket call (microseconds of work): one that went on spinning, its socket made, is not counted twice.
LEFT_THE_CALL_NS = 1_000_000
# Where the kernel keeps no CPU times (schedstat "0 0 0"): how long such a thread is counted.
RUNNING_GRACE_S = 1.0
RULES = (
    Rule("socket", "notify", "LOW", "netlink sockets are counted: what they queue is charged to no cgroup",
         when={"arg": 0, "op": "eq", "value": AF_NETLINK}),
)  # fmt: skip


@cache
def program(allowlist: bool) -> bytes:
    """Every process isolate's filter: the profile's rules, route sockets stopped to be counted, and
    under an allow-list its network calls (netcalls.py) stopped too. (A microVM's guest runs the
    profile alone: what its sockets queue is the VM's own memory.)"""
    if not allowlist:
        return compile_profile(load_profile() + RULES)
    from . import netcalls  # (loaded once an allowlist isolate is seen)

    return compile_profile(load_profile() + RULES + netcalls.RULES)


def asks(nr: int, args: tuple[int, ...]) -> bool:
    """Whether the call is a route socket the profile itself lets through (RULES stopped it)."""
    return nr == SOCKET and args[0] & 0xFFFFFFFF == AF_NETLINK and rule_for(nr, args) is None


def open_sockets(pid: int) -> int | None:
    """The netlink sockets open in ``pid``'s network namespace (the kernel's own not counted), or
    None when that cannot be read."""
    try:
        with open(f"/proc/{pid}/net/protocols") as f:
            for line in f:
                fields = line.split()
                if fields[:1] == ["NETLINK"] and len(fields) > 2 and fields[2].isdigit():
                    return int(fields[2])
    except OSError:
        pass
    return None


class LetThrough(NamedTuple):
    """A thread let make a netlink socket: when, and its CPU time then (ns; 0: not kept)."""

    tid: int
    at: float
    cpu_ns: int


def _cpu_ns(tid: int) -> int:
    """Thread ``tid``'s time on a CPU so far (ns), 0 where the kernel keeps none or it is gone."""
    try:
        with open(f"/proc/{tid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _making_one(let: LetThrough, now: float) -> bool:
    """Whether a thread let make a netlink socket may not have made it yet: still in its ``socket``
    call, or ``running``, which the kernel also says of a thread woken in a call but waiting for a
    CPU (its group's quota may hold it for a while), unless it has had the CPU since for longer
    than the call takes. Once it is in another call (or gone) its socket is counted, if it kept it."""
    try:
        with open(f"/proc/{let.tid}/syscall") as f:
            said = f.read().split()
    except OSError:
        return False  # gone
    if said[:1] == ["running"]:
        if let.cpu_ns:
            return _cpu_ns(let.tid) - let.cpu_ns < LEFT_THE_CALL_NS
        return now - let.at < RUNNING_GRACE_S
    return len(said) > 1 and said[0] == str(SOCKET) and int(said[1], 16) & 0xFFFFFFFF == AF_NETLINK


def answer(listener: int, notif_id: int, tid: int, let_through: list[LetThrough]) -> None:
    """Let the socket be made while the isolate has room for it, else ``ENOSYS``. ``let_through``:
    the threads this listener let make one, which may not be counted yet (``tid``, asking now, has
    ended any call before this one)."""
    now = time.monotonic()
    let_through[:] = [let for let in let_through if let.tid != tid and _making_one(let, now)]
    open_now = open_sockets(tid)
    if not linux.seccomp_notif_id_valid(listener, notif_id):
        return  # the caller is gone: what was read may be another process's namespace
    if open_now is not None and open_now + len(let_through) < MAX_OPEN:
        let_through.append(LetThrough(tid, now, _cpu_ns(tid)))
        linux.seccomp_notif_continue(listener, notif_id)
    else:
        linux.seccomp_notif_deny(listener, notif_id, ANSWER)
