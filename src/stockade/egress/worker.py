"""Egress workers: the processes that serve allow-listed sandboxes' proxies, one each.

The host side of an isolate's network parses the most hostile input stockade
takes (HTTP heads, TLS, DNS queries) and holds what an attacker wants most (the
sandbox's secret values, its CA key). So it runs apart from the process that
holds the sandbox (the daemon, an SDK caller: its *keeper*, workers.py), as seed
002's workers do.

``python -P -s -m stockade.egress.worker`` is a fork server: started once per
keeper with nothing of its environment but its module path, stdin a SOCK_SEQPACKET socket to its keeper
and nothing else, it imports what a worker needs once, then forks one worker
per request (an import costs a few hundred milliseconds of CPU, a fork about
one). A request is ``{"uid": int|None}`` with one descriptor, the worker's end
of its keeper's socket; the answer ``{"pid": n}`` carries the worker's pidfd
(opened before the fork server could reap it: never another process's). The
fork server is single-threaded, reaps its workers, and ends with its keeper.

A worker, from its first instruction: its keeper's socket as stdin and stdout,
/dev/null as stderr, no other descriptor; then, forked from root, the
isolate's own host uid for good (no group, no capability, an empty bounding
set), and for everyone no_new_privs and not dumpable — before it reads a
message. Taken over by its isolate, it holds that sandbox's secrets and CA and
reaches the network, which its proxy gave the isolate already; not the
keeper's memory or token, the broker's key, or another sandbox.

Keeper -> worker, msgpack maps, each answered in order:
  ``{"op": "serve", "policy": {...}, "values": {name: value}, "upstream_ca": PEM|None,
  "pinned_hosts": hosts(5) text|None}`` with the isolate's listener and name service socket
  -> ``{"ok": true, "env": {...}, "ca": PEM|None}``
  ``{"op": "take"}`` -> ``{"ok": true, "records": [...], "dropped": n, "redacted": n}``
Worker -> keeper, unasked: ``{"event": "refused", "request": {...}, "count": n}`` (before the
isolate hears of the first refusal of a burst; the rest of it, n with one as their example, a
window later). End of stdin: the worker exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import encodings.idna  # noqa: F401  (a name lookup imports it; a worker may not read the install)
import os
import resource
import select
import signal
import socket
import sys
import threading
from typing import Any

import msgpack

from ..agent import linux
from ..policy import Policy
from ..result import EgressRequest
from .exchange import upstream_context
from .gate import MAX_REFUSALS_SAID, Gate
from .proxy import proxy

MAX_MESSAGE = 4 << 20  # a policy and its secrets' values; nothing bigger comes from a keeper
REFUSAL_WINDOW_S = 0.05  # refusals after the first of a burst are said together, once a window


class Worker:
    def __init__(self, keeper_in: socket.socket, keeper_out: socket.socket) -> None:
        self.keeper_in = keeper_in
        self.keeper_out = keeper_out
        self._send_lock = threading.Lock()  # replies (main thread) and events (the proxy's)
        self._refusal_lock = threading.Lock()
        self._window = False  # open: refusals are counted into ``_burst``, said at its end
        self._burst: tuple[EgressRequest, int] | None = None  # the window's first unsaid refusal, and how many
        self.gate: Gate | None = None
        self.stop: Any = None

    def send(self, message: dict[str, Any]) -> None:
        data = msgpack.packb(message)
        with self._send_lock:
            self.keeper_out.sendall(data)

    def run(self) -> None:
        unpacker = msgpack.Unpacker(max_buffer_size=MAX_MESSAGE)
        fds: list[int] = []
        while True:
            data, received, _flags, _address = socket.recv_fds(self.keeper_in, 65536, 4)
            fds.extend(received)
            if not data:
                return  # the keeper closed its end: the sandbox is gone
            unpacker.feed(data)
            for message in unpacker:
                try:
                    reply = self.answer(message, fds)
                except (ValueError, TypeError, KeyError, RuntimeError, OSError) as exc:  # named; the worker goes on
                    reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                self.send(reply)

    def answer(self, message: Any, fds: list[int]) -> dict[str, Any]:
        op = message.get("op") if isinstance(message, dict) else None
        if op == "serve":
            taken = fds[:]
            fds.clear()
            return self.serve(message, taken)
        if op == "take":
            if self.gate is None:
                raise RuntimeError("take before serve")
            self._say_burst()  # before the answer: the keeper counts them into the run it takes
            proxy().settle(self.gate)
            records, dropped = self.gate.take_records()
            return {"ok": True, "records": [r.to_dict() for r in records], "dropped": dropped,
                    "redacted": self.gate.redactor.take_count()}  # fmt: skip
        raise ValueError(f"unknown op {op!r}")

    def serve(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        sockets = [socket.socket(fileno=fd) for fd in fds]
        refused = message.get("refused") or []
        if not isinstance(refused, list) or not all(isinstance(a, str) for a in refused):
            refused = None
        if self.gate is not None or len(sockets) != 2 or refused is None:
            for sock in sockets:
                sock.close()
            raise ValueError("serve takes a listener and a name service socket, once, and addresses to refuse")
        gate = Gate(Policy(**message["policy"]), message.get("values") or {}, self.refused,
                    message.get("upstream_ca"), message.get("pinned_hosts"), refused)  # fmt: skip
        self.stop = proxy().serve(gate, *sockets)
        self.gate = gate
        return {"ok": True, "env": gate.env(), "ca": gate.ca.pem if gate.ca is not None else None}

    def refused(self, request: EgressRequest) -> None:
        """Said to the keeper at once (its policy may end the isolate at the first), then a burst
        in one message a window: a flood of refusals costs the keeper a message per window, not
        one per request. Called in the proxy's event loop."""
        with self._refusal_lock:
            if self._window:
                example, count = self._burst or (request, 0)
                self._burst = (example, count + 1)
                return
            self._window = True
        self.send({"event": "refused", "request": request.to_dict(), "count": 1})
        asyncio.get_running_loop().call_later(REFUSAL_WINDOW_S, self._said_burst)

    def _said_burst(self) -> None:
        if self._say_burst(closing=True):
            asyncio.get_running_loop().call_later(REFUSAL_WINDOW_S, self._said_burst)

    def _say_burst(self, closing: bool = False) -> bool:
        """Say the refusals counted in the open window (a run's ``take`` asks first, so that its
        counts are whole); whether there were any. ``closing``: a quiet window closes."""
        with self._refusal_lock:
            if self._burst is None:
                if closing:
                    self._window = False  # the next refusal is said at once
                return False
            (example, count), self._burst = self._burst, None
            # Sent under the lock: a take's flush and the window's must not cross.
            while count > 0:
                said = min(count, MAX_REFUSALS_SAID)
                self.send({"event": "refused", "request": example.to_dict(), "count": said})
                count -= said
        return True


