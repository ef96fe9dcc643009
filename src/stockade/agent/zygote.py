"""The process runtime's zygote: an interpreter that has paid start-up once.

The host starts it as ``/usr/bin/python3 -I`` with a SOCK_SEQPACKET control
socket whose fd number is its argument. Each message is an isolate config (JSON) with one descriptor
attached: the isolate's end of its agent socket. The zygote forks; the child
builds the isolate (``confine.start_isolate``) and becomes its agent without an
exec, so an isolate costs a fork and the confinement syscalls, never an
interpreter start.

The zygote is single-threaded (fork-safe), a child subreaper (it reaps every
isolate init), and dies with its host (PDEATHSIG and EOF on the control socket).
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import sys

from . import confine, linux

CONFIG_MAX = 1 << 20


def main(ctl_fd: int) -> None:
    ctl = socket.socket(fileno=ctl_fd)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    if os.getppid() == 1:
        os._exit(0)  # the host died before PDEATHSIG was armed
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # Everything imported so far is shared with every isolate: keep the
    # collector from touching (and so copying) those pages after fork.
    gc.freeze()
    spare: _Spare | None = None
    ctl.sendall(b"ready")
    while True:
        ready, _, _ = select.select([ctl.fileno(), wake_r], [], [])
        if wake_r in ready:
            try:
                while os.read(wake_r, 512):
                    pass
            except BlockingIOError:
                pass
            _reap()
        if ctl.fileno() in ready:
            try:
                raw, fds, _flags, _addr = socket.recv_fds(ctl, CONFIG_MAX, 1)
            except OSError:
                raw, fds = b"", []
            if not raw:
                return
            if not fds:
                # {"op": "prepare", "cgroup_procs": [...]}: fork the next child ahead of time.
                if spare is not None:
                    spare.discard()
                spare = _fork_spare(ctl, (wake_r, wake_w), _prepare_request(raw))
                continue
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            # A child forked ahead of time, already in the isolate's cgroups, takes the
            # request; otherwise fork now.
            if spare is None or not spare.take(raw, fds[0]):
                _spawn(ctl, raw, fds[0], (wake_r, wake_w))
            os.close(fds[0])
            if spare is not None:
                spare.discard()
                spare = None


class _Spare:
    """A child of the zygote waiting for one isolate config, already in that isolate's cgroups."""

    def __init__(self, pid: int, sock: socket.socket, cgroup_procs: list[str]) -> None:
        self.pid, self.sock, self.cgroup_procs = pid, sock, cgroup_procs

    def take(self, raw: bytes, agent_fd: int) -> bool:
        try:
            config = confine.decode_config(raw)
        except ValueError:
            return False
        if config.get("cgroup_procs") != self.cgroup_procs:
            return False  # asked for another isolate's cgroups: build the usual way
        try:
            socket.send_fds(self.sock, [raw], [agent_fd])
        except OSError:
            return False  # it died: build the usual way
        self.sock.close()
        self.pid = 0
        return True

    def discard(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        self.sock.close()


def _prepare_request(raw: bytes) -> list[str]:
    try:
        request = confine.decode_config(raw)
        procs = request.get("cgroup_procs") or []
        return [str(p) for p in procs] if request.get("op") == "prepare" else []
    except ValueError:
        return []


def _fork_spare(ctl: socket.socket, wake_fds: tuple[int, int], cgroup_procs: list[str]) -> _Spare | None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        pid = os.fork()
    except OSError:
        ours.close()
        theirs.close()
        return None
    if pid == 0:
        ours.close()
        try:
            _become_builder(ctl, wake_fds)
            linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)  # a spare dies with the zygote
            confine.join_cgroups(cgroup_procs)
            raw, fds, _flags, _addr = socket.recv_fds(theirs, CONFIG_MAX, 1)
            if not raw or len(fds) != 1:
                os._exit(0)
            theirs.close()
            linux.prctl(linux.PR_SET_PDEATHSIG, 0)
        except BaseException:  # noqa: BLE001
            os._exit(1)
        _build(raw, fds[0], joined=True)
    theirs.close()
    return _Spare(pid, ours, cgroup_procs)


def _spawn(ctl: socket.socket, raw: bytes, agent_fd: int, wake_fds: tuple[int, int]) -> None:
    pid = os.fork()
    if pid == 0:
        try:
            _become_builder(ctl, wake_fds)
        except BaseException:  # noqa: BLE001
            os._exit(1)
        _build(raw, agent_fd)


def _become_builder(ctl: socket.socket, wake_fds: tuple[int, int]) -> None:
    """In a freshly forked child: drop what belongs to the zygote."""
    ctl.close()
    for fd in wake_fds:
        os.close(fd)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 0)


def _build(raw: bytes, agent_fd: int, joined: bool = False) -> None:
    conn = socket.socket(fileno=agent_fd)
    try:
        config = confine.decode_config(raw)
        if joined:
            config["cgroup_procs"] = []  # already there
    except BaseException as exc:  # noqa: BLE001
        confine._report_failure(conn, "config", exc)
        os._exit(1)
    confine.start_isolate(config, conn)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


if __name__ == "__main__":
    main(int(sys.argv[1]))