WORKER_FILES = 1024  # a worker's descriptors, at most


def give_up_root(uid: int | None) -> None:
    """Become ``uid`` (its gid the same number) for good, with no groups or capabilities; then,
    whoever it runs as, gain nothing through exec (no_new_privs) and be unreadable through /proc
    by the keeper's own uid (not dumpable). Called while single-threaded: the bounding set, the
    capability sets and no_new_privs are per thread."""
    # What a worker taken over could hold of its keeper's limits (root's, the daemon's): the proxy
    # keeps at most a few hundred descriptors (MAX_CONNECTIONS a gate, two each), and dumps no core.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    files = WORKER_FILES if hard == resource.RLIM_INFINITY else min(WORKER_FILES, hard)  # never above its keeper's
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if uid is not None and os.geteuid() == 0:
        linux.drop_bounding_set()
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # from root, without keep-caps: every capability goes with it
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
    linux.prctl(linux.PR_SET_DUMPABLE, 0)


def _worker(fd: int, uid: int | None) -> None:
    """In a freshly forked child: become a worker on ``fd`` (never returns)."""
    code = 0
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.dup2(fd, 0)
        os.dup2(fd, 1)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))  # the fork server's control socket and wake pipe too
        give_up_root(uid)
        # Ahead of its sandbox (a worker is forked when its isolate is built): the proxy's loop running,
        # and the pages a hand-over touches copied from the fork server's now, not on the caller's path.
        proxy()
        warm_up()
        worker = Worker(socket.socket(fileno=0), socket.socket(fileno=1))
        try:
            worker.run()
        except (ConnectionError, OSError, ValueError, msgpack.UnpackException):
            pass  # a keeper that went away, or that sent what no keeper sends: either way, the end
        if worker.stop is not None:
            worker.stop()
    except BaseException:  # noqa: BLE001 - a forked child must never return into the fork server
        code = 1
    os._exit(code)


def serve_forks(ctl: socket.socket, uids: tuple[int, int] | None) -> None:
    """The fork server's loop: a worker for each request on ``ctl``, until the keeper closes it.
    As root (``uids``: the sandbox range), a worker runs only as a uid of that range."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    workers: set[int] = set()
    while True:
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [])
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
            _reap(workers)
        if ctl.fileno() not in ready:
            continue
        raw, fds, _flags, _address = socket.recv_fds(ctl, 4096, 1)
        if not raw:
            return
        try:
            request = msgpack.unpackb(raw)
            if isinstance(request, dict) and "kill" in request:
                # A keeper without root may not signal a worker that runs as its isolate's uid: it asks.
                target = request["kill"]
                known = type(target) is int and target in workers
                if known:
                    os.kill(target, signal.SIGKILL)  # not reaped yet: still that worker
                ctl.send(msgpack.packb({"killed": known}))
                continue
            uid = request.get("uid") if isinstance(request, dict) else None
            refused = _refusal(uid, uids, len(fds))
            if refused:
                ctl.send(msgpack.packb({"error": refused}))
                continue
            try:
                pid = os.fork()
            except OSError as exc:  # no pid or memory left now: said, and the server serves on (kills too)
                ctl.send(msgpack.packb({"error": f"cannot start a worker: {exc.strerror}"}))
                continue
            if pid == 0:
                ctl.close()
                _worker(fds[0], uid if uids is not None else None)
            workers.add(pid)
            pidfd = os.pidfd_open(pid)  # before any reaping here: this pid is that child's
            try:
                socket.send_fds(ctl, [msgpack.packb({"pid": pid})], [pidfd])
            finally:
                os.close(pidfd)
        finally:
            for fd in fds:
                os.close(fd)


def _refusal(uid: Any, uids: tuple[int, int] | None, fds: int) -> str | None:
    if fds != 1 or (uid is not None and (not isinstance(uid, int) or isinstance(uid, bool))):
        return "a request is {uid} and one descriptor"
    if uids is not None and (uid is None or not uids[0] <= uid <= uids[1]):
        return f"a worker runs as a sandbox uid ({uids[0]}-{uids[1]}), not as {uid!r}"
    return None


def _reap(workers: set[int]) -> None:
    """Reap ended workers, and kill whatever a worker left behind. The fork server is a child
    subreaper: a process a worker started (only a worker taken over would) comes here when the
    worker ends, and must not outlive it to meet the next isolate given the same uid."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        workers.discard(pid)
    for orphan in _children() - workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(orphan, signal.SIGKILL)


def _children() -> set[int]:
    found: set[int] = set()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    if int(f.read().rsplit(b")", 1)[1].split()[1]) == me:
                        found.add(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def warm_up() -> None:
    """What every worker would otherwise pay for itself, paid once here and inherited through fork:
    the host's roots loaded for upstream TLS, a policy validated, a sandbox CA made (the lazy
    imports and first-use set-ups of pydantic and cryptography)."""
    upstream_context(None)
    policy = Policy(network_policy="allowlist", allowed_hosts=["warm.invalid"],
                    secrets=[{"name": "WARM", "hosts": ["warm.invalid"]}])  # type: ignore[list-item]  # fmt: skip
    Gate(Policy(**policy.to_dict()), {"WARM": "-"})


def main() -> int:
    linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)  # it gains nothing through exec either
    linux.prctl(linux.PR_SET_DUMPABLE, 0)  # its workers (the same uid, without root) cannot ptrace it
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)  # what a worker leaves behind comes back here (_reap)
    uids = None
    if len(sys.argv) == 3 and sys.argv[1] == "--uids":
        first, _, last = sys.argv[2].partition("-")
        uids = (int(first), int(last))
    warm_up()
    try:
        serve_forks(socket.socket(fileno=0), uids if os.geteuid() == 0 else None)
    except (ConnectionError, OSError, msgpack.UnpackException):
        pass  # its keeper went away, or spoke nonsense: its workers end on their own sockets
    return 0


if __name__ == "__main__":
    sys.exit(main())
